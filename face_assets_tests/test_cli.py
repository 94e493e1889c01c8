"""The command line's parser: one table of commands, shared options, argument checks, its reference."""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from face_assets.cli import COMMANDS, GROUPS, _build, cli_reference, parse_args

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md"))]
COMMAND_LINE = re.compile(r"(?:^|(?<=[\s`/(]))face-assets((?: +[^\s`|#;)&]+)*)", re.M)
"""``face-assets`` and the words after it, up to the end of a span, a comment, a pipe or a shell operator."""


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


def test_the_former_index_dir_option_is_gone(capsys):
    with pytest.raises(SystemExit):
        parse_args(["serve", "--index-dir", "d"])
    assert "unrecognized arguments: --index-dir" in capsys.readouterr().err


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


def _documented_commands(docs: list[Path]) -> list[tuple[str, list[str], bool]]:
    """Every ``face-assets ...`` written in ``docs``: the file, the words after it, and whether it is a
    concrete command line of a code block (no usage notation, no line continuation)."""
    found = []
    for doc in docs:
        text = doc.read_text()
        blocks = [m.span(1) for m in re.finditer(r"^```[a-z]*\n(.*?)^```", text, re.M | re.S)]
        for m in COMMAND_LINE.finditer(text):
            words = m.group(1).split()
            in_block = any(a <= m.start() < b for a, b in blocks)
            notation = any(c in m.group(1) for c in "[]{}<>\\") or "..." in m.group(1)
            found.append((doc.name, words, in_block and not notation and bool(words)))
    return found


def _wrong_commands(commands: list[tuple[str, list[str], bool]]) -> list[tuple[str, str, str]]:
    """The documented commands the parser does not know: (file, what is wrong, the command)."""
    parser, leaves = _build()
    shared = parser._option_string_actions
    wrong = []
    for doc, words, concrete in commands:
        rest = [w.strip("[]") for w in words]  # usage notation: [--option VALUE]
        while rest and rest[0] in shared:  # shared options before the command, with their value
            option = rest.pop(0)
            if shared[option].nargs != 0 and rest:
                rest.pop(0)
        if not rest or rest[0] == "COMMAND":
            continue
        name = next((n for n in (" ".join(rest[:2]), rest[0]) if n in leaves), None)
        if name is None:
            if not (rest[0] in GROUPS and (len(rest) == 1 or rest[1] == "COMMAND")):
                wrong.append((doc, "unknown command", " ".join(words)))
            continue
        options = leaves[name]._option_string_actions
        for option in (o for w in rest for o in re.findall(r"(?<![\w-])(--?[a-z][a-z-]*)", w)):
            if option not in options and option not in shared:
                wrong.append((doc, f"no option {option}", " ".join(words)))
        if concrete:
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err):
                    parse_args(shlex.split(" ".join(words)))
            except SystemExit:
                wrong.append((doc, err.getvalue().strip().splitlines()[-1], " ".join(words)))
    return wrong


def test_commands_and_options_in_the_docs_exist():
    """What the README and the guides tell people to type is what the parser accepts: each command and option
    named exists (read against the parser's table), and each concrete command line of a code block parses."""
    commands = _documented_commands(DOCS)
    assert len(commands) > 50 and sum(concrete for *_, concrete in commands) > 10  # the extraction finds them
    assert _wrong_commands(commands) == []


@pytest.mark.parametrize("text, problem", [
    ("Run `face-assets cluster fuse 1 2`.", "unknown command"),
    ("Run `face-assets search q.jpg --top 5`.", "no option --top"),
    ("```bash\nface-assets cluster merge 12\n```", "the following arguments are required"),
], ids=["command", "option", "arguments"])
def test_the_docs_check_finds_a_wrong_command(text, problem, tmp_path):
    doc = tmp_path / "wrong.md"
    doc.write_text(text + "\n")
    (found,) = _wrong_commands(_documented_commands([doc]))
    assert problem in found[1]
