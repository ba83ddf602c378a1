"""identify: which fruit is this? `python -m fruits.app.identify PHOTO` (or `make identify IMG=...`).

The photo goes through exactly what the pipeline did to every image, without Spark or a JVM: the same
decoding (fruits.core.images), the same backbone, weights and engine, the pca stage's projection
artifact; then the index stage's Training vectors answer by a vote of the nearest ones, weighted by
1 / distance. A photo farther from every Training image than the index's calibrated distance is
answered "not sure" (it may be a fruit the index lacks). The answer carries the top labels with their share of the vote (the first share is the
confidence), the nearest Training images, and the fruit's information card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml
from omegaconf import DictConfig

from fruits.app.answer import Answer
from fruits.core import engines, logs
from fruits.core.config import load_config
from fruits.core.images import RejectedImage, as_jpeg, pixels_only, prepare
from fruits.core.storage import Storage, filesystem
from fruits.core.neighbours import NeighbourIndex, build_search, vote
from fruits.core.projection import Projection, read_projection
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

LANGUAGES = ("en", "fr")  # of the cards; the first is the default
MISSING_CARD_TEXT = {"en": "No information card for this fruit yet.", "fr": "Pas encore de fiche pour ce fruit."}


def preferred_language(accept_language: str | None) -> str:
    """The card language an Accept-Language header prefers ("fr-FR,fr;q=0.9,en;q=0.8" -> fr), else en."""
    ranked = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        try:
            weight = float(params.strip()[2:]) if params.strip().startswith("q=") else 1.0
        except ValueError:
            weight = 0.0
        if tag.split("-")[0].lower() in LANGUAGES and weight > 0:
            ranked.append((-weight, position, tag.split("-")[0].lower()))
    return min(ranked)[2] if ranked else LANGUAGES[0]


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
            missing = [field for field in ("name", "season", "text") if not set(LANGUAGES) <= set(card.get(field) or {})]
            missing += [] if "family" in card else ["family"]
            if missing:
                raise ValueError(f"card {key!r} in {path or 'the shipped cards.yaml'} lacks {missing} "
                                 f"(name, season and text each in {', '.join(LANGUAGES)})")
        return cls(cards)

    def key_for(self, label: str) -> str | None:
        """The card that covers label: the full label, then with trailing words dropped one at a time."""
        words = label.split()
        for end in range(len(words), 0, -1):
            key = " ".join(words[:end])
            if key in self.cards:
                return key
        return None

    def card(self, label: str, language: str = LANGUAGES[0]) -> dict:
        """The card for label with its season and text in language (the name in every language)."""
        key = self.key_for(label)
        if key is None:
            return {"key": None, "language": language, "name": dict.fromkeys(LANGUAGES, label), "family": None,
                    "season": None, "text": MISSING_CARD_TEXT[language]}
        card = self.cards[key]
        return {"key": key, "language": language, "name": card["name"], "family": card["family"],
                "season": card["season"][language], "text": card["text"][language]}


class BadPhoto(ValueError):
    """The upload cannot be identified; the message says why (not an image, truncated, too large...)."""


@dataclass(frozen=True)
class Snapshot:
    """What one index stage run lets the app answer: its projection and index, checked to belong
    together, and the search built over the index. A request reads it once and uses only it."""

    projection: Projection
    index: NeighbourIndex
    search: object  # ExactIndex | HnswIndex
    labels: list[str]  # what the index can answer, sorted
    paths: frozenset[str]  # its Training images, below env.paths.images: the only images the app shows
    version: str  # the first 12 hex digits of the index file's sha256
    files: tuple  # (mtime_ns, size, inode) of the projection and index files when they were read


def file_stamps(cfg: DictConfig) -> tuple:
    """What changes when the pca or index stage commits its file (an atomic rename: a new inode)."""
    stamps = []
    for path in (cfg.env.paths.pca_projection, cfg.env.paths.knn_index):
        try:
            status = os.stat(path)
            stamps.append((status.st_mtime_ns, status.st_size, status.st_ino))
        except FileNotFoundError:
            stamps.append(None)
    return tuple(stamps)


def load_snapshot(cfg: DictConfig) -> Snapshot:
    """The projection and index on disk, or a ValueError / FileNotFoundError saying why they cannot
    answer together (another run's projection, another number of components)."""
    files = file_stamps(cfg)  # before reading: a commit during the read shows as a change next time
    projection_path, index_path = Path(cfg.env.paths.pca_projection), Path(cfg.env.paths.knn_index)
    for path, stage in ((projection_path, "pca"), (index_path, "index")):
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the {stage} stage first (dvc repro)")
    projection_bytes, index_bytes = projection_path.read_bytes(), index_path.read_bytes()
    projection, index = read_projection(projection_bytes), NeighbourIndex.read(index_bytes)
    if index.projection_sha256 and index.projection_sha256 != hashlib.sha256(projection_bytes).hexdigest():
        raise ValueError(f"{index_path} was built with another projection than {projection_path}: "
                         "re-run the index stage (dvc repro)")
    if index.vectors.shape[1] != projection.k:
        raise ValueError(f"{index_path} holds {index.vectors.shape[1]}-d vectors but the projection gives "
                         f"{projection.k}: re-run the index stage (dvc repro)")
    return Snapshot(projection, index, build_search(index.vectors, cfg.identify.index_kind),
                    sorted(set(index.labels.tolist())), frozenset(index.paths.tolist()),
                    hashlib.sha256(index_bytes).hexdigest()[:12], files)


class Identifier:
    """The model and cards, loaded once (per CLI call, per server process), and the current snapshot of
    projection and index, which `refresh` replaces when the pipeline commits new ones."""

    def __init__(self, cfg: DictConfig):
        size, alpha, engine = cfg.model.input_size, cfg.model.alpha, engines.engine(cfg.model.engine)
        weights = Path(cfg.env.paths.weights)
        if not weights.exists():
            raise FileNotFoundError(f"{weights} not found: run the pipeline first (dvc repro)")
        self.model = engines.model_identity(cfg)
        engine.check(cfg)  # the payload featurize broadcasts: the checked ONNX bytes, or the weight arrays
        self.extract = engines.cached_extractor(self.model, lambda: engine.payload(cfg), engine.name, size, alpha,
                                                cfg.featurize.threads or 1)
        self.cfg, self.input_size, self.store = cfg, size, Storage.of(cfg)
        self.current = load_snapshot(cfg)  # at start, a pair that does not answer together is an error
        self.refused: tuple | None = None  # the files of the last pair refused by refresh
        self.cards = Cards.load(cfg.identify.cards)
        self.neighbours, self.top = cfg.identify.neighbours, cfg.identify.top

    @property
    def labels(self) -> list[str]:
        return self.current.labels

    def refresh(self) -> bool:
        """Answer from the projection and index on disk if they changed and belong together (True when it
        swapped). A pair that does not (the pca stage has committed and the index stage not yet) is
        logged once and the current one kept: a photo is never projected by one run and searched in
        another's index. The swap is one assignment: a request under way keeps the snapshot it took."""
        files = file_stamps(self.cfg)
        if files in (self.current.files, self.refused):
            return False
        try:
            fresh = load_snapshot(self.cfg)
        except (OSError, ValueError) as err:
            self.refused = files
            log.warning("still answering from index %s: %s", self.current.version, err)
            return False
        self.current = fresh
        log.info("now answering from index %s: %d vectors, %d labels", fresh.version, len(fresh.index.vectors),
                 len(fresh.labels))
        return True

    def thumbnail(self, path: str) -> bytes:
        """A Training image of the current index (its path as the index names it) as a small JPEG of its
        pixels only; FileNotFoundError for any other path, or one erased since the index was built;
        RejectedImage for a file there that is not a readable image."""
        if path not in self.current.paths:  # never a path the index does not hold: no traversal, no listing
            raise FileNotFoundError(path)
        fs, root = filesystem(self.cfg.env.paths.images, self.store)
        with fs.open(f"{root.rstrip('/')}/{path}", "rb") as stream:
            return as_jpeg(pixels_only(stream.read()), self.cfg.contributions.thumbnail_px)

    def vector(self, content: bytes, snapshot: Snapshot | None = None) -> np.ndarray:
        """The photo's PCA vector (k values), as the pipeline computes it for an image file."""
        try:
            array = prepare(content, self.input_size)
        except RejectedImage as err:
            raise BadPhoto(str(err)) from err
        return (snapshot or self.current).projection.project(self.extract(array[None]))[0]

    def identify(self, content: bytes, language: str = LANGUAGES[0]) -> dict:
        """The answer for one photo, its card in language: built through the one schema (answer.Answer),
        returned JSON-ready (the service returns it as is)."""
        snapshot = self.current  # one read: the whole answer comes from one index run
        found = snapshot.search.search(self.vector(content, snapshot)[None], self.neighbours)
        result = vote(snapshot.index.labels, snapshot.index.paths, found.distances[0], found.indices[0])
        top = list(zip(result.labels, result.scores, strict=True))[: self.top]
        return Answer(**{
            # not sure: farther from every Training image than the index's calibrated distance (a fruit it may
            # lack); the label is then only the closest guess
            "sure": bool(found.distances[0][0] <= snapshot.index.abstain_distance),
            "label": top[0][0],
            "confidence": round(top[0][1], 4),
            "top": [{"label": label, "score": round(score, 4), "card_key": self.cards.key_for(label)} for label, score in top],
            "neighbours": [{"label": label, "distance": round(distance, 4), "path": path}
                           for label, distance, path in result.nearest],
            "card": self.cards.card(top[0][0], language),
            "model": self.model,
            "index_version": snapshot.version,
        }).model_dump()


def render(answer: dict) -> str:
    """The answer as lines for a terminal."""
    card = answer["card"]
    lines = [f"{answer['label']}  (confidence {answer['confidence']:.0%})" if answer["sure"] else
             f"Not sure: this fruit may not be in our collection yet (closest: {answer['label']})", "", "Top answers:"]
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
    parser.add_argument("--language", choices=LANGUAGES, default=LANGUAGES[0], help="of the fruit's card")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. identify.neighbours=10")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logs")
    args = parser.parse_args(argv)
    logs.configure(args.verbose, level=logging.WARNING)
    if not args.photo.is_file():
        parser.exit(2, f"identify: {args.photo} is not a file\n")
    identifier = Identifier(load_config(args.overrides, args.params))
    try:
        answer = identifier.identify(args.photo.read_bytes(), args.language)
    except BadPhoto as err:
        parser.exit(2, f"identify: {args.photo}: {err}\n")
    sys.stdout.write((json.dumps(answer, indent=2) if args.json else render(answer)) + "\n")


if __name__ == "__main__":
    run_command(main)
