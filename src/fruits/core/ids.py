"""The one recipe for names that must sort by time and never repeat: table versions, ingest runs,
EMR run folders. UTC to the microsecond, then 64 random bits: two writers in the same instant differ."""

from __future__ import annotations

import secrets
from datetime import datetime, timezone


def stamped_id() -> str:
    """e.g. 20261130T231502123456Z-9f2c4e1a0b3d5c7e."""
    return f"{datetime.now(timezone.utc):%Y%m%dT%H%M%S%fZ}-{secrets.token_hex(8)}"
