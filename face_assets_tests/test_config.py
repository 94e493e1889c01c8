"""Configuration: defaults, files, environment overrides and errors that name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from face_assets.config import load_settings, write_settings
from face_assets.errors import ConfigError


def test_defaults_are_valid():
    s = load_settings(environ={})
    assert s.models.pack == "buffalo_s"
    assert s.detection.det_size == 640
    assert s.storage.duckdb_path.name == "face_assets.duckdb"


def test_yaml_and_toml_files(tmp_path):
    (tmp_path / "c.yaml").write_text("filter:\n  min_det_score: 0.7\nmodels:\n  device: auto\n")
    (tmp_path / "c.toml").write_text("[detection]\ndet_size = 320\n")
    assert load_settings(tmp_path / "c.yaml", environ={}).filter.min_det_score == 0.7
    assert load_settings(tmp_path / "c.toml", environ={}).detection.det_size == 320


def test_unknown_key_names_key_and_allowed_keys(tmp_path):
    (tmp_path / "c.yaml").write_text("filter:\n  min_det_scor: 0.7\n")
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path / "c.yaml", environ={})
    assert "filter.min_det_scor" in str(err.value)
    assert "min_det_score" in str(err.value)


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'filtr'.*filter"):
        load_settings(overrides={"filtr": {}}, environ={})


def test_wrong_choice_lists_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_settings(overrides={"models": {"device": "tpu"}}, environ={})
    msg = str(err.value)
    assert "models.device" in msg and "'cpu'" in msg and "'cuda'" in msg and "'auto'" in msg


def test_out_of_range_value():
    with pytest.raises(ConfigError, match="filter.min_det_score"):
        load_settings(overrides={"filter": {"min_det_score": 1.5}}, environ={})
    with pytest.raises(ConfigError, match="multiple of 32"):
        load_settings(overrides={"detection": {"det_size": 100}}, environ={})


def test_environment_overrides_file(tmp_path):
    (tmp_path / "c.yaml").write_text("filter:\n  min_det_score: 0.7\n")
    env = {"FACE_ASSETS__FILTER__MIN_DET_SCORE": "0.8", "FACE_ASSETS__MODELS__DEVICE": "auto"}
    s = load_settings(tmp_path / "c.yaml", environ=env)
    assert s.filter.min_det_score == 0.8 and s.models.device == "auto"


def test_config_path_from_environment(tmp_path):
    (tmp_path / "c.yaml").write_text("detection:\n  pad_ratio: 0.25\n")
    assert load_settings(environ={"FACE_ASSETS_CONFIG": str(tmp_path / "c.yaml")}).detection.pad_ratio == 0.25


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml", environ={})
    (tmp_path / "bad.yaml").write_text("filter: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid"):
        load_settings(tmp_path / "bad.yaml", environ={})
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(tmp_path / "list.yaml", environ={})


def test_write_and_read_back(tmp_path):
    s = load_settings(overrides={"filter": {"min_face_size": 55}}, environ={})
    path = write_settings(s, tmp_path / "out.yaml")
    assert load_settings(path, environ={}) == s


def test_configuration_doc_lists_every_setting():
    from face_assets.config import config_reference

    doc = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text()
    assert config_reference() in doc, "regenerate with: face-assets config --reference"


def test_api_doc_matches_docstrings():
    from face_assets.apidoc import render

    doc = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    assert doc == render(), "regenerate with: python -m face_assets.apidoc > docs/api.md"


# -- the settings the README and the guides name ----------------------------------------------------

DOCS = [Path(__file__).resolve().parents[1] / "README.md",
        *sorted((Path(__file__).resolve().parents[1] / "docs").glob("*.md"))]
GATE_CHECKS = {"auc", "tar_at_far", "accuracy", "rank1"}
"""Metrics of the promotion gate, named ``<set>.<metric>`` in its report (``feedback.auc``): not settings."""
FILE_TYPES = {"py", "duckdb", "yaml", "md", "parquet", "json"}
"""``feedback.duckdb``, ``storage.py``: file names, not settings."""


def _wrong_settings(docs: list[Path]) -> list[tuple[str, str]]:
    """Settings named in ``docs`` that :class:`Settings` does not have: ``section.key`` in backticks, the
    environment's ``FACE_ASSETS__SECTION__KEY``, and YAML blocks (loaded as a config file, unless the block
    says it is Dagster's ``# dagster.yaml``)."""
    import importlib

    import yaml

    from face_assets.config import Settings

    sections = Settings.model_fields
    wrong = []
    for doc in docs:
        text = doc.read_text()
        for m in re.finditer(r"`([a-z_]+)\.([a-z_][a-z0-9_]*)(?:[ =:][^`]*)?`", text):
            section, key = m.groups()
            if (section not in sections or key in sections[section].annotation.model_fields or key in GATE_CHECKS
                    or key in FILE_TYPES):
                continue
            module = importlib.util.find_spec(f"face_assets.{section}")
            if module is None or not hasattr(importlib.import_module(f"face_assets.{section}"), key):
                wrong.append((doc.name, m.group(0)))  # neither a setting nor a function of the module so named
        for m in re.finditer(r"FACE_ASSETS__([A-Z_]+?)__([A-Z0-9_]+)", text):
            section, key = m.group(1).lower(), m.group(2).lower()
            if section != "section" and (section not in sections or key not in sections[section].annotation.model_fields):
                wrong.append((doc.name, m.group(0)))
        for block in re.findall(r"^```yaml\n(.*?)^```", text, re.M | re.S):
            if block.startswith("# dagster.yaml"):
                continue
            try:
                load_settings(overrides=yaml.safe_load(block), environ={})
            except ConfigError as exc:
                wrong.append((doc.name, str(exc)))
    return wrong


def test_settings_named_in_the_docs_exist():
    """Every setting the README and docs/*.md name (``section.key``, an environment override, a YAML example)
    is one of :class:`Settings`, with a valid value in the examples."""
    assert _wrong_settings(DOCS) == []


@pytest.mark.parametrize("text", [
    "Raise `pipeline.batch_sizes` for larger partitions.",
    "Set `FACE_ASSETS__WEB__PORT=8080`.",
    "```yaml\nstorage:\n  data_dir: data\n  index_dir: old\n```",
    "```yaml\nfilter:\n  min_det_score: 7\n```",
], ids=["key", "environment", "yaml-key", "yaml-value"])
def test_the_docs_check_finds_a_wrong_setting(text, tmp_path):
    doc = tmp_path / "wrong.md"
    doc.write_text(text + "\n")
    assert len(_wrong_settings([doc])) == 1


def test_the_data_folder_layout_names_every_path_once(tmp_path):
    """Every path of the layout lies inside the data folder, no two are the same, and the file names come from
    the settings that name them."""
    from face_assets.config import DataLayout

    s = load_settings(overrides={"storage": {"data_dir": str(tmp_path)}, "web": {"tokens_file": "keys/t.json"}},
                      environ={})
    layout = s.layout
    names = [n for n, v in vars(DataLayout).items() if isinstance(v, property)]
    paths = {n: getattr(layout, n) for n in names}
    assert len(paths) >= 15 and all(p.is_relative_to(tmp_path) and p != tmp_path for p in paths.values()), paths
    assert len(set(paths.values())) == len(paths)
    assert (layout.catalog, layout.catalog_master) == (s.storage.duckdb_path, s.storage.master_path)
    assert (layout.tokens, layout.sessions) == (tmp_path / "keys" / "t.json", tmp_path / "keys" / "sessions.sqlite")
