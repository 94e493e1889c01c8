"""Scale-out of the ingest job on Dask: images/s with 1, 2 and 4 worker processes against in-process.

    python benchmarks/dask_scaleout.py [--images 48] [--batch-size 12] [--workers 1 2 4] [--json]

The same photos (LFW, from the shared datasets) are cut into the same batches for every
configuration, each into a fresh data folder and Dagster instance (one catalog writer at a time,
as ``dagster.yaml`` sets it):

- baseline, ``in_process``: the batches' ``ingest_images`` runs one after the other in this
  process (the executor a small host runs; models loaded once);
- ``dask, N workers``: a Dask cluster of N single-threaded worker processes started for the
  configuration, and all batches' runs launched at once on it (``pipeline.executor: dask`` with
  the cluster's scheduler), each run in a process of its own, as the daemon launches concurrent
  runs (their start-up is counted).

Every configuration runs the models on one thread per process (``models.intra_op_threads: 1``,
``detection.workers: 1``), so a worker process is one core's worth of work. The time of a
configuration runs from the first run launched to the last one finished, and includes each
process loading the models. The table is printed with the machine's load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import shared_datasets  # noqa: E402


def _photos(count: int) -> list[Path]:
    found = sorted((shared_datasets() / "real" / "lfw10").rglob("*.jpg"))
    if len(found) < count:
        raise SystemExit(f"only {len(found)} photos under real/lfw10")
    return found[:count]


class Config:
    """One configuration's folders, settings file, Dagster instance and planned batches."""

    def __init__(self, root: Path, photos: list[Path], batch_size: int, executor: str, scheduler: str | None = None):
        from dagster import DagsterInstance

        from face_assets.pipeline.assets import image_batches
        from face_assets.pipeline.resources import FaceAssetsResource
        from face_assets.pipeline.sensors import pending_batches

        root.mkdir(parents=True)
        incoming = root / "incoming"
        incoming.mkdir()
        for p in photos:
            shutil.copy(p, incoming / f"{p.parent.name}_{p.name}")
        self.config = root / "face_assets.yaml"
        self.config.write_text(yaml.safe_dump({
            "storage": {"data_dir": str(root / "data")},
            "models": {"intra_op_threads": 1},
            "detection": {"workers": 1},
            "pipeline": {"watched_folders": [str(incoming)], "batch_size": batch_size, "settle_seconds": 0,
                         "executor": executor, "dask_scheduler": scheduler},
        }))
        self.resource = FaceAssetsResource(config_path=str(self.config))
        self.home = root / "home"
        self.home.mkdir()
        (self.home / "dagster.yaml").write_text(yaml.safe_dump({
            "storage": {"sqlite": {"base_dir": str(self.home / "storage")}}, "telemetry": {"enabled": False},
            "concurrency": {"pools": {"default_limit": 1}}}))
        self.instance = DagsterInstance.from_config(str(self.home))
        self.keys = pending_batches(self.resource, set())
        self.instance.add_dynamic_partitions(image_batches.name, self.keys)

    def run(self, key: str) -> bool:
        """One ``ingest_images`` run of batch ``key`` in this process."""
        return run_batch(str(self.config), str(self.home), key)

    def valid_faces(self) -> int:
        """Valid faces in the catalog at the end (the same for every configuration)."""
        with self.resource.catalog() as catalog:
            return catalog.stats()["valid_faces"]


def run_batch(config: str, home: str, key: str) -> bool:
    """One ``ingest_images`` run of batch ``key``, as the code location defines the job for the settings in ``config``."""
    from dagster import DagsterInstance, build_reconstructable_job, execute_job

    from face_assets.config import load_settings
    from face_assets.pipeline.definitions import INGEST_JOB

    job = build_reconstructable_job("face_assets.pipeline.definitions", "resolve_job",
                                    reconstructable_args=(INGEST_JOB, load_settings(config).pipeline.model_dump_json()))
    run_config = {"resources": {"face_assets": {"config": {"config_path": config}}},
                  "loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # the table only
    with DagsterInstance.from_config(home) as instance, execute_job(
            job, instance, run_config=run_config, tags={"dagster/partition": key}) as result:
        return result.success


def measure(photos: list[Path], batch_size: int, workers: list[int], work: Path) -> list[dict]:
    """One row per configuration: images, batches, seconds, images/s, ratio to in-process, valid faces."""
    from dask.distributed import LocalCluster

    rows = []
    base = Config(work / "in_process", photos, batch_size, "in_process")
    start = time.perf_counter()
    ok = all(base.run(key) for key in base.keys)
    rows.append({"configuration": "in_process (baseline)", "seconds": time.perf_counter() - start, "ok": ok,
                 "batches": len(base.keys), "valid_faces": base.valid_faces()})
    for n in workers:
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
            cfg = Config(work / f"dask_{n}", photos, batch_size, "dask", cluster.scheduler_address)
            start = time.perf_counter()
            with ProcessPoolExecutor(len(cfg.keys), mp_context=multiprocessing.get_context("spawn")) as pool:
                ok = all(pool.map(run_batch, *zip(*[(str(cfg.config), str(cfg.home), k) for k in cfg.keys])))
            rows.append({"configuration": f"dask, {n} worker process(es)", "seconds": time.perf_counter() - start,
                         "ok": ok, "batches": len(cfg.keys), "valid_faces": cfg.valid_faces()})
    for row in rows:
        row["images"] = len(photos)
        row["images_per_s"] = len(photos) / row["seconds"]
        row["vs_in_process"] = rows[0]["seconds"] / row["seconds"]
    return rows


def main(argv: list[str] | None = None) -> None:
    """Measure and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=12)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="dask_scaleout_") as tmp:
        rows = measure(_photos(args.images), args.batch_size, args.workers, Path(tmp))
    load_after = os.getloadavg()
    if args.json:
        print(json.dumps({"rows": rows, "load_before": load_before, "load_after": load_after,
                          "cores": os.cpu_count()}, indent=1))
        return
    print(f"{args.images} photos in batches of {args.batch_size}; {os.cpu_count()} cores; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after")
    print("| configuration | batches | seconds | images/s | vs in-process | valid faces | ok |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['configuration']} | {r['batches']} | {r['seconds']:.1f} | {r['images_per_s']:.2f} | "
              f"{r['vs_in_process']:.2f}x | {r['valid_faces']} | {r['ok']} |")


if __name__ == "__main__":
    main()
