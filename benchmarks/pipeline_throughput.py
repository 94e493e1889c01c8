"""Throughput of the Dagster graph per core, against the library alone on the same images.

    python benchmarks/pipeline_throughput.py [--folder real/lfw10] [--batch-size 50] [--threads 1]

Both run in this process with onnxruntime limited to ``--threads`` (one core by default): first
``FaceRecognitionLibrary.index_batch`` over the files (the baseline: what a user's script does),
then the graph (``run_pipeline``: sensor planning, one in-process run per partition, then the
index) into another data folder. The table gives each asset's total seconds from its
materialization metadata, and images per second and per core.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dagster import AssetKey, DagsterInstance  # noqa: E402

from benchmarks import shared_datasets  # noqa: E402
from face_assets.config import load_settings  # noqa: E402
from face_assets.library import FaceRecognitionLibrary  # noqa: E402
from face_assets.pipeline.resources import FaceAssetsResource  # noqa: E402
from face_assets.pipeline.runner import run_pipeline  # noqa: E402


def main() -> None:
    """Run both and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default="real/lfw10", help="folder under the shared datasets")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (cores used)")
    args = parser.parse_args()
    folder = shared_datasets() / args.folder
    with tempfile.TemporaryDirectory() as root:
        root = Path(root)
        settings = {"models": {"intra_op_threads": args.threads},
                    "pipeline": {"watched_folders": [str(folder)], "batch_size": args.batch_size,
                                 "executor": "in_process"}}
        config = root / "config.yaml"
        config.write_text(yaml.safe_dump(settings | {"storage": {"data_dir": str(root / "graph")}}))

        lib_settings = load_settings(config, overrides={"storage": {"data_dir": str(root / "library")}})
        with FaceRecognitionLibrary(settings=lib_settings) as lib:
            start = time.perf_counter()
            summary = lib.index_batch(sorted(p for p in folder.rglob("*") if p.is_file()))
            library_seconds = time.perf_counter() - start
        n = summary.total

        (root / "home").mkdir()
        instance = DagsterInstance.local_temp(str(root / "home"), overrides={"telemetry": {"enabled": False}})
        start = time.perf_counter()
        done = run_pipeline(instance, FaceAssetsResource(config_path=str(config)))
        graph_seconds = time.perf_counter() - start
        assert done.success, "a run failed"
        steps = {}
        for name in ("source_images", "filtered_images", "face_embeddings", "ann_index"):
            records = instance.fetch_materializations(AssetKey(name), limit=10_000).records
            steps[name] = sum(float(r.asset_materialization.metadata["seconds"].value) for r in records)

    print(f"{n} images from {args.folder}, {len(done.partitions)} partitions of {args.batch_size}, "
          f"{args.threads} onnxruntime thread(s), load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print("| step | seconds | images/s | images/s per core |\n|---|---:|---:|---:|")
    rows = [(f"`{k}`", v) for k, v in steps.items()]
    rows += [("graph, end to end (planning, runs, index)", graph_seconds),
             ("baseline: `FaceRecognitionLibrary.index_batch`", library_seconds)]
    for label, seconds in rows:
        rate = n / seconds if seconds else float("inf")
        print(f"| {label} | {seconds:.2f} | {rate:.1f} | {rate / args.threads:.1f} |")


if __name__ == "__main__":
    main()
