"""The operator's documents run as written: every SQL example, the Python example and the shell commands.

A fixture deployment is made the way the documents make one, from a folder that holds ``data/``,
``dagster.yaml`` and ``workspace.yaml`` (the repository root of a checkout): ``face-assets
pipeline`` over photos dropped into ``data/incoming/``, votes cast through the library, and
``face-assets feedback export``. Then each SQL block of docs/operations.md, docs/pipeline.md and
docs/feedback.md runs on the file its first line names (``-- duckdb -readonly data/...``), the
Python block of docs/operations.md runs, and each shell command of docs/operations.md and
docs/pipeline.md that a test can run (:data:`RUNNABLE`) runs with ``.venv/bin/`` meaning this
interpreter's folder. The deployment files of ``deploy/`` are checked for what the documents say
of them.
"""

from __future__ import annotations

import configparser
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest
import yaml

pytestmark = [pytest.mark.slow, pytest.mark.dagster]  # the guides' SQL and commands on a deployment made by the pipeline

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = REPO_ROOT / "docs"
BIN = Path(sys.executable).parent
PEOPLE = {"Colin_Powell": 3, "Tony_Blair": 3, "Hugo_Chavez": 3}
OTHERS = ["cartoon/dualstylegan/cartoon/cartoon_001.png", "corrupted/truncated_50pct.jpg"]

RUNNABLE = (".venv/bin/face-assets pipeline", ".venv/bin/dagster asset materialize", ".venv/bin/dagster instance migrate",
            ".venv/bin/face-assets token create", "DAGSTER_HOME=$PWD .venv/bin/dagster instance migrate")
"""Shell commands of the documents that run to an end on their own (servers and `make` are tested elsewhere)."""

HEADER = re.compile(r"^-- duckdb(?: -readonly (?P<file>\S+))?")


def _blocks(doc: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / doc).read_text(), flags=re.S)


def _commands(doc: str) -> list[str]:
    """Runnable shell lines of ``doc``'s bash blocks, without their comments."""
    lines = [line.split("  #")[0].strip() for block in _blocks(doc, "bash") for line in block.splitlines()]
    return [line for line in lines if line.startswith(RUNNABLE)]


def _env(root: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FACE_ASSETS", "DAGSTER"))}
    return env | {"DAGSTER_HOME": str(root), "PYTHONPATH": str(REPO_ROOT)}


def _shell(command: str, root: Path, **subs: str) -> subprocess.CompletedProcess:
    command = command.replace(".venv/bin/", f"{BIN}/")
    for placeholder, value in subs.items():
        command = command.replace(placeholder, value)
    return subprocess.run(["bash", "-c", command], cwd=root, env=_env(root), capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def deployment(datasets, tmp_path_factory) -> Path:
    """A checkout-like folder after ``face-assets pipeline``, votes and an export."""
    root = tmp_path_factory.mktemp("deployment")
    for name in ("dagster.yaml", "workspace.yaml"):
        shutil.copy(REPO_ROOT / name, root / name)
    incoming = root / "data" / "incoming"
    incoming.mkdir(parents=True)
    for person, n in PEOPLE.items():
        for i in range(1, n + 1):
            shutil.copy(datasets / "real" / "lfw10" / person / f"{person}_{i:04d}.jpg", incoming)
    for rel in OTHERS:
        shutil.copy(datasets / rel, incoming / Path(rel).name)
    (pipeline_command,) = [c for c in _commands("pipeline.md") if c.startswith(".venv/bin/face-assets pipeline")]
    done = _shell(pipeline_command, root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["success"]

    from face_assets.library import FaceRecognitionLibrary

    cwd = Path.cwd()
    os.chdir(root)  # the documents' paths are relative to the folder that holds data/
    try:
        with FaceRecognitionLibrary(index_dir="data") as lib:
            for person in PEOPLE:
                ((face_id,),) = lib.catalog.query(
                    "SELECT f.face_id FROM faces f JOIN images i USING (image_id) WHERE i.path LIKE ? AND f.is_valid "
                    "ORDER BY f.face_width * f.face_height DESC LIMIT 1", [f"%{person}_0001.jpg"])
                q = lib.feedback_search(face_id=face_id, top_k=8)
                for hit in q.results:
                    lib.record_feedback(q.query_id, hit.face_id, "up" if person in hit.path else "down", voter="doc")
    finally:
        os.chdir(cwd)
    export = _shell(".venv/bin/face-assets feedback export data/feedback/export", root)
    assert export.returncode == 0, export.stderr[-3000:]
    return root


def test_every_sql_example_runs_on_the_file_it_names(deployment, monkeypatch):
    monkeypatch.chdir(deployment)  # read_parquet's paths are relative, like the files named
    ran = 0
    for doc in ("operations.md", "pipeline.md", "feedback.md"):
        for block in _blocks(doc, "sql"):
            header = HEADER.match(block)
            assert header, f"{doc}: a SQL example must name its file on its first line:\n{block}"
            target = header["file"]
            with duckdb.connect(target or ":memory:", read_only=bool(target)) as con:
                for statement in filter(str.strip, block.split(";")):
                    try:
                        con.execute(statement).fetchall()
                    except duckdb.Error as exc:
                        pytest.fail(f"{doc}, on {target or 'no database'}:\n{statement}\n-> {exc}")
            ran += 1
    assert ran >= 12


def test_the_python_example_of_operations_runs(deployment, monkeypatch):
    monkeypatch.chdir(deployment)
    (block,) = [b for b in _blocks("operations.md", "python") if "duckdb.connect" in b]
    namespace: dict = {}
    exec(compile(block, "docs/operations.md", "exec"), namespace)  # noqa: S102 - the document's own example
    assert namespace["con"].execute("SELECT count(*) FROM votes.feedback").fetchone()[0] > 0


def test_shell_commands_of_the_guides_run_as_written(deployment):
    commands = _commands("operations.md") + _commands("pipeline.md")
    assert any("asset materialize" in c for c in commands) and any("token create" in c for c in commands)
    key = sorted(p.name for p in (deployment / "data" / "pipeline" / "batches").glob("b-*"))[0]
    for command in commands:
        if command.startswith(".venv/bin/face-assets pipeline"):
            continue  # made the deployment
        done = _shell(command, deployment, **{"<batch key>": key})
        assert done.returncode == 0, f"{command}\n{done.stderr[-3000:]}"


def test_systemd_units_are_ordered_and_installable(tmp_path):
    units = {}
    for path in sorted((REPO_ROOT / "deploy" / "systemd").glob("*.service")):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        parser.optionxform = str
        parser.read_string(path.read_text())
        units[path.stem] = parser
    assert set(units) == {"face-assets-dagster-init", "face-assets-dagster-daemon", "face-assets-dagster-webserver",
                          "face-assets-serve"}
    for name, unit in units.items():
        assert unit["Install"]["WantedBy"] == "multi-user.target", name
        assert unit["Service"]["ExecStart"].startswith("/srv/face_assets/.venv/bin/"), name
    assert units["face-assets-dagster-init"]["Service"]["Type"] == "oneshot"
    for name in ("face-assets-dagster-daemon", "face-assets-dagster-webserver"):
        assert "face-assets-dagster-init.service" in units[name]["Unit"]["Requires"]
        assert "face-assets-dagster-init.service" in units[name]["Unit"]["After"]
        assert " -m face_assets.pipeline.processes " in units[name]["Service"]["ExecStart"]
    # systemd's own check, where it is installed: the units moved to a folder with stand-in
    # programs (and run as this user), as /srv/face_assets would hold them.
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        return
    bin_dir = tmp_path / "srv" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    for program in ("python", "dagster", "face-assets"):
        (bin_dir / program).write_text("#!/bin/sh\n")
        (bin_dir / program).chmod(0o755)
    user = pwd.getpwuid(os.getuid()).pw_name
    for path in (REPO_ROOT / "deploy" / "systemd").glob("*.service"):
        text = path.read_text().replace("/srv/face_assets", str(tmp_path / "srv")).replace("User=face-assets",
                                                                                           f"User={user}")
        (tmp_path / path.name).write_text(text)
    done = subprocess.run([analyze, "verify", "--man=no", *sorted(str(p) for p in tmp_path.glob("*.service"))],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr


def test_compose_file_has_the_documented_services():
    compose = yaml.safe_load((REPO_ROOT / "deploy" / "compose.yaml").read_text())
    services = compose["services"]
    assert set(services) == {"dagster-init", "dagster-daemon", "dagster-webserver", "serve", "postgres"}
    for name in ("dagster-daemon", "dagster-webserver"):
        assert services[name]["depends_on"] == {"dagster-init": {"condition": "service_completed_successfully"}}
    assert services["dagster-init"]["command"] == ["dagster", "instance", "migrate"]
    assert services["postgres"]["profiles"] == ["postgres"]
    for name in ("dagster-init", "dagster-daemon", "dagster-webserver", "serve"):
        assert services[name]["image"] == "face-assets"  # one image, from deploy/Dockerfile
        assert services[name]["environment"]["DAGSTER_HOME"] == "/srv/face_assets"
    assert (REPO_ROOT / "deploy" / "Dockerfile").is_file()
