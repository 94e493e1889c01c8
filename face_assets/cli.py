"""``face-assets`` command line: human-readable output by default, ``--json`` for scripts."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .config import Settings, load_settings, write_settings
from .errors import FaceRecognitionError
from .models import builtin_pack_dir


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["storage"] = {"data_dir": args.data_dir}
    return load_settings(args.config, overrides=overrides or None)


def _progress(total: int, desc: str):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr, disable=None)

    def update(done: int, _total: int, _path: str) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def sample_images() -> list[Path]:
    """The sample photos shipped with the default model pack (the main job's default input)."""
    folder = builtin_pack_dir()
    return sorted(folder.glob("*.jpg")) if folder else []


def cmd_filter(args: argparse.Namespace) -> int:
    from .filtering import FaceFilter

    face_filter = FaceFilter(_settings(args))
    results = {}
    for image in args.images:
        try:
            results[image] = face_filter.filter(image)
        except FaceRecognitionError as exc:
            results[image] = {"error": str(exc)}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    for image, r in results.items():
        if "error" in r:
            print(f"{image}: ERROR {r['error']}")
            continue
        s = r["scores"]
        verdict = "valid" if r["is_valid"] else f"rejected ({r['rejection_reason']})"
        print(
            f"{image}: {verdict}; faces={r['num_faces']} det_score={s['det_score']:.3f} "
            f"norm={s['embedding_norm']:.2f} size={s['face_size']} "
            f"cartoon={s.get('cartoon_probability', 0.0):.3f} quality={s.get('quality', 0.0):.3f}"
        )
    return 0


def cmd_process(args: argparse.Namespace) -> int:
    from .filtering import FaceFilter
    from .ingest import ingest_paths, iter_image_files
    from .store import Catalog

    settings = _settings(args)
    paths = [p for d in args.dirs for p in iter_image_files(d)] if args.dirs else sample_images()
    if not paths:
        print("no input files", file=sys.stderr)
        return 2
    face_filter = FaceFilter(settings)
    with Catalog(settings.storage.duckdb_path) as catalog:
        summary = ingest_paths(paths, face_filter, catalog, on_progress=_progress(len(paths), "filter+embed"))
    out = summary.to_dict() | {"catalog": str(settings.storage.duckdb_path)}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(
            f"{out['total']} files: {out['valid']} valid, rejected {out['rejected'] or {}}, "
            f"{out['unreadable']} unreadable, {out['skipped']} already done; {out['faces']} faces "
            f"stored in {out['catalog']} ({out['images_per_second']} img/s)"
        )
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate
    from .filtering import FaceFilter

    face_filter = FaceFilter(_settings(args))
    cal = calibrate(face_filter, [Path(d) for d in args.dirs], [Path(d) for d in args.bad or []], args.percentile)
    if args.json:
        print(json.dumps({"thresholds": cal.thresholds}, indent=2))
    else:
        print(cal.report())
        print("proposed:", ", ".join(f"{k}={v}" for k, v in cal.thresholds.items()))
    if args.write_config:
        write_settings(cal.settings, args.write_config)
        print(f"wrote {args.write_config}", file=sys.stderr)
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if args.write:
        write_settings(settings, args.write)
    print(json.dumps(settings.to_dict(), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``face-assets`` (exposed for documentation and tests)."""
    parser = argparse.ArgumentParser(prog="face-assets", description=__doc__)
    parser.add_argument("--config", help="YAML or TOML config file (default: $FACE_ASSETS_CONFIG)")
    parser.add_argument("--data-dir", help="override storage.data_dir")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("filter", help="judge images: valid, or rejected as cartoon / no_face / low_quality")
    p.add_argument("images", nargs="+")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_filter)

    p = sub.add_parser("process", help="filter and embed folders into the catalog (default: sample photos)")
    p.add_argument("dirs", nargs="*")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_process)

    p = sub.add_parser("calibrate", help="propose filter thresholds from folders of good real faces")
    p.add_argument("dirs", nargs="+", help="folders of good real face photos")
    p.add_argument("--bad", nargs="*", help="folders of images that should be rejected, for contrast")
    p.add_argument("--percentile", type=float, default=1.0, help="share of good faces each threshold rejects")
    p.add_argument("--write-config", help="write a config file with the proposed thresholds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--write", help="also write it to this file")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``face-assets`` command."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except FaceRecognitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
