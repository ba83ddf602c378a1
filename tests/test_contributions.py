"""Contributed photos without the service: metadata stripped, labels normalised, the quarantine, the
review and the erasure, on local disk and in the S3 server (the service's endpoints: test_service.py)."""

import io
import json
import subprocess
import sys

import pytest
from PIL import Image
from PIL.ExifTags import IFD

from fruits.app.contributions import BadContribution, ContributionStore, clean_photo, normalise_label
from fruits.core.config import PROJECT_ROOT
from fruits.core.errors import ConfigError
from fruits.core.storage import Storage

from helpers.project import make_cfg
from helpers.data import phone_photo

KNOWN = ["Apple Red", "Banana", "Kiwi", "Pear"]
ANSWER = {"label": "Kiwi", "confidence": 0.8}


def test_the_stored_photo_keeps_its_pixels_upright_and_nothing_else():
    original = phone_photo()
    with Image.open(io.BytesIO(original)) as sent:  # the test photo does carry all of it
        assert sent.getexif().get_ifd(IFD.GPSInfo) and "xmp" in sent.info and "icc_profile" in sent.info
    photo, thumbnail = clean_photo(original, max_side=1024, thumbnail_side=32)
    for stored in (photo, thumbnail):
        for trace in (b"Exif", b"FruitPhone", b"MAKERNOTE", b"48,51", b"xmpmeta", b"rue des Fruits", b"ICC_PROFILE"):
            assert trace not in stored, trace
        with Image.open(io.BytesIO(stored)) as image:
            assert not image.getexif() and not {"exif", "xmp", "icc_profile", "comment"} & set(image.info)
    with Image.open(io.BytesIO(photo)) as image:
        assert image.size == (80, 120)  # turned upright as the orientation said, before the tag was dropped
    with Image.open(io.BytesIO(thumbnail)) as image:
        assert max(image.size) == 32


def test_a_large_photo_is_stored_at_the_configured_size():
    out = io.BytesIO()
    Image.new("RGB", (3000, 1500), (10, 20, 30)).save(out, "JPEG")
    with Image.open(io.BytesIO(clean_photo(out.getvalue(), 1024, 128)[0])) as image:
        assert image.size == (1024, 512)


@pytest.mark.parametrize(("given", "stored"), [
    ("kiwi", "Kiwi"), ("  apple   RED ", "Apple Red"), ("granny smith", "Granny Smith"),
    ("Pomme d'api", "Pomme D'api"), ("Physalis with husk", "Physalis With Husk"), ("Cherry-2", "Cherry-2"),
])
def test_a_label_is_a_known_one_whatever_its_case_or_a_checked_new_name(given, stored):
    assert normalise_label(given, KNOWN) == stored


@pytest.mark.parametrize("given", ["", " ", "x", "../etc/passwd", "Kiwi/../../x", "a" * 41, "<script>", "Kiwi_1",
                                   "2 kiwis", "Kiwi  -", "Kiwi\x00"])
def test_a_label_that_is_no_fruit_name_is_refused_with_the_reason(given):
    with pytest.raises(BadContribution, match="not a fruit name"):
        normalise_label(given, KNOWN)


def test_quarantine_review_and_erasure_on_local_disk(tmp_path):
    cfg = make_cfg(tmp_path)
    store = ContributionStore(cfg)
    record, token = store.add(phone_photo(), "Kiwi", ANSWER)
    root = tmp_path / "data" / "contributions"
    quarantined = root / "quarantine" / "Training" / "Kiwi" / f"{record['id']}.jpg"
    assert record["status"] == "pending" and quarantined.is_file() and store.pending() == 1
    saved = json.loads((root / "records" / f"{record['id']}.json").read_text())
    assert token not in json.dumps(saved) and saved["token_sha256"] != token  # only its hash is kept
    assert not (root / "approved").exists()  # not a pipeline input before review

    listed = subprocess.run([sys.executable, "-m", "fruits.app.contributions", "list", "--params", str(params(cfg, tmp_path))],
                            capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert record["id"] in listed.stdout and "Kiwi (80%)" in listed.stdout and f"thumbnails/{record['id']}.jpg" in listed.stdout

    assert store.approve(record["id"])["status"] == "approved"
    approved = root / "approved" / "Training" / "Kiwi" / f"{record['id']}.jpg"
    assert approved.is_file() and not quarantined.exists() and store.pending() == 0
    assert store.approve(record["id"])["status"] == "approved"  # twice: nothing changes

    # Erasure: a wrong or missing token erases nothing; the right one erases photo, thumbnail and record.
    assert not store.erase(record["id"], "not-the-token") and approved.is_file()
    assert not store.erase("0" * 32, token) and not store.erase("../records/x", token)
    assert store.erase(record["id"], token)
    assert not [path for path in root.rglob("*") if path.is_file()]
    assert not store.erase(record["id"], token)


def test_an_approval_cut_short_is_finished_by_the_next_one(tmp_path):
    store = ContributionStore(make_cfg(tmp_path))
    record, _ = store.add(phone_photo(), "Kiwi", ANSWER)
    real_remove = store.remove
    store.remove = lambda relative: (_ for _ in ()).throw(OSError("killed"))  # dies before the quarantined copy goes
    with pytest.raises(OSError):
        store.approve(record["id"])
    store.remove = real_remove
    assert store.record(record["id"])["status"] == "approved"
    store.approve(record["id"])
    root = tmp_path / "data" / "contributions"
    assert not list((root / "quarantine").rglob("*.jpg")) and len(list((root / "approved").rglob("*.jpg"))) == 1


def test_the_auto_approve_rule_needs_the_model_to_agree_at_the_threshold(tmp_path):
    store = ContributionStore(make_cfg(tmp_path, "contributions.auto_approve_at=0.9"))
    assert store.add(phone_photo(), "Kiwi", {"label": "Kiwi", "confidence": 0.95})[0]["status"] == "approved"
    assert store.add(phone_photo(), "Kiwi", {"label": "Kiwi", "confidence": 0.85})[0]["status"] == "pending"
    assert store.add(phone_photo(), "Banana", {"label": "Kiwi", "confidence": 1.0})[0]["status"] == "pending"
    approved = [record for record in store.records() if record["status"] == "approved"]
    assert len(approved) == 1 and approved[0]["review"].startswith("auto: the model agrees")


def test_reject_erases_and_an_unknown_id_is_named(tmp_path):
    cfg = make_cfg(tmp_path)
    store = ContributionStore(cfg)
    record, _ = store.add(phone_photo(), "Kiwi", ANSWER)
    command = [sys.executable, "-m", "fruits.app.contributions", "--params", str(params(cfg, tmp_path))]
    done = subprocess.run([*command, "reject", record["id"], "f" * 32], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 1 and f"rejected {record['id']}" in done.stdout and f"no contribution {'f' * 32!r}" in done.stderr
    assert store.record(record["id"]) is None and not list((tmp_path / "data" / "contributions").rglob("*.jpg"))
    done = subprocess.run([*command, "approve"], capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 2 and "IDS=" in done.stderr


def test_contributions_in_the_eu_bucket_are_encrypted_and_erased(tmp_path, s3_endpoint):
    import boto3

    from fruits.cloud import bucket

    cfg = make_cfg(tmp_path, "storage=s3", f"storage.endpoint_url={s3_endpoint}", "storage.bucket=fruits-contrib-test",
                   "env.paths.contributions=${storage.uris.root}/contributions")
    bucket.run(cfg)
    store = ContributionStore(cfg)
    record, token = store.add(phone_photo(), "Kiwi", ANSWER)
    s3 = boto3.client("s3", endpoint_url=s3_endpoint, region_name="eu-west-3")
    key = f"{cfg.storage.prefix}/contributions/{record['photo']}"
    assert s3.head_object(Bucket=cfg.storage.bucket, Key=key)["ServerSideEncryption"] == "AES256"
    store.approve(record["id"])
    assert store.erase(record["id"], token)
    left = s3.list_objects_v2(Bucket=cfg.storage.bucket, Prefix=f"{cfg.storage.prefix}/contributions/").get("KeyCount")
    assert left == 0


def test_approved_photos_must_be_where_the_store_writes_them(tmp_path):
    with pytest.raises(ConfigError, match="env.paths.approved=.* is not inside env.paths.contributions"):
        ContributionStore(make_cfg(tmp_path, f"env.paths.approved={tmp_path / 'elsewhere'}"))


@pytest.mark.slow
def test_an_approved_photo_is_featurized_alone_answered_with_its_label_then_erased(spark, tiny_cfg, tmp_path):
    """The loop: a photo with a new label contributed and approved; the next sample and featurize runs
    compute it alone, the index counts it and the app answers it with its label; erased, the next runs
    drop its row."""
    from fruits.app.identify import Identifier
    from fruits.core import tables
    from fruits.stages import featurize, index, ingest, pca, report, sample
    from fruits.stages.sample import draw_fruit

    cfg = tiny_cfg
    cfg.data.root = cfg.env.paths.images = str(tmp_path / "images")  # a sample of its own, with the tiny weights
    assert sample.run(cfg)["contributed"] == 0
    assert featurize.run(cfg, spark)["run"]["computed"] == 32

    photo = io.BytesIO()
    draw_fruit("Lemon", 4242).rotate(30, fillcolor="white").save(photo, "JPEG")
    store = ContributionStore(cfg)
    record, token = store.add(photo.getvalue(), "Yuzu", ANSWER)
    assert sample.run(cfg)["contributed"] == 0  # in quarantine: not an input
    record = store.approve(record["id"])
    manifest = sample.run(cfg)
    assert (manifest["contributed"], manifest["images"]) == (1, 33) and "Yuzu" in manifest["labels"]
    ingest.run(cfg)
    run = featurize.run(cfg, spark)["run"]
    assert (run["computed"], run["reused"]) == (1, 32), run
    pca.run(cfg, spark)
    metrics = index.run(cfg, spark)
    assert (metrics["training_vectors"], metrics["contributed_vectors"]) == (25, 1)
    stored = (tmp_path / "data" / "contributions" / record["photo"]).read_bytes()
    assert Identifier(cfg).identify(stored)["label"] == "Yuzu"

    report.run(cfg, spark)
    traces = [record["id"], record["sha256"]]  # its path names its id; the tables keep its sha256
    held = {part for path in holding(tmp_path, traces) for part in path.parts}  # found where it must be
    assert {"images", "features", "vectors", "knn_index.npz", "contributions"} <= held, held

    assert store.erase(record["id"], token)
    assert sample.run(cfg)["contributed"] == 0
    ingest.run(cfg)
    run = featurize.run(cfg, spark)["run"]
    assert (run["deleted"], run["computed"]) == (1, 0), run
    paths = [row["path"] for row in tables.read(spark, cfg.env.paths.features, Storage.of(cfg)).select("path").collect()]
    assert len(paths) == 32 and not [path for path in paths if record["id"] in path]
    pca.run(cfg, spark)
    index.run(cfg, spark)
    report.run(cfg, spark)
    assert holding(tmp_path, traces) == []  # every output, every table version on disk, the store


def holding(root, traces: list[str]) -> list:
    """The files under root in which any trace appears: in the file's path, a Parquet file's strings
    (every file, whatever table version it belongs to), an .npz's string arrays, or any other file's
    bytes (the report, metrics, manifests, records)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    found = set()
    for path in (p for p in root.rglob("*") if p.is_file()):
        if path.suffix == ".parquet":
            table = pq.read_table(path)
            text = " ".join(str(value) for field in table.schema if pa.types.is_string(field.type)
                            for value in table[field.name].to_pylist())
        elif path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as arrays:
                text = " ".join(" ".join(arrays[name].ravel()) for name in arrays.files if arrays[name].dtype.kind == "U")
        else:
            text = path.read_bytes().decode("latin-1")
        if any(trace in str(path) or trace in text for trace in traces):
            found.add(path.relative_to(root))
    return sorted(found)


def params(cfg, folder):
    from omegaconf import OmegaConf

    path = folder / "params.yaml"
    OmegaConf.save(cfg, path)
    return path
