"""Fine-tuning end to end with the real recognizer: conversion, freezing, resume, export, gate, registry, hot-swap."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from face_assets import load_settings
from face_assets.errors import ModelVersionError
from face_assets.evaluation import all_pairs, calibrate_threshold, gate, identity_metrics, operating_point, pair_metrics
from face_assets.imaging import load_image
from face_assets.library import FaceRecognitionLibrary
from face_assets.models import _graph_role, builtin_pack
from face_assets import training as T

pytestmark = pytest.mark.training  # torch: conversion, fine-tuning runs, the scenario benchmark

REPO = Path(__file__).resolve().parents[1]
TINY = {"epochs": 2, "batch_size": 8, "steps_per_epoch": 2, "triplets_per_batch": 2, "freeze": "last_blocks",
        "trainable_blocks": 2, "lr": 1e-4, "val_fraction": 0.5, "threads": 2}


@pytest.fixture(scope="module")
def faces(datasets):
    """Four LFW persons x four images: paths, main-face boxes and aligned crops (detected once)."""
    settings = load_settings()
    from face_assets.analysis import FaceAnalyzer

    analyzer = FaceAnalyzer(settings)
    root = datasets / "real" / "lfw10"
    rows = []
    for person in sorted(p.name for p in root.iterdir() if p.is_dir())[:4]:
        for path in sorted((root / person).glob("*.jpg"))[:4]:
            img = load_image(path)
            found, _ = analyzer.detector.predict([img])[0]
            rows.append((person, path, [float(v) for v in found[0].bbox[:4]], analyzer.recognizer.align(img, found[0].kps)))
    return {"persons": [r[0] for r in rows], "paths": [r[1] for r in rows], "boxes": [r[2] for r in rows],
            "crops": np.asarray([r[3] for r in rows]), "recognizer": analyzer.recognizer}


def write_pairs(faces, path: Path) -> Path:
    """Every pair of the fixture's faces in the feedback export's pairs.parquet contract."""
    idx = list(combinations(range(len(faces["paths"])), 2))
    same = [faces["persons"][i] == faces["persons"][j] for i, j in idx]
    pl.DataFrame({
        "query_id": [f"q{i}" for i, _ in idx],
        "query_path": [str(faces["paths"][i]) for i, _ in idx],
        "query_bbox": [faces["boxes"][i] for i, _ in idx],
        "query_face_id": pl.Series([None] * len(idx), dtype=pl.Int64),
        "result_face_id": pl.Series([j for _, j in idx], dtype=pl.Int64),
        "result_path": [str(faces["paths"][j]) for _, j in idx],
        "result_bbox": [faces["boxes"][j] for _, j in idx],
        "label": pl.Series([int(s) for s in same], dtype=pl.Int8),
        "similarity": pl.Series([0.0] * len(idx), dtype=pl.Float32),
        "source": ["vote_up" if s else "vote_down" for s in same],
        "model_version": ["test"] * len(idx),
    }).write_parquet(path)
    return path


def tiny_settings(tmp_path: Path, datasets: Path, **extra):
    return load_settings(overrides={"storage": {"data_dir": str(tmp_path)},
                                    "training": TINY | {"general_eval_dirs": [str(datasets / "real" / "dlib_johns")]} | extra})


def test_conversion_matches_onnxruntime_and_prelu_slopes_train(faces):
    model = T.to_torch(builtin_pack().recognizer)
    diff = T.verify_conversion(model, faces["recognizer"], faces["crops"], 1e-4)
    assert diff <= 1e-4
    slopes = [n for n, _ in model.named_parameters() if "initializer" in n]
    assert len(slopes) == 34  # every PReLU of MobileFaceNet
    assert not [n for n, _ in model.named_buffers() if "initializer" in n]
    T.apply_freeze(model, "none", 0)
    emb = model(T.to_blob(faces["crops"][:2], 127.5, 127.5))
    emb.sum().backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if n in slopes)


def test_freeze_strategies_and_batchnorm_stays_in_eval(faces):
    model = T.to_torch(builtin_pack().recognizer)
    units, head = T.blocks(model)
    head_only = T.apply_freeze(model, "head", 0)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(head)
    two = T.apply_freeze(model, "last_blocks", 2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(head) | set(units[-1]) | set(units[-2]) and two > head_only
    assert T.apply_freeze(model, "none", 0) == sum(p.numel() for p in model.parameters())

    T.apply_freeze(model, "head", 0)
    T.set_train_mode(model)
    bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm1d)][0]
    assert model.training and not bn.training
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    running = bn.running_mean.clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model(T.to_blob(faces["crops"][:4], 127.5, 127.5)).pow(2).sum().backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and changed <= set(head)
    assert torch.equal(bn.running_mean, running)


def test_export_matches_pytorch_and_insightface_loads_it(faces, tmp_path):
    settings = load_settings()
    model = T.to_torch(builtin_pack().recognizer)
    with torch.no_grad():  # a changed head, so the check is not of an untouched copy
        model.get_submodule(T.blocks(model)[1][0].rsplit(".", 1)[0]).weight.mul_(1.01)
    path = T.export_onnx(model, builtin_pack().recognizer, tmp_path / "m.onnx")
    assert T.verify_export(model, path, faces["crops"], settings) <= 1e-4
    assert _graph_role(path) == "recognizer"  # a pack folder would recognise it too


def test_checkpoint_resume_gives_the_uninterrupted_result(faces, tmp_path, datasets):
    settings = tiny_settings(tmp_path, datasets, freeze="head")
    crops = faces["crops"]
    original, _ = faces["recognizer"].predict(list(crops))
    refs = {i: T.FaceRef(str(p), tuple(b)) for i, (p, b) in enumerate(zip(faces["paths"], faces["boxes"]))}
    data = T.FeedbackData(pairs=[(refs[i], refs[j], int(faces["persons"][i] == faces["persons"][j]), "t")
                                 for i, j in combinations(refs, 2)])
    train, val, _ = T.split_by_person(data, {r.key: i for i, r in refs.items()}, 0.5, 0)
    assert len(train.pairs) and len(val.pairs)
    train_persons = {faces["persons"][i] for i in train.pairs[:, :2].ravel()}
    assert not train_persons & {faces["persons"][i] for i in val.pairs[:, :2].ravel()}

    def trainer(run: str) -> T.Trainer:
        return T.Trainer(settings, T.to_torch(builtin_pack().recognizer), crops, original, train, val,
                         tmp_path / run, 127.5, 127.5)

    straight = trainer("a")
    straight.fit()

    def stop(epoch, _row):
        if epoch == 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        trainer("b").fit(stop)
    resumed = trainer("b")
    assert resumed.resume() and resumed.start_epoch == 1
    resumed.fit()
    assert [r["epoch"] for r in resumed.history] == [1, 2]
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), name
    logged = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert len(logged) == 2 and "val_auc" in logged[0] and (tmp_path / "b" / "curves.png").stat().st_size > 1000
    assert pl.read_csv(tmp_path / "b" / "metrics.csv").height == 2


def test_metrics_and_gate():
    emb = np.eye(4, dtype=np.float32)[[0, 0, 1, 1, 2]]
    m = identity_metrics(emb, np.array(["a", "a", "b", "b", "c"]))
    assert m["auc"] == 1.0 and m["rank1"] == 1.0 and m["tar_at_far"] == 1.0
    p = pair_metrics(np.array([0.9, 0.1, 0.2, 0.3]), np.array([1, 1, 0, 0]), threshold=0.25)
    assert p["accuracy"] == 0.5 and p["auc"] == 0.5

    general = {"auc": 0.99, "tar_at_far": 0.90, "rank1": 0.95}
    current = {"feedback": {"auc": 0.90, "tar_at_far": 0.5, "accuracy": 0.8}, "general": general}
    better = {"feedback": {"auc": 0.95, "tar_at_far": 0.5, "accuracy": 0.9}, "general": general | {"rank1": 0.946}}
    assert gate(better, current, 0.005).passed  # 0.4 point lower rank-1 is within the tolerance
    assert not gate(better | {"general": general | {"tar_at_far": 0.894}}, current, 0.005).passed
    assert not gate(current, current, 0.005).passed  # no improvement on the feedback pairs
    mixed = {"feedback": {"auc": 0.99, "tar_at_far": 0.4, "accuracy": 0.9}, "general": general}
    assert not gate(mixed, current, 0.005).passed
    assert not gate({"feedback": {}, "general": general}, current, 0.005).passed


def test_threshold_calibration_and_operating_point_interval():
    impostor = np.linspace(-0.2, 0.4, 2001)
    thr = calibrate_threshold(impostor, 1e-3)
    assert np.sum(impostor >= thr) == 2 and thr > impostor[-3]  # floor(1e-3 * 2001) accepted, no more
    single = np.float32([0.1, 0.27598003, 0.3, 0.2])  # float32 scores, as the embeddings give
    assert np.sum(single >= calibrate_threshold(single, 0.5)) == 2  # not 3: strictly above the float32 0.2, not on it

    # 40 persons x 5 faces; the candidate accepts 30 more impostor pairs spread over many persons
    labels = np.repeat(np.arange(40), 5)
    i, j, same = all_pairs(labels)
    rng = np.random.default_rng(0)
    current = np.where(same, 0.6, 0.0) + rng.normal(0, 0.05, len(i))
    candidate = current.copy()
    raised = rng.choice(np.flatnonzero(~same), 30, replace=False)
    candidate[raised] = 0.5
    op = operating_point(i, j, same, labels, (current, 0.3), (candidate, 0.3), rounds=300)
    assert op["far"]["candidate_errors"] - op["far"]["current_errors"] == 30
    assert op["far"]["interval"][0] > 0 and op["frr"]["interval"][0] <= 0 <= op["frr"]["interval"][1]
    # the same 30 false accepts all between two persons: carried by them alone, inside the noise
    pair_of_two = np.flatnonzero(~same & (labels[i] == 0) & (labels[j] == 1))[:25]
    lumped = current.copy()
    lumped[pair_of_two] = 0.5
    op2 = operating_point(i, j, same, labels, (current, 0.3), (lumped, 0.3), rounds=300)
    assert op2["far"]["candidate_errors"] > op2["far"]["current_errors"] and op2["far"]["interval"][0] <= 0


def test_gate_rejects_more_false_accepts_at_the_operating_point_despite_better_auc():
    labels = np.repeat(np.arange(30), 4)
    i, j, same = all_pairs(labels)
    rng = np.random.default_rng(1)
    current = np.where(same, 0.55, 0.05) + rng.normal(0, 0.1, len(i))
    # the candidate separates the classes better (higher AUC) but lifts every score: at its threshold
    # (the one it would run with, here the current one) far more impostors pass
    candidate = np.where(same, 0.75, 0.2) + rng.normal(0, 0.06, len(i))
    auc = [pair_metrics(s, same, 0.3)["auc"] for s in (current, candidate)]
    assert auc[1] > auc[0]
    op = {"feedback": operating_point(i, j, same, labels, (current, 0.3), (candidate, 0.3), rounds=300)}
    general = {"auc": 0.99, "tar_at_far": 0.9, "rank1": 0.95}
    cur = {"feedback": pair_metrics(current, same, 0.3), "general": general}
    cand = {"feedback": pair_metrics(candidate, same, 0.3) | {"accuracy": cur["feedback"]["accuracy"] + 0.01},
            "general": general}
    assert gate(cand, cur, 0.005).passed  # the old checks alone let it through
    verdict = gate(cand, cur, 0.005, op)
    assert not verdict.passed and verdict.failed == ["operating.feedback.far"]
    assert any("rises beyond the interval" in r and "FAR" in r for r in verdict.reasons)
    # at a threshold calibrated for it the same candidate keeps the false accepts down and passes
    thr = calibrate_threshold(candidate[~same], (current[~same] >= 0.3).mean())
    op = {"feedback": operating_point(i, j, same, labels, (current, 0.3), (candidate, thr), rounds=300)}
    assert gate(cand, cur, 0.005, op).passed


def test_split_and_crop_order_do_not_depend_on_where_the_data_lies(faces, tmp_path):
    copies = {}
    for k, path in enumerate(faces["paths"]):  # the same images in another folder, under other names
        copies[path] = tmp_path / f"copy-{len(faces['paths']) - k:02d}.jpg"
        copies[path].write_bytes(path.read_bytes())

    def split(paths):
        refs = [T.FaceRef(str(p), tuple(b)) for p, b in zip(paths, faces["boxes"])]
        data = T.FeedbackData(pairs=[(refs[i], refs[j], int(faces["persons"][i] == faces["persons"][j]), "t")
                                     for i, j in combinations(range(len(refs)), 2)])
        stable = T.stable_ids(refs)
        keys = sorted(stable, key=lambda k: (stable[k], k))
        train, val, dropped = T.split_by_person(data, {k: n for n, k in enumerate(keys)}, 0.5, 3, stable)
        return ([[stable[keys[a]], stable[keys[b]], label] for a, b, label in train.pairs],
                [[stable[keys[a]], stable[keys[b]], label] for a, b, label in val.pairs], dropped)

    here, there = split(faces["paths"]), split([copies[p] for p in faces["paths"]])
    assert here[1] and here == there


def test_train_registry_promote_rollback_and_hot_swap(faces, tmp_path, datasets):
    settings = tiny_settings(tmp_path / "data", datasets)
    pairs = write_pairs(faces, tmp_path / "pairs.parquet")
    gallery = faces["paths"][::2]
    with FaceRecognitionLibrary(settings=settings) as lib:
        lib.index_batch(gallery)
        base_tag = lib.model_version
        before = lib.search(faces["paths"][0], top_k=3)
        assert before[0].path == str(gallery[0])
        assert [r["version"] for r in lib.list_models()] == ["base"] and lib.list_models()[0]["active"]

        result = lib.train(pairs)
        assert result.conversion_max_diff <= 1e-4 and result.export_max_diff <= 1e-4
        assert result.data["faces"] == 16 and result.data["val_pairs"] > 0
        assert (Path(result.run_dir) / "curves.png").is_file()
        row = {r["version"]: r for r in lib.list_models()}[result.version]
        assert row["parent"] == "base" and row["status"] == ("candidate" if result.passed_gate else "rejected")
        assert (settings.storage.data_dir / row["path"]).is_file() and row["path"].startswith("models/versions/")
        base_threshold = lib.match_threshold
        assert base_threshold == settings.search.match_threshold  # the pack's recognizer runs the configured one
        assert row["match_threshold"] == row["metrics"]["match_threshold"] == result.match_threshold != base_threshold
        assert set(row["metrics"]["operating_point"]) == {"feedback", "general"} and "failed" in row["metrics"]["gate"]
        assert lib.train(pairs).version == result.version  # the finished run is found, not redone
        if not result.passed_gate:
            with pytest.raises(ModelVersionError):
                lib.promote(result.version)

        errors, versions_seen = [], []

        def searcher():
            for _ in range(6):
                try:
                    hits = lib.search(faces["paths"][2], top_k=4)
                    ids = [h.face_id for h in hits]
                    rows = lib.catalog.query("SELECT DISTINCT model_version FROM faces WHERE face_id IN (SELECT unnest(?))", [ids])
                    versions_seen.append({r[0] for r in rows})
                except Exception as exc:  # noqa: BLE001 - the test reports any failure of a concurrent search
                    errors.append(exc)

        thread = threading.Thread(target=searcher)
        thread.start()
        summary = lib.promote(result.version, force=True)
        thread.join()
        assert not errors and all(len(v) <= 1 for v in versions_seen)
        assert summary.total == len(gallery)
        new_tag = lib.model_version
        assert new_tag != base_tag and result.version in new_tag and lib.active_model == result.version
        tags = {r[0] for r in lib.catalog.query("SELECT DISTINCT model_version FROM faces")}
        assert tags == {new_tag} and len(lib.index) == len(gallery)
        after = lib.search(faces["paths"][0], top_k=4)
        assert after[0].path == str(gallery[0])
        assert lib.match_threshold == result.match_threshold  # the promoted version's threshold runs with it
        assert [h.is_match for h in after] == [h.similarity >= result.match_threshold for h in after]
        assert lib.compare(faces["paths"][0], faces["paths"][1]).threshold == result.match_threshold
        assert {r["version"]: r["status"] for r in lib.list_models()} == {"base": "retired", result.version: "promoted"}

    with FaceRecognitionLibrary(settings=settings) as lib:  # the promotion survives a restart
        assert lib.active_model == result.version and lib.model_version == new_tag
        assert lib.match_threshold == result.match_threshold
        assert lib.rollback() == "base"
        assert lib.model_version == base_tag
        assert lib.match_threshold == base_threshold  # the rollback restores the previous version's threshold
        assert lib.compare(faces["paths"][0], faces["paths"][1]).threshold == base_threshold
        hits = lib.search(faces["paths"][0], top_k=4)
        assert [h.is_match for h in hits] == [h.similarity >= base_threshold for h in hits]
        assert {r[0] for r in lib.catalog.query("SELECT DISTINCT model_version FROM faces")} == {base_tag}
        assert lib.search(faces["paths"][0], top_k=1)[0].path == str(gallery[0])
        with pytest.raises(ModelVersionError):
            lib.rollback("no-such-version")
        if not result.passed_gate:  # retired after the rollback, still refused without force
            with pytest.raises(ModelVersionError):
                lib.promote(result.version)

    cli = [sys.executable, "-m", "face_assets.cli", "--data-dir", str(settings.storage.data_dir), "model"]
    listed = json.loads(subprocess.run(cli + ["list", "--json"], cwd=REPO, capture_output=True, text=True,
                                       check=True).stdout)
    assert {r["version"]: r["active"] for r in listed} == {"base": True, result.version: False}
    by_version = {r["version"]: r for r in listed}
    assert by_version["base"]["match_threshold"] == base_threshold
    assert by_version[result.version]["match_threshold"] == result.match_threshold
    assert by_version[result.version]["metrics"]["gate"]["passed"] == result.passed_gate


def test_scenario_votes_on_mistakes_improve_held_out_persons(tmp_path, datasets):
    """The benchmark scenario, small: 3 IMFDB persons, 12 images each, a short run, judged at the operating point."""
    import os

    env = os.environ | {"FACE_ASSETS__TRAINING__EPOCHS": "2", "FACE_ASSETS__TRAINING__THREADS": "2",
                        "FACE_ASSETS__TRAINING__GENERAL_EVAL_DIRS": json.dumps([str(datasets / "real" / "dlib_johns")])}
    out = subprocess.run([sys.executable, "benchmarks/finetune_scenario.py", "--voters", "3", "--per-person", "12",
                          "--max-pairs", "120", "--out", str(tmp_path), "--json"],
                         cwd=REPO, capture_output=True, text=True, env=env, check=True)
    report = json.loads(out.stdout)
    held = report["held_out"]
    assert report["data"]["train_pairs"] > 0 and report["voters"] == 3
    assert held["fine_tuned"]["auc"] >= held["base"]["auc"] - 0.005
    for kind in ("far", "frr"):  # at their own thresholds, no error rate rises beyond its interval
        assert held["operating_point"][kind]["interval"][0] <= 0
    assert report["general_operating_point"]["far"]["candidate"] <= 1e-3  # calibrated there at FAR 1e-3
    for key in ("auc", "tar_at_far", "rank1"):
        assert report["general"]["candidate"][key] >= report["general"]["current"][key] - 0.005


def test_feedback_files_bad_rows_are_counted_and_pairs_implied(tmp_path):
    box = [1.0, 2.0, 30.0, 40.0]
    pl.DataFrame({"query_id": ["a", "b", "c"], "query_path": ["x.jpg", "y.jpg", "x.jpg"],
                  "query_bbox": [box, box[:3], box], "result_face_id": [1, 2, 3],
                  "result_path": ["y.jpg", "z.jpg", "z.jpg"], "result_bbox": [box, box, box],
                  "label": pl.Series([1, 0, 2], dtype=pl.Int8), "source": ["vote_up", "vote_down", "vote_down"]}
                 ).write_parquet(tmp_path / "pairs.parquet")
    pl.DataFrame({"anchor_path": ["x.jpg"], "anchor_bbox": [box], "positive_path": ["y.jpg"], "positive_bbox": [box],
                  "negative_path": ["z.jpg"], "negative_bbox": [box], "negative_similarity": [0.3], "source": ["vote_down"]}
                 ).write_parquet(tmp_path / "triplets.parquet")
    pl.DataFrame({"person_id": ["p", "p", "q"], "path": ["x.jpg", "y.jpg", "z.jpg"], "bbox": [box, box, box]}
                 ).write_parquet(tmp_path / "persons.parquet")
    persons = T.load_persons(tmp_path / "persons.parquet")
    assert {k: len(v) for k, v in persons.items()} == {"p": 2, "q": 1}
    data = T.load_feedback(tmp_path / "pairs.parquet", tmp_path / "triplets.parquet", persons)
    assert data.rejected == 2  # a 3-number box and a label of 2
    assert len(data.triplets) == 1 and data.triplets[0][2].path == "z.jpg"
    assert [(a.path, b.path, label) for a, b, label, _ in data.pairs] == [
        ("x.jpg", "y.jpg", 1), ("x.jpg", "y.jpg", 1), ("x.jpg", "z.jpg", 0)]

    # faces 0,1 one person, 2,3 another; one different-person vote implies the other three
    implied = T.implied_pairs(np.array([[0, 1, 1], [2, 3, 1], [0, 2, 0]]), np.array(["p", "p", "q", "q"]), 0)
    assert {tuple(r) for r in implied} == {(0, 1, 1), (2, 3, 1), (0, 2, 0), (0, 3, 0), (1, 2, 0), (1, 3, 0)}


def test_a_lone_wrong_vote_does_not_merge_two_persons():
    # faces 0-3 one person and 4-7 another, each voted on all round; one wrong same-person vote 3-4
    links = [(a, b) for group in (range(4), range(4, 8)) for a, b in combinations(group, 2)] + [(3, 4)]
    person = T.persons_of(9, np.array(links))
    assert len(set(person[:4])) == 1 and len(set(person[4:8])) == 1 and person[0] != person[4] != person[8]
    implied = T.implied_pairs(np.array([[a, b, 1] for a, b in links]), person, 0)
    assert not [r for r in implied[len(links):] if r[2] == 1 and (r[0] < 4) != (r[1] < 4)]
    # a different-person vote inside a person is kept as given and implies nothing
    inside = T.implied_pairs(np.array([[0, 1, 1], [1, 2, 1], [0, 2, 0]]), np.array([0, 0, 0]), 0)
    assert {tuple(r) for r in inside} == {(0, 1, 1), (1, 2, 1), (0, 2, 0)}


def test_a_different_person_vote_inside_a_person_is_left_out():
    refs = [T.FaceRef(f"f{k}.jpg", (0.0, 0.0, 10.0, 10.0)) for k in range(8)]
    pairs = [(refs[a], refs[b], 1, "vote_up") for group in (range(4), range(4, 8)) for a, b in combinations(group, 2)]
    pairs += [(refs[0], refs[2], 0, "vote_down"), (refs[1], refs[5], 0, "vote_down")]  # the first is wrong
    index = {r.key: k for k, r in enumerate(refs)}
    train, val, dropped = T.split_by_person(T.FeedbackData(pairs=pairs), index, 0.0, 0)
    assert train.contradicted == 1 and val.contradicted == 0 and dropped == 0
    negatives = {tuple(r[:2]) for r in train.pairs if r[2] == 0}
    assert (0, 2) not in negatives and (1, 5) in negatives and len(negatives) == 16  # 4 x 4 across the persons


def test_the_style_backbone_built_from_its_wheels_is_the_one_the_classifier_was_trained_on(tmp_path):
    """The backbone is not in git: built from its PyPI wheels it must have, byte for byte, the content
    the shipped cartoon classifier records (the export is deterministic)."""
    from face_assets.cartoon import CartoonClassifier
    from face_assets.models import file_sha256
    from face_assets.style_backbone import ensure_style_backbone

    built = ensure_style_backbone(tmp_path / "backbone.onnx")
    assert built.is_file() and file_sha256(built) == CartoonClassifier.read().backbone_sha256
    assert not list(tmp_path.glob(".*partial"))
