"""Load test of ``POST /api/feedback``: concurrent clients vote on loopback against a real uvicorn server.

    python benchmarks/feedback_load.py --index-dir DIR [--seconds 10] [--clients 16] [--min-votes N] [--json]

Starts ``face-assets serve`` on a free loopback port over DIR (a catalog with indexed faces); each
voter (a reviewer with its own API token, created here) makes ``--queries`` searches with catalog
faces (a vote is accepted only from the query's searcher); then ``--clients`` concurrent clients
post votes for ``--seconds``: each client votes as its own three voters, on random results of the
voter's searches, so many votes repeat a pair and must update it instead of adding a row. Then the server is stopped
(gracefully) and the store is checked: every acknowledged vote is stored exactly once, i.e. one row
per (query, result, voter) holding the last acknowledged vote, with ``revisions`` equal to the
number of acknowledged votes minus one. Prints requests/s and latency percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from face_assets.auth import TokenStore  # noqa: E402
from face_assets.config import load_settings  # noqa: E402
from face_assets.feedback import FeedbackStore  # noqa: E402

VOTERS_PER_CLIENT = 3
# ``min_votes`` extends a run past ``seconds`` on a slow or busy machine, up to this many seconds in all.
MIN_VOTES_CAP_S = 120.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(index_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    """``face-assets serve`` over ``index_dir`` on a free loopback port; returns the process and base URL."""
    port = _free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "face_assets.cli", "serve", "--data-dir", str(index_dir),
                                 "--host", "127.0.0.1", "--port", str(port)], cwd=REPO, stdout=out,
                                stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/api/health", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start within 120 s")


def stop_server(proc: subprocess.Popen) -> int:
    """Ctrl-C the server (it closes the library) and wait for it."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def make_tokens(index_dir: Path, names: list[str]) -> dict[str, str]:
    """A reviewer token for each voter name (what ``face-assets token create NAME`` does)."""
    settings = load_settings(overrides={"storage": {"data_dir": str(index_dir)}})
    store = TokenStore(settings.storage.data_dir / settings.web.tokens_file)
    return {name: store.create(name, "reviewer")[1] for name in names}


def revoke_tokens(index_dir: Path, names: list[str]) -> None:
    """Remove the load voters' tokens again."""
    settings = load_settings(overrides={"storage": {"data_dir": str(index_dir)}})
    store = TokenStore(settings.storage.data_dir / settings.web.tokens_file)
    for name in names:
        store.revoke(name)


def make_pairs(base: str, n_queries: int, token: str) -> list[tuple[str, int]]:
    """Search with the first catalog faces; returns every (query_id, result face_id) shown."""
    auth = {"Authorization": f"Bearer {token}"}
    faces = httpx.get(f"{base}/api/faces", params={"limit": n_queries}, headers=auth, timeout=30).json()
    pairs = []
    for face in faces:
        r = httpx.post(f"{base}/api/search", data={"face_id": str(face["face_id"])}, headers=auth, timeout=60)
        r.raise_for_status()
        body = r.json()
        pairs += [(body["query_id"], hit["face_id"]) for hit in body["results"]]
    if not pairs:
        raise RuntimeError("the catalog holds no faces to vote on")
    return pairs


async def _client(http: httpx.AsyncClient, base: str, pairs: dict[str, list], voters: dict[str, str],
                  more: Callable[[], bool], rng: random.Random, acked: dict, uncertain: set, latencies: list,
                  errors: list) -> None:
    names = sorted(voters)
    while more():
        voter, vote = rng.choice(names), rng.choice(("up", "down"))
        query_id, face_id = rng.choice(pairs[voter])
        key = (query_id, face_id, voter)
        start = time.perf_counter()
        try:
            r = await http.post(f"{base}/api/feedback", json={"query_id": query_id, "result_id": face_id, "vote": vote},
                                headers={"Authorization": f"Bearer {voters[voter]}"})
        except httpx.HTTPError as exc:
            uncertain.add(key)  # may or may not have been stored
            errors.append(repr(exc))
            continue
        latencies.append(time.perf_counter() - start)
        if r.status_code == 200:
            acked[key].append(vote)
        else:
            uncertain.add(key)
            errors.append(f"{r.status_code} {r.text[:200]}")


async def _load(base: str, pairs: dict[str, list], clients: int, seconds: float, tokens: dict[str, str], prefix: str,
                seed: int, min_votes: int) -> dict:
    acked: dict = defaultdict(list)
    uncertain: set = set()
    latencies: list[float] = []
    errors: list[str] = []
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as http:
        start = time.monotonic()
        deadline, cap = start + seconds, start + max(seconds, MIN_VOTES_CAP_S)

        def more() -> bool:
            now = time.monotonic()
            return now < deadline or (now < cap and sum(map(len, acked.values())) < min_votes)

        await asyncio.gather(*(
            _client(http, base, pairs, {n: tokens[n] for n in (f"{prefix}{c}-{j}" for j in range(VOTERS_PER_CLIENT))},
                    more, random.Random(seed * 1000 + c), acked, uncertain, latencies, errors)
            for c in range(clients)))
        elapsed = time.monotonic() - start
    return {"acked": acked, "uncertain": uncertain, "latencies": latencies, "errors": errors, "elapsed": elapsed}


def verify(index_dir: Path, acked: dict, uncertain: set, prefix: str) -> dict:
    """Compare the stored votes of the load voters with what the server acknowledged."""
    settings = load_settings(overrides={"storage": {"data_dir": str(index_dir)}})
    store = FeedbackStore.open(settings)
    try:
        rows = store.votes(voter_prefix=prefix)
    finally:
        store.close()
    stored = defaultdict(list)
    for r in rows:
        stored[(r["query_id"], r["result_face_id"], r["voter"])].append(r)
    mismatches = []
    for key, votes in acked.items():
        if key in uncertain:
            continue
        found = stored.get(key, [])
        if len(found) != 1 or found[0]["vote"] != votes[-1] or found[0]["revisions"] != len(votes) - 1:
            mismatches.append({"key": list(key), "acknowledged": votes,
                               "stored": [(f["vote"], f["revisions"]) for f in found]})
    unexpected = [list(k) for k in stored if k not in acked and k not in uncertain]
    return {"rows": len(rows), "keys_acknowledged": len(acked), "duplicates": sum(len(v) - 1 for v in stored.values()),
            "mismatches": mismatches[:20], "mismatch_count": len(mismatches), "unexpected_rows": unexpected[:20],
            "exactly_once": not mismatches and not unexpected and all(len(v) == 1 for v in stored.values())}


def run(index_dir: str | Path, seconds: float = 10.0, clients: int = 16, n_queries: int = 4, seed: int = 0,
        min_votes: int = 0) -> dict:
    """Start the server, load it, stop it, verify the store; returns the figures and the check.

    The clients vote for ``seconds``, and on until ``min_votes`` votes are acknowledged (at most
    ``MIN_VOTES_CAP_S`` in all), so a check of the store sees enough votes however slow the machine.
    """
    index_dir = Path(index_dir)
    prefix = f"load-{uuid.uuid4().hex[:8]}-"
    names = [f"{prefix}{c}-{j}" for c in range(clients) for j in range(VOTERS_PER_CLIENT)]
    tokens = make_tokens(index_dir, names)
    proc, base = start_server(index_dir, index_dir / "feedback_load_server.log")
    try:
        pairs = {name: make_pairs(base, n_queries, tokens[name]) for name in names}
        result = asyncio.run(_load(base, pairs, clients, seconds, tokens, prefix, seed, min_votes))
    finally:
        code = stop_server(proc)
        revoke_tokens(index_dir, names)
    lat = np.array(result["latencies"]) * 1000 if result["latencies"] else np.zeros(1)
    acknowledged = sum(len(v) for v in result["acked"].values())
    requests = len(result["latencies"]) + sum(1 for e in result["errors"] if not e[:3].isdigit())
    check = verify(index_dir, result["acked"], result["uncertain"], prefix)
    return {"clients": clients, "seconds": round(result["elapsed"], 2), "pairs": sum(map(len, pairs.values())),
            "requests": requests,
            "acknowledged": acknowledged, "errors": len(result["errors"]), "error_samples": result["errors"][:5],
            "requests_per_second": round(requests / result["elapsed"], 1),
            "latency_ms": {"p50": round(float(np.percentile(lat, 50)), 2),
                           "p90": round(float(np.percentile(lat, 90)), 2),
                           "p99": round(float(np.percentile(lat, 99)), 2), "max": round(float(lat.max()), 2)},
            "server_exit_code": code} | check


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", required=True, help="data folder with an indexed catalog")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--queries", type=int, default=4, help="searches of each voter, whose results it votes on")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-votes", type=int, default=0, help="vote past --seconds until this many are acknowledged")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = run(args.index_dir, args.seconds, args.clients, args.queries, args.seed, args.min_votes)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        lat = out["latency_ms"]
        print(f"{out['clients']} clients, {out['seconds']} s: {out['requests']} requests, {out['requests_per_second']} req/s, "
              f"latency p50 {lat['p50']} ms, p90 {lat['p90']} ms, p99 {lat['p99']} ms, max {lat['max']} ms; "
              f"{out['errors']} errors")
        print(f"store: {out['rows']} rows for {out['keys_acknowledged']} acknowledged (query, result, voter) keys "
              f"from {out['acknowledged']} acknowledged votes; exactly once: {out['exactly_once']}")
    return 0 if out["exactly_once"] and not out["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
