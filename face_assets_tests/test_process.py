"""Process-wide settings: applied once at start-up from the configuration, before faiss loads OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

START_UP = textwrap.dedent(
    """
    import os, sys
    import face_assets, face_assets.cli, face_assets.pipeline.definitions
    print("faiss loaded by imports:", "faiss" in sys.modules)
    from face_assets.config import load_settings
    from face_assets.process import apply_process_settings, faiss
    first = apply_process_settings(load_settings(overrides={"process": {"omp_threads": 1, "omp_wait_policy": "active"}}))
    later = apply_process_settings(load_settings())
    print(os.environ["OMP_WAIT_POLICY"], faiss.omp_get_max_threads(), later is first)
    """
)


def test_settings_apply_once_at_start_up_before_faiss_loads():
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", START_UP], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["faiss loaded by imports: False", "ACTIVE 1 True"], out.stderr


BACKGROUND = textwrap.dedent(
    """
    import os, threading
    from face_assets.config import load_settings
    from face_assets.process import apply_process_settings, at_background_priority
    apply_process_settings(load_settings(overrides={"process": {"background_nice": 7}}))

    def nice():
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def heavy():
        inner = []
        started = threading.Thread(target=lambda: inner.append(nice()))  # a pool the work starts
        started.start()
        started.join()
        return nice(), inner[0]

    before = nice()
    print(at_background_priority(heavy) == (max(before, 7),) * 2, nice() == before)
    try:
        at_background_priority(lambda: 1 / 0)
    except ZeroDivisionError:
        print("raised in the caller")
    """
)


def test_heavy_work_runs_behind_searches_on_its_own_thread():
    """The pipeline's heavy work runs at ``process.background_nice``, with the threads it starts;
    the caller keeps its priority and gets the work's result, or its exception."""
    env = os.environ | {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", BACKGROUND], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.splitlines() == ["True True", "raised in the caller"], out.stderr


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="Linux's session CPU shares (autogroup) only")
def test_the_daemons_session_gets_a_lower_cpu_share_not_the_shell_it_came_from():
    """A process leading its own session (the daemon, as the units and the soak start it) lowers
    that session's CPU share; one started inside another session (a shell's) changes nothing."""
    # A session in the kernel's root group (a container's first session, some CI runners) reads
    # as an empty autogroup file: print the whole text, not its last word.
    code = ("from face_assets.process import lower_session_share\n"
            "print(lower_session_share(5)); print(repr(open('/proc/self/autogroup').read().strip()))")
    own = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    assert own.stdout.splitlines()[0] == "True", own.stderr
    assert own.stdout.splitlines()[1].endswith(" nice 5'"), own.stdout
    inside = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    caller = Path("/proc/self/autogroup").read_text().strip()
    assert inside.stdout.splitlines() == ["False", repr(caller)], inside.stderr  # the caller's, unchanged
