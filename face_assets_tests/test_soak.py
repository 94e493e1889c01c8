"""The short soak: the service, the Dagster daemon, SQL and the CLI on one data folder for ~90 s.

``benchmarks/soak.py`` with a short schedule: real processes, real models, a real daemon with
its sensors, and one ingest run killed with SIGKILL in its merge step. Correctness only; the
latency figures are printed, not asserted (docs/operations.md has those of the full run).
"""

from __future__ import annotations

import json

import pytest

from benchmarks import soak

pytestmark = [pytest.mark.slow, pytest.mark.dagster]  # ~90 s of the service, the Dagster daemon and the CLI together


def test_short_soak(datasets, tmp_path):
    out = soak.run(minutes=1.5, drop_every=15, batch=3, idle_seconds=15, voters=2, work=tmp_path / "soak",
                      drain_seconds=150, datasets=datasets)
    print(json.dumps(out, indent=1, default=str))
    checks = out["acceptance"]
    assert checks["no_run_failed_after_retries"], out["runs"]
    assert checks["no_query_failed"], (out["sql"], out["cli_stats"])
    assert checks["no_vote_lost"] and out["votes"]["acknowledged"] > 0, out["votes"]
    assert checks["no_partial_batch_visible"], out["partial_batch_samples"]
    assert not out["curation_errors"] and out["curation_s"]["curation_rename_s"]["n"] > 0, out["curation_errors"]
    assert out["curation_s"]["write_s"]["n"] > 0 and out["host_peak_rss_gib"] > 0
    assert out["disk_written_per_batch_mib"] > 0  # the processes' own writes are attributed
    assert checks["every_drop_searchable"], out["drop_to_searchable_s"]
    assert out["runs"]["succeeded"] >= out["drops"]
    # Where each drop's time went: its ingest run (the last attempt) and its steps, from the event log.
    assert all(row["ingest"]["status"] == "SUCCESS" and "face_embeddings" in row["ingest"]["steps"]
               for row in out["drop_timeline"]), out["drop_timeline"]
