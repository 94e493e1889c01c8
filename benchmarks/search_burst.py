"""Burst of large-image searches against ``face-assets serve``: the server's peak memory stays bounded.

    python benchmarks/search_burst.py --index-dir DIR [--clients 8] [--side 7000] [--json]

Makes a ``--side`` x ``--side`` PNG (a flat canvas with a real face photo scaled up in it: a small
file that decodes to side² pixels), starts the server, and sends it from ``--clients`` clients at
once, each retrying after ``Retry-After`` on 503 until it gets an answer; then the same burst with a
7900 x 7900 PNG (62 Mpx, beyond ``web.max_decode_pixels``). Reports the answers, the wall time and
the server's resident memory: after start-up, its peak (``VmHWM``) after one ordinary search (the
models' working memory), and after each burst.

The bound: the memory after one ordinary search + ``web.max_concurrent_searches`` x (one decode of at most
``web.max_decode_pixels`` RGB pixels + one detection at ``web.max_query_pixels``), whatever the
number of clients.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks import shared_datasets  # noqa: E402
from benchmarks.feedback_load import make_tokens, revoke_tokens, start_server, stop_server  # noqa: E402


def big_png(side: int, face: Path) -> bytes:
    """A ``side`` x ``side`` PNG: grey canvas, the face photo scaled to a third of the side in the middle."""
    canvas = Image.new("RGB", (side, side), (128, 128, 128))
    photo = Image.open(face).convert("RGB")
    photo = photo.resize((side // 3, side // 3), Image.Resampling.BICUBIC)
    canvas.paste(photo, (side // 3, side // 3))
    out = io.BytesIO()
    canvas.save(out, "PNG", compress_level=6)
    return out.getvalue()


def peak_rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def burst(base: str, tokens: list[str], data: bytes) -> dict:
    """One upload per token at once, each retrying on 503 after Retry-After; answers and wall time."""
    codes: list[int] = []
    retries = [0]
    lock = threading.Lock()

    def one(token: str) -> None:
        while True:
            r = httpx.post(f"{base}/api/search", files={"image": ("big.png", data, "image/png")},
                           headers={"Authorization": f"Bearer {token}"}, timeout=600)
            if r.status_code != 503:
                with lock:
                    codes.append(r.status_code)
                return
            with lock:
                retries[0] += 1
            time.sleep(float(r.headers.get("retry-after", "1")))

    start = time.perf_counter()
    threads = [threading.Thread(target=one, args=(t,)) for t in tokens]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"answers": {str(c): codes.count(c) for c in sorted(set(codes))}, "retries_after_503": retries[0],
            "seconds": round(time.perf_counter() - start, 2)}


def run(index_dir: Path, clients: int, side: int, face: Path) -> dict:
    """Start the server, run both bursts, stop it; the figures."""
    names = [f"burst-{i}" for i in range(clients)]  # a token per client: the per-token rate limit stays out
    tokens = list(make_tokens(index_dir, names).values())
    allowed = big_png(side, face)
    refused = big_png(7900, face)
    proc, base = start_server(index_dir, index_dir / "search_burst_server.log")
    try:
        rss_start, _ = peak_rss_mb(proc.pid)
        warm = burst(base, tokens[:1], face.read_bytes())  # the models' working memory: one ordinary search
        if warm["answers"] != {"200": 1}:
            raise RuntimeError(f"warm-up search failed: {warm}")
        out = {"clients": clients, "allowed_image": {"pixels": side * side, "bytes": len(allowed)},
               "refused_image": {"pixels": 7900 * 7900, "bytes": len(refused)}, "rss_start_mb": round(rss_start),
               "peak_after_warmup_mb": round(peak_rss_mb(proc.pid)[1])}
        out["allowed_burst"] = burst(base, tokens, allowed)
        out["peak_after_allowed_mb"] = round(peak_rss_mb(proc.pid)[1])
        out["refused_burst"] = burst(base, tokens, refused)
        out["peak_after_refused_mb"] = round(peak_rss_mb(proc.pid)[1])
    finally:
        stop_server(proc)
        revoke_tokens(index_dir, names)
    return out


def main() -> int:
    """Command line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index-dir", required=True, help="data folder with an indexed catalog")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--side", type=int, default=7000, help="side of the allowed image, pixels")
    parser.add_argument("--face", type=Path, help="a face photo (default: the first LFW photo of the shared datasets)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    face = args.face or sorted((shared_datasets() / "real" / "lfw10").glob("*/*.jpg"))[0]
    out = run(Path(args.index_dir), args.clients, args.side, face)
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        a, r = out["allowed_burst"], out["refused_burst"]
        print(f"{out['clients']} clients x {args.side}x{args.side} PNG ({out['allowed_image']['bytes'] // 1024} KB): "
              f"answers {a['answers']}, {a['retries_after_503']} retries after 503, {a['seconds']} s; "
              f"server RSS {out['rss_start_mb']} MB at start, {out['peak_after_warmup_mb']} MB peak after one ordinary "
              f"search, peak {out['peak_after_allowed_mb']} MB")
        print(f"{out['clients']} clients x 7900x7900 PNG ({out['refused_image']['bytes'] // 1024} KB): "
              f"answers {r['answers']}, {r['seconds']} s; peak {out['peak_after_refused_mb']} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
