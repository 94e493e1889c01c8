"""Fine-tuning scenario: simulated user votes on the base model's mistakes, fine-tune, gain and no loss elsewhere.

    python benchmarks/finetune_scenario.py [--folder imfdb] [--voters 5] [--user-share 0.6] [--max-pairs 600] [--out DIR]

From the shared labelled faces of ``real/<folder>`` (default IMFDB, 8 actors), the first ``--voters``
persons in name order are the user's; the others stay unseen and join the gate's general set. Each
voter's images are split in name order into "user" images (the first ``--user-share``) and held-out images. Among all
pairs of user images, the votes a user would give on the base model's mistakes at the match threshold
are written in the feedback export's ``pairs.parquet`` contract: ``vote_up`` for same-person pairs
scored below it, ``vote_down`` for different-person pairs above it, and as many ``mined_negative``
pairs (the hardest different-person pairs below it) as there are vote_up pairs. The library then
fine-tunes on them (its own person split, evaluation gate and registry).

Reported, base vs fine-tuned: on the held-out images of those persons (never used in training),
ROC AUC, TAR at FAR 1e-3, rank-1, and the errors at the match threshold; the gate's general set
(the other shared identities); training time and the number of pairs.
"""

from __future__ import annotations

import argparse
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
from face_assets.evaluation import identity_metrics, pair_metrics  # noqa: E402
from face_assets.imaging import load_image  # noqa: E402
from face_assets.library import FaceRecognitionLibrary  # noqa: E402
from face_assets.models import Recognizer  # noqa: E402
from face_assets.training import normalize  # noqa: E402


def detect(lib: FaceRecognitionLibrary, paths: list[Path]) -> tuple[list[Path], np.ndarray, list[list[float]]]:
    """Paths with a face, their aligned main-face crops and boxes (largest face, padded retry)."""
    analyzer = lib.filter.analyzer
    kept, crops, boxes = [], [], []
    for path in paths:
        img = load_image(path)
        faces, _ = analyzer.detector.detect(img)
        if faces:
            kept.append(path)
            crops.append(analyzer.recognizer.align(img, faces[0].kps))
            boxes.append([float(v) for v in faces[0].bbox[:4]])
    return kept, np.asarray(crops), boxes


def simulate_votes(paths: list[Path], labels: np.ndarray, boxes: list[list[float]], emb: np.ndarray,
                   threshold: float, model_version: str, max_pairs: int) -> pl.DataFrame:
    """The pairs a user would vote on: the base model's errors at ``threshold``, plus mined hard negatives."""
    sims = emb @ emb.T
    rows, mined = [], []
    for i, j in combinations(range(len(paths)), 2):
        same, sim = labels[i] == labels[j], float(sims[i, j])
        if same and sim < threshold:
            rows.append((i, j, 1, sim, "vote_up"))
        elif not same and sim >= threshold:
            rows.append((i, j, 0, sim, "vote_down"))
        elif not same:
            mined.append((i, j, 0, sim, "mined_negative"))
    n_up = sum(r[2] for r in rows)
    mined.sort(key=lambda r: -r[3])
    rows += mined[:n_up]
    rng = np.random.default_rng(0)
    if len(rows) > max_pairs:
        rows = [rows[k] for k in sorted(rng.choice(len(rows), max_pairs, replace=False))]
    return pl.DataFrame(
        {
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
        }
    )


def held_out_report(recognizer: Recognizer, crops: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    """Identity metrics and errors at the match threshold on held-out images."""
    emb = normalize(recognizer.embed_aligned(list(crops))[0])
    iu = np.triu_indices(len(labels), 1)
    same = labels[iu[0]] == labels[iu[1]]
    sims = (emb @ emb.T)[iu]
    return identity_metrics(emb, labels) | {
        "accuracy_at_threshold": pair_metrics(sims, same, threshold)["accuracy"],
        "false_rejects": int(np.sum(same & (sims < threshold))),
        "false_accepts": int(np.sum(~same & (sims >= threshold))),
        "genuine_pairs": int(same.sum()),
        "impostor_pairs": int((~same).sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", default="imfdb", help="folder of real/ whose persons vote")
    parser.add_argument("--voters", type=int, default=5, help="persons of the folder the user votes on")
    parser.add_argument("--user-share", type=float, default=0.6, help="share of each person's images the user sees")
    parser.add_argument("--max-pairs", type=int, default=600)
    parser.add_argument("--per-person", type=int, default=0, help="use only the first N images of each person")
    parser.add_argument("--out", help="data folder (default: a temporary one)")
    parser.add_argument("--config")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    root = shared_datasets() / "real" / args.folder
    people = {d.name: sorted(p for p in d.iterdir() if p.is_file()) for d in sorted(root.iterdir()) if d.is_dir()}
    people = dict(list(people.items())[: args.voters])
    if args.per_person:
        people = {k: v[: args.per_person] for k, v in people.items()}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        settings = load_settings(args.config, overrides={"storage": {"data_dir": str(out)}})
        with FaceRecognitionLibrary(settings=settings) as lib:
            threshold = settings.search.match_threshold
            user, held = [], []
            for name, paths in people.items():
                cut = int(round(len(paths) * args.user_share))
                user += [(name, p) for p in paths[:cut]]
                held += [(name, p) for p in paths[cut:]]
            u_paths, u_crops, u_boxes = detect(lib, [p for _, p in user])
            u_labels = np.array([n for n, p in user if p in set(u_paths)])
            h_paths, h_crops, _ = detect(lib, [p for _, p in held])
            h_labels = np.array([n for n, p in held if p in set(h_paths)])
            base = lib.filter.analyzer.recognizer
            u_emb = normalize(base.embed_aligned(list(u_crops))[0])
            pairs = simulate_votes(u_paths, u_labels, u_boxes, u_emb, threshold, lib.model_version, args.max_pairs)
            pairs_file = out / "pairs.parquet"
            pairs.write_parquet(pairs_file)
            result = lib.train(pairs_file)
            candidate = Recognizer(Path(result.model_path), settings.models)
            report = {
                "votes": pairs["source"].value_counts().sort("source").to_dicts(),
                "data": result.data,
                "held_out_base": held_out_report(base, h_crops, h_labels, threshold),
                "held_out_fine_tuned": held_out_report(candidate, h_crops, h_labels, threshold),
                "gate": {"passed": result.passed_gate, "reasons": result.gate_reasons},
                "feedback_val": {k: result.metrics[k]["feedback"] for k in ("current", "candidate")},
                "general": {k: result.metrics[k]["general"] for k in ("current", "candidate")},
                "best_epoch": result.metrics["best_epoch"],
                "training_seconds": round(sum(r["seconds"] for r in result.history), 1),
                "total_seconds": result.seconds,
                "cpu_cores": os.cpu_count(),
                "device": result.device,
                "version": result.version,
                "history": result.history,
            }
    if args.json:
        print(json.dumps(report, indent=2, default=float))
        return
    print(f"votes: {report['votes']}")
    print(f"data: {report['data']}")
    print(f"{'set':<34}{'AUC':>8}{'TAR@1e-3':>10}{'rank-1':>8}{'acc@thr':>9}{'FR':>6}{'FA':>6}")
    for name, key in (("held-out persons, base", "held_out_base"), ("held-out persons, fine-tuned", "held_out_fine_tuned")):
        m = report[key]
        print(f"{name:<34}{m['auc']:>8.4f}{m['tar_at_far']:>10.3f}{m['rank1']:>8.3f}{m['accuracy_at_threshold']:>9.4f}"
              f"{m['false_rejects']:>6}{m['false_accepts']:>6}")
    for name, key in (("general set, base", "current"), ("general set, fine-tuned", "candidate")):
        m = report["general"][key]
        print(f"{name:<34}{m['auc']:>8.4f}{m['tar_at_far']:>10.3f}{m['rank1']:>8.3f}")
    for name, key in (("held-out feedback pairs, base", "current"), ("held-out feedback pairs, fine-tuned", "candidate")):
        m = report["feedback_val"][key]
        print(f"{name:<34}{m.get('auc', float('nan')):>8.4f}{m.get('tar_at_far', float('nan')):>10.3f}{'':>8}{m.get('accuracy', float('nan')):>9.4f}")
    print(f"gate: {'PASSED' if result.passed_gate else 'REJECTED'}; " + "; ".join(result.gate_reasons))
    print(f"best epoch {report['best_epoch']}; training {report['training_seconds'] / 60:.1f} min "
          f"({len(result.history)} epochs, {result.data['train_pairs']} training pairs) on {report['cpu_cores']} cores "
          f"[{report['device']}]; whole run {report['total_seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
