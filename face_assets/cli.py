"""``face-assets`` command line: human-readable output by default, ``--json`` for scripts.

Every command is one row of :data:`COMMANDS`: its name (two words for a command of a group, such
as ``cluster merge``), its help, its handler and its arguments, checked by the parser. The options
every command shares (``--config``, ``--data-dir``, ``--json``) are defined once, in
:func:`_shared_options`, and may come before or after the command.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .config import Settings, config_reference, load_settings, write_settings
from .errors import FaceRecognitionError
from .models import builtin_pack_dir
from .process import apply_process_settings

DESCRIPTION = "Filter, index, search and curate faces; human-readable output by default, --json for scripts."
REFERENCE_WIDTH = 100  # columns of the help text in the README's command reference


# -- shared plumbing -------------------------------------------------------------------------------


def _settings(args: argparse.Namespace) -> Settings:
    overrides: dict[str, Any] = {}
    if args.data_dir:
        overrides["storage"] = {"data_dir": args.data_dir}
    settings = load_settings(args.config, overrides=overrides or None)
    apply_process_settings(settings)  # start-up: before any command loads faiss
    return settings


def _library(args: argparse.Namespace):
    from .library import FaceRecognitionLibrary

    return FaceRecognitionLibrary(settings=_settings(args))


def _print(args: argparse.Namespace, data: Any, text: str) -> None:
    print(json.dumps(data, indent=2, default=str) if args.json else text)


def _key_values(data: dict) -> str:
    return "\n".join(f"{k}: {v}" for k, v in data.items())


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


# -- commands --------------------------------------------------------------------------------------


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


def cmd_import(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = lib.import_faces(args.file)
    _print(args, out, f"{out['faces']} faces of {out['images']} images imported, {out['skipped_images']} images "
                      f"already in the catalog; index holds {out['index_size']} faces "
                      f"(catalog {out['catalog_seconds']} s, index {out['index_seconds']} s)")
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


def cmd_migrate(args: argparse.Namespace) -> int:
    from .migrate import migrate_data_folder

    settings = _settings(args)
    done = migrate_data_folder(settings, args.audit_log)
    _print(args, {"data_dir": str(settings.storage.data_dir), "done": done},
           "\n".join(done) or f"nothing to do: {settings.storage.data_dir} is in this release's layout")
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


SERVICE_LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def cmd_serve(args: argparse.Namespace) -> int:
    import logging

    from .web import serve

    # The package's own lines (an index not loaded, another model version switched to) in plain
    # text on stderr beside uvicorn's; without a handler only warnings would reach it, unformatted.
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(SERVICE_LOG_FORMAT))
    log = logging.getLogger("face_assets")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    with _library(args) as lib:
        settings = lib.settings
        log.info("serving %s on http://%s:%d (auth: %s; index %s: %d faces, model %s; reloaded within %g s of a "
                 "new one)", Path(settings.storage.data_dir).absolute(), args.host, args.port, settings.web.auth,
                 lib.index_path.name, len(lib.index), lib.model_version, settings.storage.index_refresh_seconds)
        serve(lib, host=args.host, port=args.port)
    return 0


def cmd_token_create(args: argparse.Namespace) -> int:
    record, token = _tokens(args).create(args.name, args.role)
    _print(args, {"id": record.id, "name": record.name, "role": record.role, "token": token},
           f"token {record.id} for {record.name} ({record.role}); shown once, keep it secret:\n{token}")
    return 0


def cmd_token_list(args: argparse.Namespace) -> int:
    rows = [{"id": r.id, "name": r.name, "role": r.role, "created_at": r.created_at} for r in _tokens(args).list()]
    _print(args, rows, "\n".join(f"{r['id']}  {r['role']:<8}  {r['name']}  {r['created_at']}" for r in rows)
           or "no tokens")
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    gone = _tokens(args).revoke(args.id_or_name)
    if not gone:
        print(f"error: no token with id or name {args.id_or_name!r}", file=sys.stderr)
        return 1
    _print(args, [r.id for r in gone], f"revoked {len(gone)} token(s): {', '.join(r.id for r in gone)}")
    return 0


def _tokens(args: argparse.Namespace):
    """API tokens of the web app (docs/web.md); changes apply while the server runs, which reloads them."""
    from .auth import TokenStore

    settings = _settings(args)
    return TokenStore(settings.layout.tokens)


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


def cmd_model_list(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        rows = lib.list_models()
    _print(args, rows, "\n".join(
        f"{'*' if r['active'] else ' '} {r['version']:<34} {r['status']:<10} threshold={r['match_threshold']:.4f} "
        f"parent={r['parent'] or '-':<34} {r['path'] or '(pack recognizer)'}" for r in rows))
    return 0


def cmd_model_promote(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        summary = lib.promote(args.version, force=args.force)
        out = {"active": lib.active_model, "model_version": lib.model_version,
               "reembedded": summary.to_dict() if summary else None}
    _print(args, out, f"running {out['active']} ({out['model_version']})")
    return 0


def cmd_model_rollback(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        lib.rollback(args.version)
        out = {"active": lib.active_model, "model_version": lib.model_version}
    _print(args, out, f"running {out['active']} ({out['model_version']})")
    return 0


def cmd_cluster_run(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.cluster())
    _print(args, out, f"run {out['run_id']}: {out['faces']} faces -> {out['clusters']} clusters "
                      f"({out['singletons']} single faces) in {out['seconds']:.1f}s; ids changed for "
                      f"{out['id_changed'] if out['id_changed'] is not None else 0:.2%} of faces; quality {out['quality']}")
    return 0


def cmd_cluster_assign(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.assign_new())
    _print(args, out, f"run {out['run_id']}: {out['new_faces']} new faces, {out['unassigned']} started new clusters; "
                      f"{out['clusters']} clusters")
    return 0


def cmd_cluster_list(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = [dataclasses.asdict(c) for c in lib.list_clusters(min_size=args.min_size, limit=args.limit)]
    _print(args, out, "\n".join(f"{c['cluster_id']:>8}  {c['size']:>6} faces  {c['label'] or ''}" for c in out)
           or "no clusters")
    return 0


def cmd_cluster_show(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.get_cluster(args.cluster))
    _print(args, out, _key_values(out))
    return 0


def cmd_cluster_merge(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.merge([args.cluster, *args.others]))
    _print(args, out, f"merged into cluster {out['cluster_id']} ({out['size']} faces)")
    return 0


def cmd_cluster_split(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = [dataclasses.asdict(c) for c in lib.split(args.cluster, face_ids=args.faces, k=args.k)]
    _print(args, out, ", ".join(f"cluster {c['cluster_id']} ({c['size']} faces)" for c in out))
    return 0


def cmd_cluster_move(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.move(args.face, args.cluster))
    _print(args, out, f"face {args.face} moved to cluster {out['cluster_id']} ({out['size']} faces)")
    return 0


def cmd_cluster_rename(args: argparse.Namespace) -> int:
    with _library(args) as lib:
        out = dataclasses.asdict(lib.rename(args.cluster, args.label))
    _print(args, out, f"cluster {out['cluster_id']} is now {out['label']!r}")
    return 0


# -- the table -------------------------------------------------------------------------------------


def _bounded(kind: type, low: float | None = None, high: float | None = None) -> Callable[[str], Any]:
    """An argument type: ``kind`` within ``[low, high]``, refused by the parser otherwise."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n' if kind is int else ''} {kind.__name__}: {text!r}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            span = f"at least {low}" if high is None else f"between {low} and {high}"
            raise argparse.ArgumentTypeError(f"{text} is out of range: {span}")
        return value

    parse.__name__ = kind.__name__
    return parse


Arg = tuple[tuple[str, ...], dict[str, Any]]


def arg(*flags: str, **options: Any) -> Arg:
    """One argument of a command, as ``add_argument`` takes it; ``exclusive=True`` puts it in the
    command's one group of mutually exclusive options."""
    return flags, options


@dataclass(frozen=True)
class Command:
    """A row of the command table: ``name`` is one word, or two for a command of a group."""

    name: str
    help: str
    run: Callable[[argparse.Namespace], int]
    args: tuple[Arg, ...] = ()
    json: bool = True  # the command has a machine-readable output (--json)


GROUPS = {
    "token": "API tokens of the web app: create, list, revoke",
    "feedback": "votes collected by the search page: export, stats",
    "model": "recognizer versions: list, promote, rollback",
    "cluster": "person clusters: run, assign, list, show, merge, split, move, rename",
}

CLUSTER = arg("cluster", type=int, metavar="CLUSTER", help="cluster id")

COMMANDS: tuple[Command, ...] = (
    Command("filter", "judge images: valid, or rejected as cartoon / no_face / low_quality", cmd_filter,
            (arg("images", nargs="+", metavar="IMAGE", help="image files"),)),
    Command("index", "filter, embed and index files or folders (default: the sample photos)", cmd_index,
            (arg("paths", nargs="*", metavar="PATH", help="image files or folders"),
             arg("--no-recursive", action="store_true", help="only the files directly in each folder"))),
    Command("import", "import precomputed faces (Parquet: image_id, path, embedding, ...) in one transaction",
            cmd_import, (arg("file", metavar="FILE", help="Parquet file, one row per face"),)),
    Command("search", "find the faces most similar to the main face of an image", cmd_search,
            (arg("image", metavar="IMAGE", help="query image"),
             arg("--top-k", type=_bounded(int, 1), default=10, metavar="N", help="results (default 10)"),
             arg("--threshold", type=_bounded(float, -1.0, 1.0), metavar="COSINE",
                 help="only matches at least this similar"))),
    Command("compare", "1:1 verification of two images", cmd_compare,
            (arg("image1", metavar="IMAGE1"), arg("image2", metavar="IMAGE2"))),
    Command("stats", "what the catalog and index hold", cmd_stats),
    Command("remove", "remove an image (by image id) or a face (by numeric face id)", cmd_remove,
            (arg("id", metavar="ID", help="image id, or numeric face id"),)),
    Command("calibrate", "propose filter thresholds from folders of good real faces", cmd_calibrate,
            (arg("dirs", nargs="+", metavar="DIR", help="folders of good real face photos"),
             arg("--bad", nargs="*", metavar="DIR", help="folders of images that should be rejected, for contrast"),
             arg("--percentile", type=_bounded(float, 0.0, 50.0), default=1.0, metavar="PERCENT",
                 help="percent of good faces each threshold rejects (default 1)"),
             arg("--area-ratio", action="store_true",
                 help="also calibrate the face area ratio (for collections of portraits, not group photos)"),
             arg("--write-config", metavar="FILE", help="write a config file with the proposed thresholds"))),
    Command("serve", "run the search and people pages and their JSON API", cmd_serve,
            (arg("--host", default="127.0.0.1", metavar="ADDRESS", help="address to bind (default 127.0.0.1)"),
             arg("--port", type=_bounded(int, 1, 65535), default=8000, metavar="PORT", help="port (default 8000)")), json=False),
    Command("token create", "issue a token for a user (printed once)", cmd_token_create,
            (arg("name", metavar="NAME", help="the user's name: votes and audit entries carry it"),
             arg("--role", choices=["viewer", "reviewer", "admin"], default="reviewer"))),
    Command("token list", "stored tokens (ids, users, roles; never the tokens)", cmd_token_list),
    Command("token revoke", "delete a token by id, or every token of a user by name", cmd_token_revoke,
            (arg("id_or_name", metavar="ID_OR_NAME"),)),
    Command("feedback export", "write training pairs.parquet and triplets.parquet, report what was dropped",
            cmd_feedback_export, (arg("out_dir", metavar="OUT_DIR", help="folder of the files written"),)),
    Command("feedback stats", "counts of queries and votes", cmd_feedback_stats),
    Command("pipeline", "run the Dagster jobs over the new files of the watched folders (default: data/incoming)",
            cmd_pipeline,
            (arg("--dagster-home", metavar="DIR",
                 help="Dagster instance folder (default: $DAGSTER_HOME, else the current folder)"),
             arg("-v", "--verbose", action="store_true", help="print every Dagster event (DEBUG)"))),
    Command("train", "fine-tune the recognizer on exported feedback; registers a candidate version", cmd_train,
            (arg("--pairs", metavar="FILE", help="pairs.parquet of the feedback export"),
             arg("--triplets", metavar="FILE", help="triplets.parquet of the feedback export"),
             arg("--persons", metavar="FILE", help="Parquet of confirmed persons: person_id, path, bbox"))),
    Command("model list", "registered versions; * marks the one running", cmd_model_list),
    Command("model promote", "make a version the running one (re-embeds the catalog)", cmd_model_promote,
            (arg("version", metavar="VERSION"), arg("--force", action="store_true", help="promote even a version the gate rejected"))),
    Command("model rollback", "go back to VERSION, by default the one the current replaced", cmd_model_rollback,
            (arg("version", nargs="?", metavar="VERSION"),)),
    Command("cluster run", "cluster every face into persons (full run, stable ids)", cmd_cluster_run),
    Command("cluster assign", "assign the faces indexed since the last run", cmd_cluster_assign),
    Command("cluster list", "clusters, largest first", cmd_cluster_list,
            (arg("--min-size", type=_bounded(int, 1), default=1, metavar="FACES", help="smallest cluster shown"),
             arg("--limit", type=_bounded(int, 1), metavar="N", help="at most this many clusters"))),
    Command("cluster show", "one cluster: its faces, label and quality", cmd_cluster_show, (CLUSTER,)),
    Command("cluster merge", "merge clusters into the largest of them", cmd_cluster_merge,
            (CLUSTER, arg("others", type=int, nargs="+", metavar="CLUSTER", help="clusters merged with it (into the largest)"))),
    Command("cluster split", "split a cluster: the given faces become a new cluster, or k automatic parts",
            cmd_cluster_split,
            (CLUSTER,
             arg("--faces", type=int, nargs="+", metavar="FACE", exclusive=True,
                 help="the faces of the new cluster (the rest keep the id and name)"),
             arg("--k", type=_bounded(int, 2), metavar="K", exclusive=True, help="number of parts (default clustering.split_k)"))),
    Command("cluster move", "move a face to another cluster", cmd_cluster_move,
            (arg("face", type=int, metavar="FACE", help="face id"), CLUSTER)),
    Command("cluster rename", "name a cluster's person", cmd_cluster_rename,
            (CLUSTER, arg("--label", metavar="NAME", help="the person's name (omit to clear)"))),
    Command("migrate", "upgrade a data folder written by an older release, in place (once; a second run does nothing)",
            cmd_migrate,
            (arg("--audit-log", metavar="FILE",
                 help="a curation log of the former JSON-lines format kept elsewhere than audit/people.jsonl"),)),
    Command("config", "print the effective configuration", cmd_config,
            (arg("--write", metavar="FILE", help="also write it to this file"),
             arg("--reference", action="store_true", help="print the markdown reference of every setting")),
            json=False),
)


# -- the parser ------------------------------------------------------------------------------------


SHARED_DEFAULTS = {"config": None, "data_dir": None, "json": False}


def _shared_options(*, json_flag: bool, documented: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after its name. Their defaults are left out
    (SUPPRESS) so that a value given before the command is not reset after it; :func:`main` fills
    them in."""
    shown = (lambda text: text) if documented else (lambda text: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                   help=shown("YAML or TOML config file (default: $FACE_ASSETS_CONFIG, else the built-in defaults)"))
    p.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                   help=shown("folder of the catalog, index and models (overrides storage.data_dir)"))
    if json_flag:
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")
    return p


def _build(width: int | None = None) -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser, and the parser of each command of :data:`COMMANDS` by name."""

    def formatter(prog: str) -> argparse.HelpFormatter:
        return argparse.HelpFormatter(prog, width=width) if width else argparse.HelpFormatter(prog)

    parser = argparse.ArgumentParser(prog="face-assets", description=DESCRIPTION,
                                     parents=[_shared_options(json_flag=True, documented=True)],
                                     formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    groups = {}
    leaves: dict[str, argparse.ArgumentParser] = {}
    for command in COMMANDS:
        *group, name = command.name.split()
        if group and group[0] not in groups:  # a group's parser, where its first command is listed
            g = sub.add_parser(group[0], help=GROUPS[group[0]], description=GROUPS[group[0]], formatter_class=formatter)
            groups[group[0]] = g.add_subparsers(dest=f"{group[0]}_command", metavar="COMMAND", required=True)
        p = (groups[group[0]] if group else sub).add_parser(
            name, help=command.help, description=command.help, formatter_class=formatter,
            parents=[_shared_options(json_flag=command.json, documented=False)])
        exclusive = None
        for flags, options in command.args:
            options = dict(options)
            if options.pop("exclusive", False):
                exclusive = exclusive or p.add_mutually_exclusive_group()
                exclusive.add_argument(*flags, **options)
            else:
                p.add_argument(*flags, **options)
        p.set_defaults(func=command.run)
        leaves[command.name] = p
    return parser, leaves


def build_parser(width: int | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``face-assets``, built from :data:`COMMANDS` (exposed for documentation
    and tests); ``width`` fixes the columns of the help text."""
    return _build(width)[0]


def cli_reference() -> str:
    """The command reference of the README: the top-level help, then the usage of every command."""
    parser, leaves = _build(REFERENCE_WIDTH)
    lines = [parser.format_help().rstrip(), "", "Every command also takes the options above, after its name too:", ""]
    prefix = "usage: "
    for command in COMMANDS:
        usage = leaves[command.name].format_usage().replace(" [-h]", "").rstrip().splitlines()
        lines += [line.removeprefix(prefix) if i == 0 else line[len(prefix):] for i, line in enumerate(usage)]
        lines.append(f"    {command.help}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed command line, the shared options filled in; a wrong one exits with status 2."""
    args = build_parser().parse_args(argv)
    for name, default in SHARED_DEFAULTS.items():
        if not hasattr(args, name):
            setattr(args, name, default)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``face-assets`` command."""
    args = parse_args(argv)
    try:
        return args.func(args)
    except FaceRecognitionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
