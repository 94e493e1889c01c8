"""Load test of the votes: ``benchmarks/feedback_load.py`` against ``face-assets serve`` in a subprocess."""

from __future__ import annotations

import shutil

import pytest

from benchmarks import feedback_load

pytestmark = pytest.mark.slow  # 10 s of votes against a served app


def test_load_every_acknowledged_vote_stored_once(indexed_dir, tmp_path):
    """~10 s of concurrent votes (longer on a busy machine, until 150 are acknowledged), each client voting with
    three reviewer tokens; figures go to the output."""
    data_dir = tmp_path / "data"
    shutil.copytree(indexed_dir, data_dir)
    out = feedback_load.run(data_dir, seconds=10, clients=8, n_queries=1, min_votes=150)
    print(f"\nfeedback load: {out['requests_per_second']} req/s, p99 {out['latency_ms']['p99']} ms, "
          f"{out['acknowledged']} acknowledged votes on {out['keys_acknowledged']} keys, {out['rows']} rows")
    assert out["errors"] == 0 and out["server_exit_code"] == 0, out
    assert out["exactly_once"] and out["duplicates"] == 0, out
    # 150 votes on the ~24 x 10 (query, result, voter) keys (each voter votes on its own search) repeat
    # some keys: updates happened
    assert out["acknowledged"] >= 150 and out["rows"] == out["keys_acknowledged"] and out["acknowledged"] > out["rows"] > 50
    assert (data_dir / "auth" / "tokens.json").read_text().count('"id"') == 0  # the load voters' tokens revoked
