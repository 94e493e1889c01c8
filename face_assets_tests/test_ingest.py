"""Bulk filter+embed into the DuckDB catalog: accounting, idempotence, bad files, the CLI."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import duckdb
import pytest

from face_assets import FaceFilter, load_settings
from face_assets.ingest import ingest_paths, iter_image_files
from face_assets.store import Catalog


@pytest.fixture()
def folder(tmp_path, datasets):
    src = tmp_path / "in"
    src.mkdir()
    for p in sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[:3]:
        shutil.copy(p, src / p.name)
    shutil.copy(sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[0], src / "copy_of_first.jpg")
    shutil.copy(datasets / "corrupted" / "truncated_50pct.jpg", src)
    shutil.copy(datasets / "corrupted" / "all_black_640x480.png", src)
    (src / "notes.txt").write_text("not an image")
    return src


def test_ingest_accounts_for_every_file_and_is_idempotent(tmp_path, folder):
    settings = load_settings(environ={})
    face_filter = FaceFilter(settings)
    paths = iter_image_files(folder)
    seen = []
    with Catalog(tmp_path / "cat.duckdb") as catalog:
        s = ingest_paths(paths, face_filter, catalog, on_progress=lambda d, t, p: seen.append((d, t)))
        assert s.total == 7 and seen[-1] == (7, 7)
        assert s.valid == 3 and s.skipped == 1 and s.unreadable == 2 and dict(s.rejected) == {"no_face": 1}
        assert s.valid + sum(s.rejected.values()) + s.unreadable + s.skipped == s.total
        again = ingest_paths(paths, face_filter, catalog)
        assert again.skipped == 7 and again.faces == 0
        rows = dict(catalog.query("SELECT status, count(*) FROM images GROUP BY status"))
        assert rows == {"valid": 3, "rejected": 1, "unreadable": 2}
        n_faces, dim, version = catalog.query(
            "SELECT count(*), max(len(embedding)), any_value(model_version) FROM faces"
        )[0]
        assert n_faces == s.faces >= 3 and dim == 512 and version == face_filter.analyzer.model_version
        err = catalog.query("SELECT error FROM images WHERE path LIKE '%notes.txt'")[0][0]
        assert "not a recognised" in err


@pytest.mark.slow  # command-line subprocesses, each loading the models
def test_cli_process_and_filter(tmp_path, folder, datasets):
    env_cmd = [sys.executable, "-m", "face_assets.cli", "--data-dir", str(tmp_path / "data")]
    out = subprocess.run(env_cmd + ["index", str(folder), "--json"], capture_output=True, text=True, check=True)
    summary = json.loads(out.stdout)
    assert summary["total"] == 7 and summary["valid"] == 3
    con = duckdb.connect(str(tmp_path / "data" / "face_assets.duckdb"), read_only=True)
    assert con.execute("SELECT count(*) FROM images").fetchone()[0] == 6
    con.close()
    img = str(sorted((datasets / "real" / "lfw10").rglob("*.jpg"))[0])
    out = subprocess.run(env_cmd + ["filter", img, "--json"], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout)[img]["is_valid"] is True
    out = subprocess.run(env_cmd + ["filter", img], capture_output=True, text=True, check=True)
    assert "valid" in out.stdout and "det_score=" in out.stdout
