"""The identify answer's schema, defined once: the app builds its answers through it (fruits.app.identify)
and the service declares it as its response model (fruits.app.service, /openapi.json)."""

from __future__ import annotations

from pydantic import BaseModel


class Name(BaseModel):
    en: str
    fr: str


class Card(BaseModel):
    key: str | None  # the card's label (None: no card for this fruit yet)
    language: str  # of season and text: en or fr, as the request's Accept-Language prefers
    name: Name
    family: str | None
    season: str | None
    text: str


class Guess(BaseModel):
    label: str
    score: float  # share of the neighbours' vote, 0-1
    card_key: str | None


class Neighbour(BaseModel):
    label: str
    distance: float
    path: str


class Answer(BaseModel):
    sure: bool  # False: farther from every Training image than the index's calibrated distance (a fruit it may lack)
    label: str  # the first answer (when not sure: the closest guess)
    confidence: float  # the first label's share of the vote, 0-1
    top: list[Guess]
    neighbours: list[Neighbour]
    card: Card
    model: str
    index_version: str  # the index that answered (GET /health names the current one)
