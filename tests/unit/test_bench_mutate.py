"""bench/mutate.py, the mutation runner: which mutants it makes and that each one is applied
(a mutant that is not applied would pass as a survivor, or hide one)."""

from __future__ import annotations

import ast

from bench import mutate

SOURCE = '''
"""A module docstring."""
LIMIT = 4


def check(a, b, flag=False, *, strict=True):
    """A docstring."""
    x: int = a + 1
    if a < b and not flag:
        return min(a, b) - 1
    del x
    return None
'''


def run(index: int, *args, **kwargs):
    namespace: dict = {}
    exec(compile(mutate.mutate(SOURCE, index), "<m>", "exec"), namespace)  # noqa: S102
    return namespace["LIMIT"], namespace["check"](*args, **kwargs)


def test_sites_in_a_fixed_order_and_nothing_else():
    assert [what for _, what in mutate.sites(SOURCE)] == [
        "4 -> 5",
        "False -> True",
        "True -> False",
        "1 -> 2",
        "'+' -> '-'",
        "removed x: int = a + 1",
        "'min' -> 'max'",
        "1 -> 2",
        "'-' -> '+'",
        "removed return min(a, b) - 1",
        "'<' -> '>='",
        "'not' removed",
        "'and' -> 'or'",
        "removed del x",
    ]  # children before their parent, a body before its test; no docstring, annotation or
    # closing ``return None``
    assert mutate.sites(SOURCE) == mutate.sites(SOURCE)


def test_every_mutant_is_applied():
    """Each mutant changes the compiled code; defaults included (they were not, at first)."""
    original = ast.dump(ast.parse(SOURCE))
    for i in range(len(mutate.sites(SOURCE))):
        assert ast.dump(mutate.mutate(SOURCE, i)) != original, i
    assert run(-1, 1, 2) == (4, 0)
    assert run(0, 1, 2) == (5, 0)  # the module constant
    assert run(1, 1, 2) == (4, None)  # the default of flag: the branch is not taken
    assert run(9, 1, 2) == (4, None)  # return removed: falls through


def test_tests_of_a_module_are_the_files_importing_it():
    assert "tests/unit/test_gate.py" in mutate.tests_of("gate")
    assert all(path.startswith("tests/unit/test_") for path in mutate.tests_of("classify"))
