"""The command line: a command group's flags are accepted before and after its sub-command."""

from __future__ import annotations

import argparse

import pytest

from tencrypt.cli import (
    COMMANDS,
    build_parser,
    command_of,
    parse_args,
    share_group_flags,
    terminal_columns,
)

# (flags of the sub-command itself, positionals) for each lab action
LAB = {
    "up": (["--nodes", "2"], []),
    "status": ([], []),
    "exec": ([], ["nginx1", "--", "curl", "-s", "http://nginx2:8080/"]),
    "patch": (["--no-strict"], ["nginx1"]),
    "unpatch": ([], ["nginx1"]),
    "down": ([], []),
}


def parse(argv: list[str]) -> dict[str, object]:
    return vars(build_parser().parse_args(argv))


@pytest.mark.parametrize("action", sorted(LAB))
def test_lab_name_before_or_after_the_action(action: str) -> None:
    own, positionals = LAB[action]
    before = parse(["lab", "--name", "x1", action, *own, *positionals])
    after = parse(["lab", action, "--name", "x1", *own, *positionals])
    assert before == after
    assert before["name"] == "x1" and before["lab_command"] == action
    default = parse(["lab", action, *own, *positionals])
    assert default["name"] == "tenc"
    assert {k: v for k, v in default.items() if k != "name"} == {
        k: v for k, v in before.items() if k != "name"
    }


def test_exec_keeps_the_command_intact() -> None:
    args = parse(["lab", "exec", "--name", "x1", "nginx1", "--", "curl", "--name", "y"])
    assert args["name"] == "x1" and args["pod"] == "nginx1"
    assert args["cmd"] == ["curl", "--name", "y"]


def test_after_the_action_wins_and_typos_still_fail() -> None:
    assert parse(["lab", "--name", "a", "down", "--name", "b"])["name"] == "b"
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["lab", "up", "--nmae", "x"])
    assert exc.value.code == 2


def test_sub_command_own_flag_of_the_same_spelling_wins() -> None:
    group = argparse.ArgumentParser()
    group.add_argument("--mode", default="group")
    group.add_argument("--level", type=int, default=1)
    sub = group.add_subparsers(dest="action", required=True)
    sub.add_parser("a").add_argument("--mode", default="own")
    sub.add_parser("b")
    share_group_flags(group)
    assert vars(group.parse_args(["a"])) == {"mode": "own", "level": 1, "action": "a"}
    assert vars(group.parse_args(["b", "--level", "3"])) == {
        "mode": "group",
        "level": 3,
        "action": "b",
    }
    assert vars(group.parse_args(["--level", "2", "b"]))["level"] == 2


# one line of each command, as `main` parses it (flags of the named command only)
LINES = [
    ["run", "--psk-file", "k", "--no-strict", "--metrics", "127.0.0.1:9137", "--no-batch"],
    ["setup", "--undo", "--pod-cidr", "10.0.0.0/8", "--pod-cidr", "10.1.0.0/16"],
    ["dns", "--listen", "127.0.0.1:5353", "--cache-entries", "0"],
    ["lab", "up", "--name", "x1", "--nodes", "2"],
    ["lab", "--name", "x1", "exec", "nginx1", "--", "curl", "--name", "y"],
    ["demo", "--keep"],
    ["node-sync", "--once"],
    ["agent"],
    ["status", "--no-such-flag"],  # an error: the same one
    ["bench", "--quick", "--peer-binary", "wireguard-go=/x"],
]


@pytest.mark.parametrize("argv", LINES, ids=lambda a: " ".join(a[:2]))
def test_main_parses_a_line_as_the_whole_interface_does(argv: list[str]) -> None:
    """``parse_args`` declares the flags of the named command only: same result, same errors."""

    def outcome(parse: object) -> object:
        try:
            return vars(parse(argv))  # type: ignore[operator]
        except SystemExit as exc:
            return ("exit", exc.code)

    assert outcome(parse_args) == outcome(build_parser().parse_args)


def test_command_of_finds_the_command_word() -> None:
    assert command_of(["run", "--psk-file", "lab"]) == "run"
    assert command_of(["--version"]) is None
    assert command_of(["-h", "lab", "up"]) == "lab"
    assert command_of(["nope", "run"]) is None  # not a command: argparse reports it
    assert command_of([]) is None


def test_top_level_help_still_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    out = capsys.readouterr().out
    assert all(name in out for name, *_ in COMMANDS)


def test_help_width_follows_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The formatter measures the terminal as shutil would ($COLUMNS first), without shutil."""
    widest = {}
    for columns in (50, 200):
        monkeypatch.setenv("COLUMNS", str(columns))
        assert terminal_columns() == columns
        help_text = build_parser(only="run").format_help()
        widest[columns] = max(len(line) for line in help_text.splitlines())
    assert widest[50] <= 48 < widest[200]
    monkeypatch.setenv("COLUMNS", "not a number")
    assert terminal_columns() > 0
