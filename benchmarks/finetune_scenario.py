"""Fine-tuning scenarios: simulated user votes, fine-tune, judge at the operating point; an ablation.

    python benchmarks/finetune_scenario.py [--scenario voters5|scale] [--ablation] [--out DIR] [--cache DIR] [--json]

Two scenarios on the shared labelled faces (persons as the manifest names them, ``identity``):

``voters5`` (the first scenario): the first 5 IMFDB actors in name order vote. Each voter's images
are split in name order into "user" images (the first 60 %) and held-out images. Among all pairs of
user images, the votes a user would give on the base model's mistakes at its match threshold are
written in the feedback export's ``pairs.parquet`` contract: ``vote_up`` for same-person pairs
scored below it, ``vote_down`` for different-person pairs above it, and as many ``mined_negative``
pairs (the hardest different-person pairs below it) as there are vote_up pairs.

``scale``: every person of the real folders (``real/extra`` included) with at least 6 images is a
candidate voter; the first ``--voters`` (22) in the order of a hash of their name vote, the others
stay in the gate's general set. Each user image is a search query over the other user images; the
user votes on its top ``--top-k`` (10) results, up when the result is the same person, down when
not, and ``--noise`` (5 %) of the votes are wrong (the label flipped). At most ``--max-pairs``
(1200) votes are kept.

The library then fine-tunes on the votes (its own person split, threshold calibration, gate and
registry). Reported, base vs fine-tuned, each at the threshold it runs with (the base at the
configured one, the fine-tuned model at the one calibrated for it): on the held-out images of the
voters (never used in training) ROC AUC, TAR at FAR 1e-3, rank-1, false accepts and rejects with
the bootstrap interval of their change; the same on the gate's general set; the gate's verdict.

``--ablation`` trains the scenario again without the unvoted negatives, with the anti-drift
(keep-close) term off and with each freeze strategy, and prints one row per variant. Every choice depends only on the data and the
seed (names, relative paths, content), so the same command gives the same figures in any checkout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from itertools import combinations
from pathlib import Path

import numpy as np
import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_datasets  # noqa: E402
from face_assets import load_settings  # noqa: E402
from face_assets.evaluation import all_pairs, identity_metrics, operating_point  # noqa: E402
from face_assets.imaging import load_image  # noqa: E402
from face_assets.library import FaceRecognitionLibrary  # noqa: E402
from face_assets.models import Recognizer  # noqa: E402
from face_assets.training import embed, labelled_images  # noqa: E402

# variants of --ablation: what each switches off or changes against the defaults
ABLATION = {
    "defaults": {},
    "no unvoted negatives": {"unvoted_negatives": False},
    "no anti-drift term": {"keep_close_weight": 0.0},
    "freeze: head only": {"freeze": "head"},
    "freeze: none (all layers)": {"freeze": "none"},
}


def voters5(args: argparse.Namespace) -> dict[str, list[Path]]:
    """The first ``--voters`` (5) IMFDB actors in name order and their images."""
    root = shared_datasets() / "real" / "imfdb"
    people = {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}
    return dict(list(people.items())[: args.voters or 5])


def scale_voters(args: argparse.Namespace) -> dict[str, list[Path]]:
    """Persons with at least ``--min-images`` images, the first ``--voters`` (22) by a hash of their name."""
    settings = load_settings(args.config)
    people: dict[str, list[Path]] = {}
    for person, path in labelled_images(settings):
        people.setdefault(person, []).append(path)
    eligible = sorted((p for p, paths in people.items() if len(paths) >= args.min_images),
                      key=lambda p: hashlib.sha256(f"{args.seed}:{p}".encode()).hexdigest())
    return {p: sorted(people[p], key=lambda q: q.relative_to(shared_datasets()).as_posix())
            for p in eligible[: args.voters or 22]}


def detect(lib: FaceRecognitionLibrary, paths: list[Path], cache: Path) -> tuple[list[Path], np.ndarray, list]:
    """Paths with a face, their aligned main-face crops and boxes; cached by content under ``cache``."""
    analyzer = lib.filter.analyzer
    kept, crops, boxes = [], [], []
    for path in paths:
        file = cache / f"{hashlib.sha256(path.read_bytes()).hexdigest()[:24]}.npz"
        if not file.is_file():
            faces, _ = analyzer.detector.predict([load_image(path)])[0]
            found = bool(faces)
            crop = analyzer.recognizer.align(load_image(path), faces[0].kps) if found else np.zeros((112, 112, 3), np.uint8)
            box = [float(v) for v in faces[0].bbox[:4]] if found else [0.0] * 4
            cache.mkdir(parents=True, exist_ok=True)
            np.savez(file, found=found, crop=crop, box=np.asarray(box))
        stored = np.load(file)
        if bool(stored["found"]):
            kept.append(path)
            crops.append(stored["crop"])
            boxes.append([float(v) for v in stored["box"]])
    return kept, np.asarray(crops).reshape(-1, 112, 112, 3), boxes


def mistake_votes(labels: np.ndarray, emb: np.ndarray, threshold: float) -> list[tuple[int, int, int, float, str]]:
    """Votes on the base model's errors at ``threshold`` plus as many hardest mined negatives as vote_ups."""
    sims = emb @ emb.T
    rows, mined = [], []
    for i, j in combinations(range(len(labels)), 2):
        same, sim = labels[i] == labels[j], float(sims[i, j])
        if same and sim < threshold:
            rows.append((i, j, 1, sim, "vote_up"))
        elif not same and sim >= threshold:
            rows.append((i, j, 0, sim, "vote_down"))
        elif not same:
            mined.append((i, j, 0, sim, "mined_negative"))
    mined.sort(key=lambda r: -r[3])
    return rows + mined[: sum(r[2] for r in rows)]


def search_votes(labels: np.ndarray, emb: np.ndarray, top_k: int, noise: float,
                 rng: np.random.Generator) -> list[tuple[int, int, int, float, str]]:
    """Votes on the top ``top_k`` search results of every user image, ``noise`` of them wrong."""
    sims = emb @ emb.T
    np.fill_diagonal(sims, -np.inf)
    seen, rows = set(), []
    for q in range(len(labels)):
        for r in np.argsort(-sims[q], kind="stable")[:top_k]:
            pair = (min(q, int(r)), max(q, int(r)))
            if pair not in seen:
                seen.add(pair)
                rows.append((*pair, int(labels[q] == labels[r]), float(sims[q, r])))
    wrong = set(rng.choice(len(rows), int(round(noise * len(rows))), replace=False).tolist()) if rows else set()
    return [(i, j, 1 - y if k in wrong else y, s, "vote_up" if (1 - y if k in wrong else y) else "vote_down")
            for k, (i, j, y, s) in enumerate(rows)]


def votes_frame(rows: list, paths: list[Path], boxes: list, model_version: str, max_pairs: int,
                rng: np.random.Generator) -> pl.DataFrame:
    """The votes in the feedback export's ``pairs.parquet`` contract, at most ``max_pairs`` (a random subset)."""
    if len(rows) > max_pairs:
        rows = [rows[k] for k in sorted(rng.choice(len(rows), max_pairs, replace=False))]
    return pl.DataFrame({
        "query_id": [f"q{i}" for i, *_ in rows],
        "query_path": [str(paths[i]) for i, *_ in rows],
        "query_bbox": [boxes[i] for i, *_ in rows],
        "query_face_id": pl.Series([None] * len(rows), dtype=pl.Int64),
        "result_face_id": pl.Series([j + 1 for _, j, *_ in rows], dtype=pl.Int64),
        "result_path": [str(paths[j]) for _, j, *_ in rows],
        "result_bbox": [boxes[j] for _, j, *_ in rows],
        "label": pl.Series([r[2] for r in rows], dtype=pl.Int8),
        "similarity": pl.Series([r[3] for r in rows], dtype=pl.Float32),
        "source": [r[4] for r in rows],
        "model_version": [model_version] * len(rows),
    })


def held_out_report(base: np.ndarray, tuned: np.ndarray, labels: np.ndarray, thresholds: tuple[float, float],
                    settings) -> dict:
    """Identity metrics of both models and their errors at their own thresholds, with the change's interval.

    ``fine_tuned_at_base_threshold``: the fine-tuned model's errors had it kept the base threshold
    (what a single configured threshold would do).
    """
    i, j, same = all_pairs(labels)
    sims = [(e[i] * e[j]).sum(1) for e in (base, tuned)]
    cfg = settings.training
    return {"base": identity_metrics(base, labels), "fine_tuned": identity_metrics(tuned, labels),
            "fine_tuned_at_base_threshold": {"false_accepts": int(np.sum(~same & (sims[1] >= thresholds[0]))),
                                             "false_rejects": int(np.sum(same & (sims[1] < thresholds[0])))},
            "operating_point": operating_point(i, j, same, labels, (sims[0], thresholds[0]), (sims[1], thresholds[1]),
                                               cfg.gate_bootstrap_rounds, cfg.gate_confidence, cfg.seed)}


def run(args: argparse.Namespace, out: Path, training: dict) -> dict:
    """One scenario run with ``training`` overrides; returns the report."""
    overrides = {"storage": {"data_dir": str(out)}, "training": training}
    settings = load_settings(args.config, overrides=overrides)
    people = scale_voters(args) if args.scenario == "scale" else voters5(args)
    if args.per_person:
        people = {k: v[: args.per_person] for k, v in people.items()}
    cache = Path(args.cache) if args.cache else out / "scenario-cache"
    rng = np.random.default_rng(settings.training.seed)
    with FaceRecognitionLibrary(settings=settings) as lib:
        threshold = lib.match_threshold
        user, held = [], []
        for name, paths in people.items():
            cut = int(round(len(paths) * args.user_share))
            user += [(name, p) for p in paths[:cut]]
            held += [(name, p) for p in paths[cut:]]
        u_paths, u_crops, u_boxes = detect(lib, [p for _, p in user], cache)
        u_labels = np.array([n for n, p in user if p in set(u_paths)])
        h_paths, h_crops, _ = detect(lib, [p for _, p in held], cache)
        h_labels = np.array([n for n, p in held if p in set(h_paths)])
        base = lib.filter.analyzer.recognizer
        u_emb = embed(base, u_crops)
        rows = (search_votes(u_labels, u_emb, args.top_k, args.noise, rng) if args.scenario == "scale"
                else mistake_votes(u_labels, u_emb, threshold))
        pairs = votes_frame(rows, u_paths, u_boxes, lib.model_version, args.max_pairs, rng)
        pairs_file = out / f"pairs-{args.scenario}.parquet"
        pairs.write_parquet(pairs_file)
        result = lib.train(pairs_file)
        tuned = Recognizer(Path(result.model_path), settings.models)
        report = {
            "scenario": args.scenario, "training": training,
            "voters": len(people), "user_images": len(u_paths), "held_out_images": len(h_paths),
            "votes": pairs["source"].value_counts().sort("source").to_dicts(), "vote_count": pairs.height,
            "data": result.data,
            "thresholds": {"base": threshold, "fine_tuned": result.match_threshold,
                           "base_recalibrated": result.metrics["parent_calibrated_threshold"]},
            "held_out": held_out_report(embed(base, h_crops), embed(tuned, h_crops), h_labels,
                                        (threshold, result.match_threshold), settings),
            "general": {k: result.metrics[k]["general"] for k in ("current", "candidate")},
            "general_operating_point": result.metrics["operating_point"].get("general"),
            "feedback_val": {k: result.metrics[k]["feedback"] for k in ("current", "candidate")},
            "gate": {"passed": result.passed_gate, "failed": result.gate_failed, "reasons": result.gate_reasons},
            "best_epoch": result.metrics["best_epoch"],
            "training_seconds": round(sum(r["seconds"] for r in result.history), 1),
            "total_seconds": result.seconds, "cpu_cores": os.cpu_count(), "device": result.device,
            "version": result.version, "history": result.history,
        }
    return report


def _fmt_op(m: dict) -> str:
    lo, hi = m["interval"]
    return f"{m['current_errors']:>5} -> {m['candidate_errors']:<5} [{lo * 100:+.3f}, {hi * 100:+.3f}] pt"


def print_report(r: dict) -> None:
    """The report as tables."""
    print(f"scenario {r['scenario']} {r['training'] or ''}: {r['voters']} voters, {r['user_images']} user images, "
          f"{r['held_out_images']} held out; {r['vote_count']} votes {r['votes']}")
    print(f"data: {r['data']}")
    t = r["thresholds"]
    print(f"thresholds: base {t['base']:.4f} (base recalibrated on this general set {t['base_recalibrated']:.4f}), "
          f"fine-tuned {t['fine_tuned']:.4f}")
    print(f"{'set':<30}{'model':<12}{'AUC':>8}{'TAR@1e-3':>10}{'rank-1':>8}")
    for set_name, pair in (("held-out images of the voters", (r["held_out"]["base"], r["held_out"]["fine_tuned"])),
                           ("general set", (r["general"]["current"], r["general"]["candidate"]))):
        for model, m in zip(("base", "fine-tuned"), pair):
            print(f"{set_name:<30}{model:<12}{m['auc']:>8.4f}{m['tar_at_far']:>10.3f}{m['rank1']:>8.3f}")
    print("at the operating point (errors base -> fine-tuned, 95 % interval of the rate's change):")
    for set_name, op in (("held-out images of the voters", r["held_out"]["operating_point"]),
                         ("general set", r["general_operating_point"])):
        if op:
            print(f"  {set_name:<30} false accepts {_fmt_op(op['far'])} of {op['far']['pairs']}; "
                  f"false rejects {_fmt_op(op['frr'])} of {op['frr']['pairs']}")
    fixed = r["held_out"]["fine_tuned_at_base_threshold"]
    print(f"  fine-tuned at the base threshold instead: {fixed['false_accepts']} false accepts, "
          f"{fixed['false_rejects']} false rejects on the held-out images")
    print(f"gate: {'PASSED' if r['gate']['passed'] else 'REJECTED'} {r['gate']['failed']}; " + "; ".join(r["gate"]["reasons"]))
    print(f"best epoch {r['best_epoch']}; training {r['training_seconds'] / 60:.1f} min ({len(r['history'])} epochs) on "
          f"{r['cpu_cores']} cores [{r['device']}]; whole run {r['total_seconds'] / 60:.1f} min")


def print_ablation(reports: dict[str, dict]) -> None:
    """One row per variant: held-out and general-set errors at the operating point, AUCs, gate."""
    print("| variant | threshold | held-out FA | held-out FR | held-out AUC | general FA | general FR | general TAR@1e-3 | gate |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, r in reports.items():
        ho, gen = r["held_out"]["operating_point"], r["general_operating_point"]
        print(f"| {name} | {r['thresholds']['fine_tuned']:.4f} | {ho['far']['current_errors']} -> {ho['far']['candidate_errors']} "
              f"| {ho['frr']['current_errors']} -> {ho['frr']['candidate_errors']} "
              f"| {r['held_out']['base']['auc']:.4f} -> {r['held_out']['fine_tuned']['auc']:.4f} "
              f"| {gen['far']['current_errors']} -> {gen['far']['candidate_errors']} "
              f"| {gen['frr']['current_errors']} -> {gen['frr']['candidate_errors']} "
              f"| {r['general']['current']['tar_at_far']:.3f} -> {r['general']['candidate']['tar_at_far']:.3f} "
              f"| {'passed' if r['gate']['passed'] else 'rejected ' + ', '.join(r['gate']['failed'])} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["voters5", "scale"], default="voters5")
    parser.add_argument("--voters", type=int, default=0, help="voting persons (default 5, scale: 22)")
    parser.add_argument("--min-images", type=int, default=6, help="scale: least images of a candidate voter")
    parser.add_argument("--user-share", type=float, default=0.6, help="share of each person's images the user sees")
    parser.add_argument("--top-k", type=int, default=10, help="scale: results voted on per query")
    parser.add_argument("--noise", type=float, default=0.05, help="scale: share of wrong votes")
    parser.add_argument("--max-pairs", type=int, default=1200)
    parser.add_argument("--per-person", type=int, default=0, help="use only the first N images of each person")
    parser.add_argument("--seed", type=int, default=0, help="scale: order of the candidate voters")
    parser.add_argument("--epochs", type=int, default=0, help="override training.epochs")
    parser.add_argument("--steps", type=int, default=0, help="override training.steps_per_epoch")
    parser.add_argument("--ablation", action="store_true", help="run every variant of the ablation")
    parser.add_argument("--out", help="data folder (default: a temporary one)")
    parser.add_argument("--cache", help="folder of cached face crops (default: inside the data folder)")
    parser.add_argument("--config")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    base = {k: v for k, v in (("epochs", args.epochs), ("steps_per_epoch", args.steps)) if v}
    variants = ABLATION if args.ablation else {"defaults": {}}
    with tempfile.TemporaryDirectory() as tmp:
        reports = {name: run(args, Path(args.out or tmp), base | extra) for name, extra in variants.items()}
    if args.json:
        print(json.dumps(reports if args.ablation else reports["defaults"], indent=2, default=float))
        return
    for report in reports.values():
        print_report(report)
        print()
    if args.ablation:
        print_ablation(reports)


if __name__ == "__main__":
    main()
