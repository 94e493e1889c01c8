"""``face-assets`` command line: human-readable output by default, ``--json`` for scripts."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from .config import Settings, config_reference, load_settings, write_settings
from .errors import FaceRecognitionError
from .models import builtin_pack_dir
from .process import apply_process_settings


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if getattr(args, "data_dir", None):
        overrides["storage"] = {"data_dir": args.data_dir}
    settings = load_settings(args.config, overrides=overrides or None)
    apply_process_settings(settings)  # start-up: before any command loads faiss
    return settings


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


def _library(args: argparse.Namespace):
    from .library import FaceRecognitionLibrary

    return FaceRecognitionLibrary(settings=_settings(args))


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _key_values(data: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in data.items())


def cmd_index(args: argparse.Namespace) -> int:
    from .ingest import iter_image_files

    paths = [p for d in args.paths for p in iter_image_files(d, recursive=not args.no_recursive)] if args.paths else sample_images()
    if not paths:
        print("no input files", file=sys.stderr)
        return 2
    with _library(args) as lib:
        summary = lib.index_batch(paths, on_progress=_progress(len(paths), "index"))
        out = summary.to_dict() | {"index_size": len(lib.index), "catalog": str(lib.settings.storage.duckdb_path)}
    _print(args, out,
           f"{out['total']} files: {out['valid']} valid, rejected {out['rejected'] or {}}, "
           f"{out['unreadable']} unreadable, {out['skipped']} already indexed; {out['faces']} faces stored; "
           f"index holds {out['index_size']} faces ({out['images_per_second']} img/s) -> {out['catalog']}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        results = lib.search(args.image, top_k=args.top_k, threshold=args.threshold)
    rows = [dataclasses.asdict(r) for r in results]
    text = "\n".join(f"{i + 1:>3}. {r.similarity:.4f}  face {r.face_id}  {r.path}" for i, r in enumerate(results))
    _print(args, rows, text or "no match")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        c = lib.compare(args.image1, args.image2)
    _print(args, dataclasses.asdict(c),
           f"similarity {c.similarity:.4f} -> {'same person' if c.is_match else 'different persons'} (threshold {c.threshold})")
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        s = lib.stats()
    _print(args, s, _key_values(s))
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        n = lib.remove(int(args.id) if args.id.isdigit() else args.id)
    _print(args, {"removed_faces": n}, f"removed {n} face(s)")
    return 0 if n else 1


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .calibration import calibrate
    from .filtering import FaceFilter

    face_filter = FaceFilter(_settings(args))
    cal = calibrate(face_filter, [Path(d) for d in args.dirs], [Path(d) for d in args.bad or []], args.percentile,
                    area_ratio=args.area_ratio)
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
    if args.reference:
        print(config_reference())
        return 0
    settings = _settings(args)
    if args.write:
        write_settings(settings, args.write)
    print(json.dumps(settings.to_dict(), indent=2, default=str))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .web import serve

    if args.index_dir:
        args.data_dir = args.index_dir
    with _library(args) as lib:
        serve(lib, host=args.host, port=args.port)
    return 0


def cmd_feedback_export(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        report = lib.export_feedback(args.out_dir)
    _print(args, report.to_dict(), report.summary())
    return 0


def cmd_feedback_stats(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        s = lib.feedback_stats()
    _print(args, s, _key_values(s))
    return 0


def cmd_pipeline(args: argparse.Namespace) -> int:
    from .pipeline.resources import FaceAssetsResource
    from .pipeline.runner import dagster_home, open_instance, run_pipeline, seed_incoming

    home = dagster_home(args.dagster_home)
    instance = open_instance(home)
    resource = FaceAssetsResource(config_path=args.config, data_dir=args.data_dir)
    seeded = seed_incoming(resource, builtin_pack_dir())
    if seeded:
        print(f"copied {len(seeded)} sample photos into {resource.incoming_dir} (the default watched folder)",
              file=sys.stderr)
    done = run_pipeline(instance, resource, progress=lambda line: print(line, file=sys.stderr), verbose=args.verbose)
    with _library(args) as lib:
        stats = lib.stats()
    ui = f"DAGSTER_HOME={home} {Path(sys.executable).parent / 'dagster'} dev -w workspace.yaml"
    _print(args, {"partitions": done.partitions, "run_ids": done.run_ids, "success": done.success, "stats": stats,
                  "ui": ui, "runs": [dataclasses.asdict(r) for r in done.runs]},
           f"{len(done.partitions)} batch(es) run ({'ok' if done.success else 'FAILED, see the UI'}); "
           f"catalog {stats['images']} images, {stats['faces']} faces, index {stats['index_size']} faces, "
           f"{stats['persons']} persons "
           f"-> {lib.settings.storage.duckdb_path}\n"
           f"Open the Dagster UI (asset graph, runs, metadata): {ui}\nthen browse http://127.0.0.1:3000")
    return 0 if done.success else 1


def cmd_train(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        persons = None
        if args.persons:
            from .training import load_persons

            persons = load_persons(Path(args.persons))
        r = lib.train(args.pairs, args.triplets, persons)
    cand, cur = r.metrics["candidate"], r.metrics["current"]
    _print(args, r.to_dict(),
           f"candidate {r.version} from {r.parent}: {'passed the gate' if r.passed_gate else 'REJECTED by the gate'}\n"
           + "\n".join(f"  {reason}" for reason in r.gate_reasons)
           + f"\n  feedback pairs: {cur['feedback']} -> {cand['feedback']}\n  general set: {cur['general']} -> {cand['general']}"
           + f"\n  {r.data['train_pairs']} training pairs, {len(r.history)} epochs, {r.seconds / 60:.1f} min on {r.device}; "
           f"curves in {r.run_dir}\n"
           + (f"promote with: face-assets model promote {r.version}" if r.passed_gate else ""))
    return 0


def cmd_model(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        if args.model_command == "promote":
            summary = lib.promote(args.version, force=args.force)
            out = {"active": lib.active_model, "model_version": lib.model_version,
                   "reembedded": summary.to_dict() if summary else None}
        elif args.model_command == "rollback":
            lib.rollback(args.version)
            out = {"active": lib.active_model, "model_version": lib.model_version}
        else:
            rows = lib.list_models()
            _print(args, rows, "\n".join(
                f"{'*' if r['active'] else ' '} {r['version']:<34} {r['status']:<10} threshold={r['match_threshold']:.4f} "
                f"parent={r['parent'] or '-':<34} {r['path'] or '(pack recognizer)'}" for r in rows))
            return 0
    _print(args, out, f"running {out['active']} ({out['model_version']})")
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        if args.action == "run":
            out: Any = dataclasses.asdict(lib.cluster())
            text = (f"run {out['run_id']}: {out['faces']} faces -> {out['clusters']} clusters "
                    f"({out['singletons']} single faces) in {out['seconds']:.1f}s; ids changed for "
                    f"{out['id_changed'] if out['id_changed'] is not None else 0:.2%} of faces; quality {out['quality']}")
        elif args.action == "assign":
            out = dataclasses.asdict(lib.assign_new())
            text = (f"run {out['run_id']}: {out['new_faces']} new faces, {out['unassigned']} started new clusters; "
                    f"{out['clusters']} clusters")
        elif args.action == "list":
            out = [dataclasses.asdict(c) for c in lib.list_clusters(min_size=args.min_size, limit=args.limit)]
            text = "\n".join(f"{c['cluster_id']:>8}  {c['size']:>6} faces  {c['label'] or ''}" for c in out) or "no clusters"
        elif args.action == "show":
            out = dataclasses.asdict(lib.get_cluster(args.ids[0]))
            text = _key_values(out)
        elif args.action == "merge":
            out = dataclasses.asdict(lib.merge(args.ids))
            text = f"merged into cluster {out['cluster_id']} ({out['size']} faces)"
        elif args.action == "split":
            parts = lib.split(args.ids[0], face_ids=args.faces, k=args.k)
            out = [dataclasses.asdict(c) for c in parts]
            text = ", ".join(f"cluster {c['cluster_id']} ({c['size']} faces)" for c in out)
        elif args.action == "move":
            out = dataclasses.asdict(lib.move(args.ids[0], args.ids[1]))
            text = f"face {args.ids[0]} moved to cluster {out['cluster_id']} ({out['size']} faces)"
        else:  # rename
            out = dataclasses.asdict(lib.rename(args.ids[0], args.label))
            text = f"cluster {out['cluster_id']} is now {out['label']!r}"
    _print(args, out, text)
    return 0


def cmd_token(args: argparse.Namespace) -> int:
    """API tokens of the web app (docs/web.md); works while the server runs, which reloads them."""
    from .auth import TokenStore

    settings = _settings(args)
    store = TokenStore(settings.storage.data_dir / settings.web.tokens_file)
    if args.token_command == "create":
        record, token = store.create(args.name, args.role)
        _print(args, {"id": record.id, "name": record.name, "role": record.role, "token": token},
               f"token {record.id} for {record.name} ({record.role}); shown once, keep it secret:\n{token}")
    elif args.token_command == "list":
        rows = [{"id": r.id, "name": r.name, "role": r.role, "created_at": r.created_at} for r in store.list()]
        _print(args, rows, "\n".join(f"{r['id']}  {r['role']:<8}  {r['name']}  {r['created_at']}" for r in rows)
               or "no tokens")
    else:
        gone = store.revoke(args.id_or_name)
        if not gone:
            print(f"error: no token with id or name {args.id_or_name!r}", file=sys.stderr)
            return 1
        _print(args, [r.id for r in gone], f"revoked {len(gone)} token(s): {', '.join(r.id for r in gone)}")
    return 0


_CLUSTER_IDS = {"show": 1, "merge": None, "split": 1, "move": 2, "rename": 1}


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

    p = sub.add_parser("index", help="filter, embed and index files or folders (default: the sample photos)")
    p.add_argument("paths", nargs="*")
    p.add_argument("--no-recursive", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="find the faces most similar to the main face of an image")
    p.add_argument("image")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--threshold", type=float)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("compare", help="1:1 verification of two images")
    p.add_argument("image1")
    p.add_argument("image2")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("stats", help="what the catalog and index hold")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("remove", help="remove an image (by image id) or a face (by numeric face id)")
    p.add_argument("id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_remove)

    p = sub.add_parser("calibrate", help="propose filter thresholds from folders of good real faces")
    p.add_argument("dirs", nargs="+", help="folders of good real face photos")
    p.add_argument("--bad", nargs="*", help="folders of images that should be rejected, for contrast")
    p.add_argument("--percentile", type=float, default=1.0, help="share of good faces each threshold rejects")
    p.add_argument("--area-ratio", action="store_true",
                   help="also calibrate the face area ratio (for collections of portraits, not group photos)")
    p.add_argument("--write-config", help="write a config file with the proposed thresholds")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("serve", help="run the search page with thumbs up/down and its JSON API")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--index-dir", help="folder of the catalog and index (default: storage.data_dir)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("token", help="API tokens of the web app: create, list, revoke")
    tsub = p.add_subparsers(dest="token_command", required=True)
    q = tsub.add_parser("create", help="issue a token for a user (printed once)")
    q.add_argument("name", help="the user's name: votes and audit entries carry it")
    q.add_argument("--role", choices=["viewer", "reviewer", "admin"], default="reviewer")
    q = tsub.add_parser("list", help="stored tokens (ids, users, roles; never the tokens)")
    q = tsub.add_parser("revoke", help="delete a token by id, or every token of a user by name")
    q.add_argument("id_or_name")
    for q in tsub.choices.values():
        q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("feedback", help="votes collected by the search page")
    fsub = p.add_subparsers(dest="feedback_command", required=True)
    q = fsub.add_parser("export", help="write training pairs.parquet and triplets.parquet, report what was dropped")
    q.add_argument("out_dir")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_feedback_export)
    q = fsub.add_parser("stats", help="counts of queries and votes")
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_feedback_stats)

    p = sub.add_parser("pipeline", help="run the Dagster jobs over the new files of the watched folders "
                       "(default: data/incoming)")
    p.add_argument("--dagster-home", help="Dagster instance folder (default: $DAGSTER_HOME, else the current folder)")
    p.add_argument("-v", "--verbose", action="store_true", help="print every Dagster event (DEBUG)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("train", help="fine-tune the recognizer on exported feedback; registers a candidate version")
    p.add_argument("--pairs", help="pairs.parquet of the feedback export")
    p.add_argument("--triplets", help="triplets.parquet of the feedback export")
    p.add_argument("--persons", help="Parquet of confirmed persons: person_id, path, bbox")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("model", help="recognizer versions: list, promote, rollback")
    model_sub = p.add_subparsers(dest="model_command", required=True)
    q = model_sub.add_parser("list", help="registered versions; * marks the one running")
    q.add_argument("--json", action="store_true")
    q = model_sub.add_parser("promote", help="make a version the running one (re-embeds the catalog)")
    q.add_argument("version")
    q.add_argument("--force", action="store_true", help="promote even a version the gate rejected")
    q.add_argument("--json", action="store_true")
    q = model_sub.add_parser("rollback", help="go back to VERSION, by default the one the current replaced")
    q.add_argument("version", nargs="?")
    q.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_model)

    p = sub.add_parser("cluster", help="person clusters: run, assign, list, show, merge, split, move, rename")
    p.add_argument("action", choices=["run", "assign", "list", "show", "merge", "split", "move", "rename"])
    p.add_argument("ids", nargs="*", type=int,
                   help="show/split/rename: CLUSTER; merge: CLUSTER CLUSTER...; move: FACE CLUSTER")
    p.add_argument("--faces", nargs="+", type=int, help="split: the faces that form the new cluster")
    p.add_argument("--k", type=int, help="split: number of parts of an automatic split")
    p.add_argument("--label", help="rename: the person's name (omit to clear)")
    p.add_argument("--min-size", type=int, default=1, help="list: smallest cluster shown")
    p.add_argument("--limit", type=int, help="list: at most this many clusters")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_cluster)

    p = sub.add_parser("config", help="print the effective configuration")
    p.add_argument("--write", help="also write it to this file")
    p.add_argument("--reference", action="store_true", help="print the markdown reference of every setting")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``face-assets`` command."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "cluster" and args.action in _CLUSTER_IDS:
        want = _CLUSTER_IDS[args.action]
        if (want is None and len(args.ids) < 2) or (want is not None and len(args.ids) != want):
            parser.error(f"cluster {args.action} takes {want or 'two or more'} id(s), got {len(args.ids)}")
    try:
        return args.func(args)
    except FaceRecognitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
