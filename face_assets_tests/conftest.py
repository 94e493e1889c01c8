"""Shared fixtures: where the shared datasets live, and temporary data folders."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from face_assets.config import DATASETS_ENV, datasets_root

REPO_ROOT = Path(__file__).resolve().parents[1]


def pytest_configure(config: pytest.Config) -> None:
    # The shared datasets beside this checkout, for every test and the subprocesses they start,
    # wherever they run (FACE_ASSETS_DATASETS, when set, wins).
    os.environ.setdefault(DATASETS_ENV, str(datasets_root(base=REPO_ROOT)))


# -- test tiers ------------------------------------------------------------------------------------
# Markers (registered in pyproject.toml) sit on the tests themselves: `pytestmark` for a whole module,
# a decorator for one test (`slow`: over ~15 s on 2 busy cores, measured with --durations), a
# `pytest.param(..., marks=...)` for one parameter. `make test-fast` deselects them all, `make test`
# runs everything. The one marker given here follows from a fixture: a test that asks for the
# PostgreSQL server cannot run without one.
FIXTURE_MARKERS = {"postgres_server": "postgres", "postgres_dsn": "postgres"}


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        for name in sorted({FIXTURE_MARKERS[f] for f in item.fixturenames if f in FIXTURE_MARKERS}):
            item.add_marker(name)


@pytest.fixture(scope="session")
def datasets() -> Path:
    """The shared datasets folder; tests that need it skip with a clear message when it is absent."""
    root = datasets_root()
    if not (root / "manifest.csv").is_file():
        pytest.skip(f"shared datasets not found at {root} (set FACE_ASSETS_DATASETS)")
    return root


@pytest.fixture(scope="session")
def feedback_people(datasets) -> dict[str, list[Path]]:
    """Four photos each of three LFW persons: the real faces the feedback and web tests vote on."""
    root = datasets / "real" / "lfw10"
    names = sorted(p.name for p in root.iterdir() if p.is_dir())[:3]
    return {n: sorted((root / n).glob("*.jpg"))[:4] for n in names}


@pytest.fixture(scope="session")
def indexed_dir(tmp_path_factory, feedback_people) -> Path:
    """A data folder with ``feedback_people`` indexed once per session; copy it before writing to it."""
    from face_assets.library import FaceRecognitionLibrary

    folder = tmp_path_factory.mktemp("indexed")
    with FaceRecognitionLibrary(index_dir=folder) as lib:
        summary = lib.index_batch([p for paths in feedback_people.values() for p in paths])
        assert summary.valid == 12
    return folder


def _postgres_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[str]:
    """A throwaway PostgreSQL server on loopback from the system packages; yields its base conninfo.

    The cluster lives in a temporary folder; as root it runs as the ``postgres`` system user (the
    server refuses to run as root). It is stopped and deleted at the end of the session.
    """
    bindir = _postgres_bindir()
    if bindir is None:
        message = "PostgreSQL server not installed: run scripts/ci_system_packages.sh"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    root = Path(tempfile.mkdtemp(prefix="face-assets-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        user = "postgres" if _user_exists("postgres") else "nobody"
        shutil.chown(root, user)
        run_as = ["runuser", "-u", user, "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = root / "data"
    subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "--auth=trust", "-U", "postgres", "-E", "UTF8",
                             "--no-instructions"], check=True, capture_output=True)
    options = f"-c listen_addresses=127.0.0.1 -p {port} -c unix_socket_directories={root} -c fsync=off"
    subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(root / "log"), "-w",
                             "start"], check=True, capture_output=True)
    try:
        yield f"host=127.0.0.1 port={port} user=postgres"
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture()
def postgres_dsn(postgres_server) -> str:
    """A fresh, empty database on the test PostgreSQL server."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(f"{postgres_server} dbname=postgres", autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return f"{postgres_server} dbname={name}"
