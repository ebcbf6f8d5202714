"""The command line: a command group's flags are accepted before and after its sub-command."""

from __future__ import annotations

import argparse

import pytest

from tencrypt.cli import build_parser, share_group_flags

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
