"""The identify service: `make serve` (uvicorn, N worker processes; each loads the model, projection
and index once, at start-up).

- `POST /identify` (multipart field `photo`): the answer as JSON (schema `Answer`, in /openapi.json);
- `GET /`: a one-page web UI to pick or drop a photo and see the top answers with the fruit's card;
- `GET /images/{path}`: a small JPEG of one of the current index's Training images (the answer's
  `neighbours[].path`), pixels only; any other path is a 404;
- `GET /labels`: what the current index can answer (the page's list for "it is actually…");
- `GET /health`: ready, with the model identity and the index's version and size. Each worker swaps
  to an index the pipeline commits while it serves, between requests (Identifier.refresh);
- `POST /contributions` (multipart: `photo`, `label`, `consent`): a photo its author names, stored
  without metadata in quarantine (fruits.app.contributions); the answer carries its id and a deletion
  token, shown once. `DELETE /contributions/{id}` with that token in `X-Deletion-Token` erases it.
  Per-client rate limit (429) and a cap on photos waiting for review (507).

Bad uploads get a 4xx whose `detail` says why, and the service keeps serving: wrong content type (415),
empty (400), larger than identify.max_upload_mb (413), not an image, truncated or a decompression bomb
(422). CORS allows the mobile app's origins (identify.cors_origins).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import threading
import time
from contextlib import asynccontextmanager
from importlib import resources

from fastapi import APIRouter, FastAPI, File, Form, Header, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse
from limits import parse as parse_rate
from limits.storage import MemoryStorage
from limits.strategies import MovingWindowRateLimiter
from omegaconf import DictConfig
from pydantic import BaseModel

from fruits.app.contributions import BadContribution, ContributionStore, normalise_label
from fruits.app.identify import BadPhoto, Identifier, preferred_language
from fruits.core import logs
from fruits.core.config import load_config
from fruits.app.answer import Answer
from fruits.core.images import RejectedImage
from fruits.core.logs import run_command

log = logging.getLogger(__name__)

ACCEPTED_TYPES = ("image/jpeg", "image/png", "image/webp", "image/gif", "image/bmp", "image/tiff")
MULTIPART_OVERHEAD = 16 * 1024  # bytes of form boundaries and part headers around the photo
SETTINGS_VARIABLE = "FRUITS_SERVICE_SETTINGS"  # how `make serve` hands --params and overrides to each worker


class ModelAnswer(BaseModel):
    label: str
    confidence: float


class Contribution(BaseModel):
    id: str
    deletion_token: str  # shown once: the only way to erase the photo later (only its sha256 is kept)
    label: str  # as the collection spells it
    status: str  # pending (quarantine, waiting for review) | approved
    model_answer: ModelAnswer


class Health(BaseModel):
    status: str
    model: str
    index_version: str  # the first 12 hex digits of the index file's sha256
    index_vectors: int
    labels: int


class Labels(BaseModel):
    labels: list[str]
    index_version: str


def create_app(cfg: DictConfig | None = None) -> FastAPI:
    """The ASGI app; cfg None: from the settings `python -m fruits.app.service` put in the environment."""
    if cfg is None:  # a worker process of `make serve`: its own logs (index swaps) go beside uvicorn's
        logs.configure()
        settings = json.loads(os.environ.get(SETTINGS_VARIABLE, "{}"))
        cfg = load_config(settings.get("overrides", []), settings.get("params"))
    limit = int(cfg.identify.max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.identifier = Identifier(cfg)  # once per server process
        stop = threading.Event()
        watcher = threading.Thread(target=watch_index, args=(app.state.identifier, cfg.identify.index_poll_seconds, stop),
                                   name="index-watcher", daemon=True)
        watcher.start()
        yield
        stop.set()
        watcher.join(timeout=10)

    app = FastAPI(title="Fruits! identify", version="1", lifespan=lifespan,
                  description="Which fruit is this? Nearest neighbours of the photo in the pipeline's PCA space.")
    app.add_middleware(CORSMiddleware, allow_origins=list(cfg.identify.cors_origins), allow_methods=["GET", "POST", "DELETE"],
                       allow_headers=["*"])

    @app.middleware("http")
    async def refuse_large_bodies(request: Request, call_next):
        """413 before the body is read: the form parser would otherwise spool any size to disk first."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
            return JSONResponse({"detail": f"the photo is larger than {cfg.identify.max_upload_mb} MB"}, status_code=413)
        return await call_next(request)

    @app.get("/health", response_model=Health)
    def health(request: Request) -> Health:
        snapshot = request.app.state.identifier.current
        return Health(status="ok", model=request.app.state.identifier.model, index_version=snapshot.version,
                      index_vectors=len(snapshot.index.vectors), labels=len(snapshot.labels))

    @app.post("/identify", response_model=Answer, responses={
        400: {"description": "empty upload"}, 413: {"description": "larger than identify.max_upload_mb"},
        415: {"description": "not an image content type"}, 422: {"description": "not a readable image"}})
    async def identify(request: Request, photo: UploadFile = File(..., description="a photo of one fruit"),
                       accept_language: str | None = Header(None)) -> Answer:
        content = await read_photo(photo, cfg.identify.max_upload_mb)
        try:
            return Answer(**await run_in_threadpool(request.app.state.identifier.identify, content,
                                                    preferred_language(accept_language)))
        except BadPhoto as err:
            raise HTTPException(422, f"cannot read the photo: {err}") from err

    app.include_router(index_routes())
    app.include_router(contribution_routes(cfg))

    app.include_router(page_routes())
    return app


def page_routes() -> APIRouter:
    """GET / (the one-page UI) and GET /example.jpg, a real photo to try it with: a Fruits-360 Test photo
    of the demo's sample (samples/SOURCE.md), credited on the page."""
    router = APIRouter(include_in_schema=False)
    static = resources.files("fruits.app").joinpath("static")
    page, example = static.joinpath("index.html").read_text(encoding="utf-8"), static.joinpath("example.jpg").read_bytes()

    @router.get("/", response_class=HTMLResponse)
    def home() -> str:
        return page

    @router.get("/example.jpg", response_class=Response)
    def example_photo() -> Response:
        return Response(example, media_type="image/jpeg")

    return router


def watch_index(identifier: Identifier, seconds: float, stop: threading.Event) -> None:
    """Each worker process looks for a newly committed index every identify.index_poll_seconds and
    swaps to it between requests (Identifier.refresh); loading never holds up a request."""
    while not stop.wait(seconds):
        try:
            identifier.refresh()
        except Exception:  # a watcher that dies would leave the worker on its old index for good
            log.exception("looking for a new index failed; trying again in %s s", seconds)


async def read_photo(photo: UploadFile, max_upload_mb: float) -> bytes:
    """The uploaded photo's bytes, or the 4xx that says why not (415, 400, 413)."""
    limit = int(max_upload_mb * 2**20)
    content_type = (photo.content_type or "").split(";")[0].strip().lower()
    if content_type not in ACCEPTED_TYPES:
        raise HTTPException(415, f"content type {content_type or 'missing'} is not an image type; send one of "
                                 f"{', '.join(ACCEPTED_TYPES)}")
    content = await photo.read(limit + 1)
    if not content:
        raise HTTPException(400, "the photo is empty (0 bytes)")
    if len(content) > limit:
        raise HTTPException(413, f"the photo is larger than {max_upload_mb} MB")
    return content


def index_routes() -> APIRouter:
    """GET /labels and GET /images/{path}: what the current index holds, for the page."""
    router = APIRouter()

    @router.get("/labels", response_model=Labels)
    def labels(request: Request) -> Labels:
        snapshot = request.app.state.identifier.current
        return Labels(labels=snapshot.labels, index_version=snapshot.version)

    @router.get("/images/{path:path}", response_class=Response, responses={
        200: {"content": {"image/jpeg": {}}, "description": "the image, at most contributions.thumbnail_px"},
        404: {"description": "not a Training image of the current index (or erased since it was built)"},
        422: {"description": "the index's file there is not a readable image"}})
    async def image(path: str, request: Request) -> Response:
        try:
            content = await run_in_threadpool(request.app.state.identifier.thumbnail, path)
        except FileNotFoundError:
            raise HTTPException(404, "no such image in the index") from None
        except RejectedImage as err:
            raise HTTPException(422, f"the index's image {path} cannot be read: {err}") from None
        # private and short-lived: an image erased from the collection must not live on in shared caches
        return Response(content, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=300"})

    return router


def contribution_routes(cfg: DictConfig) -> APIRouter:
    """POST /contributions and DELETE /contributions/{id} (fruits.app.contributions holds the store)."""
    router = APIRouter()
    store = ContributionStore(cfg)
    rate = parse_rate(cfg.contributions.rate_limit)
    limiter = MovingWindowRateLimiter(MemoryStorage())  # per worker process: no shared store to run

    @router.post("/contributions", status_code=201, response_model=Contribution, responses={
        400: {"description": "no consent, or an empty upload"}, 413: {"description": "larger than identify.max_upload_mb"},
        415: {"description": "not an image content type"}, 422: {"description": "not a readable image, or not a fruit name"},
        429: {"description": "this client sent contributions.rate_limit already"},
        507: {"description": "contributions.max_pending photos wait for review already"}})
    async def contribute(request: Request, photo: UploadFile = File(..., description="a photo of one fruit"),
                         label: str = Form(..., description="the fruit, as its author names it: a known label or a new name"),
                         consent: bool = Form(False, description="the author agrees that the photo joins the collection")
                         ) -> Contribution:
        client = request.client.host if request.client else "unknown"
        if not limiter.hit(rate, "contributions", client):
            reset = limiter.get_window_stats(rate, "contributions", client).reset_time
            raise HTTPException(429, f"at most {cfg.contributions.rate_limit} contributions per client: try again later",
                                headers={"Retry-After": str(max(1, int(reset - time.time())))})
        if not consent:
            raise HTTPException(400, "consent=true is required to contribute a photo: without it nothing is stored")
        content = await read_photo(photo, cfg.identify.max_upload_mb)
        identifier: Identifier = request.app.state.identifier
        try:
            label = normalise_label(label, identifier.labels)
        except BadContribution as err:
            raise HTTPException(422, str(err)) from err
        if await run_in_threadpool(store.pending) >= cfg.contributions.max_pending:
            raise HTTPException(507, f"{cfg.contributions.max_pending} contributions wait for review already "
                                     "(contributions.max_pending): try again later")
        try:
            answer = await run_in_threadpool(identifier.identify, content)
        except BadPhoto as err:
            raise HTTPException(422, f"cannot read the photo: {err}") from err
        try:
            record, token = await run_in_threadpool(store.add, content, label, answer)
        except BadContribution as err:
            raise HTTPException(422, str(err)) from err
        return Contribution(id=record["id"], deletion_token=token, label=record["label"], status=record["status"],
                            model_answer=ModelAnswer(**record["model_answer"]))

    @router.delete("/contributions/{contribution_id}", status_code=204, responses={
        404: {"description": "no contribution with this id and deletion token (which of the two is not said)"}})
    def erase(contribution_id: str, x_deletion_token: str | None = Header(None)) -> Response:
        if not x_deletion_token or not store.erase(contribution_id, x_deletion_token):
            raise HTTPException(404, "no contribution with this id and deletion token")
        return Response(status_code=204)

    return router


def listening_socket(host: str, port: int) -> socket.socket:
    """The listener the worker processes share, created as TCP explicitly. uvicorn's own
    (Config.bind_socket, used with --workers > 1) leaves proto at 0, so asyncio never sets TCP_NODELAY
    on the connections it accepts, and each keep-alive response waits ~40 ms for the client's delayed
    ACK (uvicorn issue #3149; measured here: 12 ms per photo with 1 worker, 53 ms with 2)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((host, port))
    listener.set_inheritable(True)
    return listener


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    parser = argparse.ArgumentParser(description="Serve identify over HTTP (uvicorn).")
    parser.add_argument("--params", default=None, help="composed config (default: params.yaml)")
    parser.add_argument("overrides", nargs="*", help="Hydra-grammar overrides, e.g. identify.port=9000")
    args = parser.parse_args(argv)
    cfg = load_config(args.overrides, args.params)  # validated here, before any worker starts
    os.environ[SETTINGS_VARIABLE] = json.dumps({"params": args.params, "overrides": args.overrides})
    config = uvicorn.Config("fruits.app.service:create_app", factory=True, host=cfg.identify.host,
                            port=cfg.identify.port, workers=cfg.identify.workers, log_level="info")
    if config.workers > 1:
        Multiprocess(config, sockets=[listening_socket(config.host, config.port)]).run()
    else:
        uvicorn.Server(config).run()


if __name__ == "__main__":
    run_command(main)
