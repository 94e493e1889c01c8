"""Process-wide settings: applied once at start-up from the configuration, before faiss loads OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

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
