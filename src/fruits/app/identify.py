"""identify: which fruit is this? `python -m fruits.app.identify PHOTO` (or `make identify IMG=...`).

The photo goes through exactly what the pipeline did to every image, without Spark or a JVM: the same
decoding (fruits.core.images), the same backbone, weights and engine, the pca stage's projection
artifact; then the index stage's Training vectors answer by a vote of the nearest ones, weighted by
1 / distance. The answer carries the top labels with their share of the vote (the first share is the
confidence), the nearest Training images, and the fruit's information card.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig

from fruits.core import engines, logs
from fruits.core.config import load_config
from fruits.core.images import RejectedImage, prepare
from fruits.core.neighbours import NeighbourIndex, build_search, vote
from fruits.core.projection import load_projection
from fruits.core.storage import file_digest

MISSING_CARD_TEXT = "No information card for this fruit yet."


class Cards:
    """Information cards keyed by label; a variety falls back to its fruit ("Apple Red 1" -> "Apple")."""

    def __init__(self, cards: dict[str, dict]):
        self.cards = cards

    @classmethod
    def load(cls, path: str | None) -> Cards:
        text = (Path(path).read_text() if path else
                resources.files("fruits.app").joinpath("cards.yaml").read_text(encoding="utf-8"))
        cards = yaml.safe_load(text) or {}
        for key, card in cards.items():
            missing = {"name", "family", "season", "text"} - set(card)
            if missing or not {"en", "fr"} <= set(card.get("name") or {}):
                raise ValueError(f"card {key!r} in {path or 'the shipped cards.yaml'} lacks {sorted(missing) or 'name.en/fr'}")
        return cls(cards)

    def key_for(self, label: str) -> str | None:
        """The card that covers label: the full label, then with trailing words dropped one at a time."""
        words = label.split()
        for end in range(len(words), 0, -1):
            key = " ".join(words[:end])
            if key in self.cards:
                return key
        return None

    def card(self, label: str) -> dict:
        key = self.key_for(label)
        if key is None:
            return {"key": None, "name": {"en": label, "fr": label}, "family": None, "season": None,
                    "text": MISSING_CARD_TEXT}
        return {"key": key, **self.cards[key]}


class BadPhoto(ValueError):
    """The upload cannot be identified; the message says why (not an image, truncated, too large...)."""


class Identifier:
    """Model, projection, index and cards, loaded once (per CLI call, per server process)."""

    def __init__(self, cfg: DictConfig):
        size, alpha, engine = cfg.model.input_size, cfg.model.alpha, engines.engine(cfg.model.engine)
        weights = Path(cfg.env.paths.weights)
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found: run the pipeline first (dvc repro)")
        self.model = engines.model_identity(cfg)
        engine.check(cfg)  # the payload featurize broadcasts: the checked ONNX bytes, or the weight arrays
        self.extract = engines.cached_extractor(self.model, lambda: engine.payload(cfg), engine.name, size, alpha,
                                                cfg.featurize.threads)
        self.input_size = size
        self.projection = load_projection(cfg.env.paths.pca_projection)
        self.index = NeighbourIndex.load(cfg.env.paths.knn_index)
        if self.index.projection_sha256 and self.index.projection_sha256 != file_digest(cfg.env.paths.pca_projection):
            raise ValueError(f"{cfg.env.paths.knn_index} was built with another projection than "
                             f"{cfg.env.paths.pca_projection}: re-run the index stage (dvc repro)")
        if self.index.vectors.shape[1] != self.projection.components.shape[1]:
            raise ValueError(f"{cfg.env.paths.knn_index} holds {self.index.vectors.shape[1]}-d vectors but the "
                             f"projection gives {self.projection.components.shape[1]}: re-run the index stage (dvc repro)")
        self.search = build_search(self.index.vectors, cfg.identify.index_kind)
        self.labels = sorted(set(self.index.labels.tolist()))  # what the index can answer, once
        self.cards = Cards.load(cfg.identify.cards)
        self.neighbours, self.top = cfg.identify.neighbours, cfg.identify.top

    def vector(self, content: bytes) -> np.ndarray:
        """The photo's PCA vector (k values), as the pipeline computes it for an image file."""
        try:
            array = prepare(content, self.input_size)
        except RejectedImage as err:
            raise BadPhoto(str(err)) from err
        return self.projection.project(self.extract(array[None]))[0]

    def identify(self, content: bytes) -> dict:
        """The answer for one photo (JSON-ready; the service returns it as is)."""
        found = self.search.search(self.vector(content)[None], self.neighbours)
        result = vote(self.index.labels, self.index.paths, found.distances[0], found.indices[0])
        top = list(zip(result.labels, result.scores, strict=True))[: self.top]
        return {
            "label": top[0][0],
            "confidence": round(top[0][1], 4),
            "top": [{"label": label, "score": round(score, 4), "card_key": self.cards.key_for(label)} for label, score in top],
            "neighbours": [{"label": label, "distance": round(distance, 4), "path": path}
                           for label, distance, path in result.nearest],
            "card": self.cards.card(top[0][0]),
            "model": self.model,
        }


def render(answer: dict) -> str:
    """The answer as lines for a terminal."""
    card = answer["card"]
    lines = [f"{answer['label']}  (confidence {answer['confidence']:.0%})", "", "Top answers:"]
    lines += [f"  {i + 1}. {g['label']:<28} {g['score']:6.1%}" for i, g in enumerate(answer["top"])]
    lines += ["", "Nearest Training images:"]
    lines += [f"  {n['distance']:10.3f}  {n['label']:<28} {n['path']}" for n in answer["neighbours"]]
    lines += ["", f"{card['name']['en']} ({card['name']['fr']})" + (f", {card['family']}" if card["family"] else ""),
              *([f"Season: {card['season']}"] if card["season"] else []), card["text"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Which fruit is this? Top labels and the fruit's card.")
    parser.add_argument("photo", type=Path)
    parser.add_argument("--params", default=None, help="composed config (default: params.yaml)")
    parser.add_argument("--json", action="store_true", help="print the answer as JSON (the service's schema)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. identify.neighbours=10")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    logs.configure(args.verbose, level=logging.WARNING)
    if not args.photo.is_file():
        parser.exit(2, f"identify: {args.photo} is not a file\n")
    identifier = Identifier(load_config(args.overrides, args.params))
    try:
        answer = identifier.identify(args.photo.read_bytes())
    except BadPhoto as err:
        parser.exit(2, f"identify: {args.photo}: {err}\n")
    sys.stdout.write((json.dumps(answer, indent=2) if args.json else render(answer)) + "\n")


if __name__ == "__main__":
    main()
