"""The command line's parser: one table of commands, shared options, argument checks, its reference."""

from __future__ import annotations

from pathlib import Path

import pytest

from face_assets.cli import COMMANDS, cli_reference, parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_readme_holds_the_command_reference():
    readme = (REPO_ROOT / "README.md").read_text()
    assert cli_reference() in readme, "regenerate with: python -c 'from face_assets.cli import cli_reference; print(cli_reference())'"


def test_shared_options_before_or_after_the_command():
    before = parse_args(["--data-dir", "d", "--config", "c.yaml", "--json", "cluster", "list"])
    after = parse_args(["cluster", "list", "--data-dir", "d", "--config", "c.yaml", "--json"])
    for args in (before, after):
        assert (args.data_dir, args.config, args.json, args.func.__name__) == ("d", "c.yaml", True, "cmd_cluster_list")
    plain = parse_args(["stats"])
    assert (plain.data_dir, plain.config, plain.json) == (None, None, False)


def test_index_dir_is_a_deprecated_name_of_data_dir(capsys):
    assert parse_args(["serve", "--index-dir", "d"]).data_dir == "d"
    assert "--index-dir is deprecated, use --data-dir" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [
    ["cluster", "merge", "5"],  # merging needs two clusters
    ["cluster", "split", "3", "--faces", "1", "2", "--k", "2"],  # faces or k, not both
    ["cluster", "split", "3", "--k", "1"],
    ["cluster", "show", "x"],
    ["cluster", "move", "7"],
    ["search", "q.jpg", "--top-k", "0"],
    ["search", "q.jpg", "--threshold", "1.5"],
    ["serve", "--port", "70000"],
    ["serve", "--json"],  # nothing to print as JSON
    ["token", "create", "bob", "--role", "owner"],
    ["cluster"],
    [],
])
def test_the_parser_refuses_wrong_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_every_command_parses_with_its_arguments():
    required = {"filter": ["a.jpg"], "import": ["faces.parquet"], "search": ["a.jpg"], "compare": ["a.jpg", "b.jpg"], "remove": ["7"],
                "calibrate": ["dir"], "token create": ["bob"], "token revoke": ["bob"], "feedback export": ["out"],
                "model promote": ["v1"], "cluster show": ["3"], "cluster merge": ["3", "4", "5"],
                "cluster split": ["3", "--faces", "1", "2"], "cluster move": ["9", "3"], "cluster rename": ["3"]}
    for command in COMMANDS:
        args = parse_args(command.name.split() + required.get(command.name, []))
        assert args.func is command.run, command.name
    merged = parse_args(["cluster", "merge", "3", "4", "5"])
    assert (merged.cluster, merged.others) == (3, [4, 5])
