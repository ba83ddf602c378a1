"""Photos the app's users contribute: quarantined, reviewed, then a source of the pipeline; erased on request.

A contribution is a photo re-encoded without any metadata (EXIF, GPS, maker notes, XMP, ICC: only the
pixels are kept, turned upright first), the label its author confirmed, and a record. Its author gets
an id and a deletion token, shown once; the record keeps only the token's sha256. Nothing else about
the author is stored (no address, no device, no time finer than the second).

Under env.paths.contributions (a local folder, or the project's EU bucket with its encryption):

    quarantine/Training/<label>/<id>.jpg   waiting for review: not a pipeline input
    approved/Training/<label>/<id>.jpg     reviewed (env.paths.approved): the sample stage copies them in
    thumbnails/<id>.jpg                    for the reviewer
    records/<id>.json                      label, status, the model's answer, the photo's sha256, the token's

`make contributions` lists the pending ones; `make approve IDS="…"` and `make reject IDS="…"` review
them (reject erases). contributions.auto_approve_at approves at once when the model's top label is the
author's with that share of the vote.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import re
import secrets
import sys
import unicodedata
import uuid
from datetime import datetime, timezone

from omegaconf import DictConfig

from fruits.core.config import load_config
from fruits.core.errors import ConfigError
from fruits.core.images import TRAINING, RejectedImage, as_jpeg, pixels_only
from fruits.core.storage import Storage, atomic_output, filesystem

SPLIT = TRAINING  # contributed photos enlarge what the index answers from
ID_PATTERN = re.compile(r"[0-9a-f]{32}")
LABEL_PATTERN = re.compile(r"[^\W\d_][^\W_]*(?:[ '-][^\W_]+)*")  # words of letters and digits, one space, ' or - between
LABEL_LENGTH = (2, 40)


class BadContribution(ValueError):
    """The contribution cannot be stored; the message says why (for a 4xx answer)."""


def normalise_label(text: str, known: list[str]) -> str:
    """The label as the collection spells it: a known label whatever its case and spacing, or a new name
    checked (letters, digits, spaces, ' and -; 2-40 characters) and capitalised word by word."""
    label = " ".join(unicodedata.normalize("NFC", text or "").split())
    by_key = {name.casefold(): name for name in known}
    if label.casefold() in by_key:
        return by_key[label.casefold()]
    if not LABEL_LENGTH[0] <= len(label) <= LABEL_LENGTH[1] or not LABEL_PATTERN.fullmatch(label):
        raise BadContribution(f"label {text!r} is not a fruit name: use letters, digits, spaces, ' or - "
                              f"({LABEL_LENGTH[0]}-{LABEL_LENGTH[1]} characters), or one of the known labels")
    return " ".join(word[0].upper() + word[1:] for word in label.split(" "))


def clean_photo(content: bytes, max_side: int, thumbnail_side: int) -> tuple[bytes, bytes]:
    """(photo, thumbnail) as JPEG holding the pixels only, upright, the photo at most max_side px."""
    try:
        pixels = pixels_only(content)
    except RejectedImage as err:
        raise BadContribution(f"cannot read the photo: {err}") from err
    return as_jpeg(pixels, max_side), as_jpeg(pixels, thumbnail_side)


def now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat()


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class ContributionStore:
    """The contributions folder (local or S3), through the project's guarded filesystem."""

    def __init__(self, cfg: DictConfig):
        self.cfg, self.store = cfg, Storage.of(cfg)
        self.root = str(cfg.env.paths.contributions).rstrip("/")
        self.fs, self.base = filesystem(self.root, self.store)
        self.base = self.base.rstrip("/")
        approved = str(cfg.env.paths.approved).rstrip("/")  # what the sample stage reads
        if not approved.startswith(f"{self.root}/"):
            raise ConfigError(f"env.paths.approved={approved} is not inside env.paths.contributions={self.root}")
        self.approved = approved[len(self.root) + 1:]

    def path(self, relative: str) -> str:
        return f"{self.base}/{relative}"

    @staticmethod
    def photo(area: str, label: str, contribution_id: str) -> str:
        """Where a photo lives in an area (quarantine, approved): the Fruits-360 layout."""
        return f"{area}/{SPLIT}/{label}/{contribution_id}.jpg"

    def write(self, relative: str, data: bytes) -> None:
        with atomic_output(f"{self.root}/{relative}", self.store) as partial:
            partial.write_bytes(data)

    def remove(self, relative: str) -> None:
        if self.fs.exists(self.path(relative)):
            self.fs.rm_file(self.path(relative))

    def record(self, contribution_id: str) -> dict | None:
        if not ID_PATTERN.fullmatch(contribution_id or ""):
            return None
        try:
            return json.loads(self.fs.cat_file(self.path(f"records/{contribution_id}.json")))
        except FileNotFoundError:
            return None

    def records(self) -> list[dict]:
        self.fs.invalidate_cache()
        found = [json.loads(self.fs.cat_file(path)) for path in self.fs.glob(self.path("records/*.json"))]
        return sorted(found, key=lambda record: (record["created"], record["id"]))

    def pending(self) -> int:
        """Photos waiting in quarantine, from one listing (paginated on S3), not one read per record."""
        self.fs.invalidate_cache()
        quarantine = self.path("quarantine")
        return sum(path.endswith(".jpg") for path in self.fs.find(quarantine)) if self.fs.exists(quarantine) else 0

    def add(self, content: bytes, label: str, answer: dict) -> tuple[dict, str]:
        """Store a consented photo in quarantine (or approved at once by the auto-approve rule):
        (its record, the deletion token: returned here only)."""
        settings = self.cfg.contributions
        photo, thumbnail = clean_photo(content, settings.max_side_px, settings.thumbnail_px)
        contribution_id, token = uuid.uuid4().hex, secrets.token_urlsafe(32)
        record = {"id": contribution_id, "label": label, "status": "pending", "created": now(),
                  "photo": self.photo("quarantine", label, contribution_id),
                  "thumbnail": f"thumbnails/{contribution_id}.jpg",
                  "sha256": hashlib.sha256(photo).hexdigest(), "bytes": len(photo),
                  "token_sha256": token_digest(token),
                  "model_answer": {"label": answer["label"], "confidence": answer["confidence"]},
                  "reviewed": None, "review": None}
        self.write(record["photo"], photo)
        self.write(record["thumbnail"], thumbnail)
        self.write(f"records/{contribution_id}.json", json.dumps(record, indent=2).encode())  # last: it exists now
        threshold = settings.auto_approve_at
        if threshold is not None and answer["label"] == label and answer["confidence"] >= threshold:
            record = self.approve(contribution_id, f"auto: the model agrees with {answer['confidence']:.0%} of the vote")
        return record, token

    def approve(self, contribution_id: str, review: str = "make approve") -> dict:
        """Move the photo into approved/ (a pipeline source); idempotent, and it finishes a move cut short
        (copy, record, then the quarantined copy removed)."""
        record = self.require(contribution_id)
        quarantined = self.photo("quarantine", record["label"], contribution_id)
        if self.fs.exists(self.path(quarantined)):
            target = self.photo(self.approved, record["label"], contribution_id)
            self.write(target, self.fs.cat_file(self.path(quarantined)))
            if record["status"] == "pending":
                record.update(status="approved", photo=target, reviewed=now(), review=review)
            self.write(f"records/{contribution_id}.json", json.dumps(record, indent=2).encode())
            self.remove(quarantined)
        elif record["status"] == "pending":
            raise BadContribution(f"contribution {contribution_id}: its photo {self.root}/{quarantined} is missing")
        return record

    def erase(self, contribution_id: str, token: str | None = None) -> bool:
        """Remove the photo, its thumbnail and its record. With a token (the author's request), only when
        it is the one given at upload; without (a reviewer's rejection), always. False: nothing erased."""
        record = self.record(contribution_id)
        if record is None:
            return False
        if token is not None and not hmac.compare_digest(record["token_sha256"], token_digest(token)):
            return False
        for relative in (record["photo"], self.photo("quarantine", record["label"], contribution_id),
                         record["thumbnail"]):
            self.remove(relative)
        self.remove(f"records/{contribution_id}.json")  # last: a retry with the token still finds it
        return True

    def require(self, contribution_id: str) -> dict:
        record = self.record(contribution_id)
        if record is None:
            raise BadContribution(f"no contribution {contribution_id!r} in {self.root}")
        return record


def listing(store: ContributionStore) -> str:
    """The pending contributions, one per line, for the reviewer."""
    pending = [record for record in store.records() if record["status"] == "pending"]
    if not pending:
        return f"no contribution waiting for review in {store.root}"
    lines = [f"{len(pending)} contribution(s) waiting for review in {store.root}:",
             f"{'id':32}  {'label':24} {'model says':30} thumbnail"]
    for record in pending:
        answer = record["model_answer"]
        said = f"{answer['label']} ({answer['confidence']:.0%})"
        lines.append(f"{record['id']}  {record['label']:24} {said:30} {store.root}/{record['thumbnail']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Review the app's contributed photos.")
    parser.add_argument("action", choices=["list", "approve", "reject"])
    parser.add_argument("ids", nargs="*", help="contribution ids (approve, reject)")
    parser.add_argument("--params", default=None, help="composed config (default: params.yaml)")
    args = parser.parse_args(argv)
    store = ContributionStore(load_config([], args.params))
    if args.action == "list":
        print(listing(store))
        return 0
    if not args.ids:
        parser.exit(2, f"make {args.action} needs IDS=\"<id> …\" (the ids: make contributions)\n")
    failed = 0
    for contribution_id in args.ids:
        try:
            if args.action == "approve":
                record = store.approve(contribution_id)
                print(f"approved {contribution_id}: {store.root}/{record['photo']}")
            else:
                if not store.erase(contribution_id):
                    raise BadContribution(f"no contribution {contribution_id!r} in {store.root}")
                print(f"rejected {contribution_id}: its photo, thumbnail and record are erased")
        except BadContribution as err:
            print(f"{args.action}: {err}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
