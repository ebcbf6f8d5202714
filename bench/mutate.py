"""A bounded mutation run over core modules: ``python -m bench.mutate [MODULE ...]``.

Not a test and not part of CI (minutes, not seconds): how a change to a security rule is
checked. Each mutant is one small change to one module's syntax tree that a test should
notice; the unit tests that import the module run against it, and a mutant no test fails is a
rule no test holds (a *survivor*, printed as ``file:line: what changed``).

1. Mutants (``mutants``), in source order, so a run is reproducible: a comparison flipped
   (``<`` / ``>=``, ``<=`` / ``>``, ``==`` / ``!=``, ``in`` / ``not in``, ``is`` / ``is not``),
   ``and`` / ``or`` swapped, a ``not`` removed, ``+`` / ``-`` swapped, ``min`` / ``max``
   swapped, an integer constant plus one, ``True`` / ``False`` swapped, and a statement inside
   a function (an assignment, a call, a ``return``, ``raise``, ``del``, ``continue`` or
   ``break``) removed. Docstrings, annotations, imports, asserts, a dataclass ``field()``'s
   arguments and a function's closing ``return None`` (removing it changes nothing) are left
   alone.
2. Tests: the files under tests/unit that import the module (``tencrypt.core.X`` or ``from
   tencrypt.core import X``), or ``--tests``. They must pass on the unmutated module first.
3. Running: the third-party libraries are imported once; each mutant runs in a forked child
   that imports the mutated module (a meta-path finder compiled from the mutated tree; the
   file on disk is never changed) and runs pytest with ``-x``. Hypothesis is derandomized with
   no example database, so two runs give the same result.
4. Bounds: a mutant's tests get ``--timeout-factor`` times the unmutated run plus 5 s (then its
   process group is killed: TIMEOUT, which counts as killed: an infinite loop is noticed);
   ``--budget`` seconds for the whole run (mutants left are reported as not run);
   ``--sample N`` runs N mutants per module picked with ``--seed``.
5. Score: killed (timeouts included) over the mutants run; mutants that do not compile are
   left out.

Examples: ``python -m bench.mutate`` (the default modules), ``python -m bench.mutate gate
replay --budget 300``, ``python -m bench.mutate classify --list``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.abc
import importlib.util
import os
import random
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORE = REPO / "tencrypt" / "core"
UNIT = REPO / "tests" / "unit"
DEFAULT = ("gate", "identity", "replay", "dnscache", "classify", "policy", "membership")
# Imported before the first fork, so that no child pays for them (never tencrypt itself).
WARM = ("pytest", "hypothesis", "cryptography.hazmat.primitives.ciphers.aead", "dnslib", "numpy")

_FLIP: dict[type[ast.cmpop], type[ast.cmpop]] = {
    ast.Lt: ast.GtE,
    ast.GtE: ast.Lt,
    ast.Gt: ast.LtE,
    ast.LtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_SYMBOL = {
    ast.Lt: "<",
    ast.GtE: ">=",
    ast.Gt: ">",
    ast.LtE: "<=",
    ast.Eq: "==",
    ast.NotEq: "!=",
    ast.In: "in",
    ast.NotIn: "not in",
    ast.Is: "is",
    ast.IsNot: "is not",
}
_REMOVABLE = (
    ast.Assign,
    ast.AugAssign,
    ast.AnnAssign,
    ast.Expr,
    ast.Return,
    ast.Raise,
    ast.Delete,
    ast.Continue,
    ast.Break,
)


@dataclass(frozen=True, slots=True)
class Mutant:
    module: str
    index: int  # its position among the module's mutation sites, in source order
    line: int
    what: str


class _Sites(ast.NodeTransformer):
    """Walks a module in source order; counts mutation sites, and applies site ``target``."""

    def __init__(self, target: int = -1) -> None:
        self.target = target
        self.found: list[tuple[int, str]] = []  # (line, what) per site
        self._in_function = 0

    def _site(self, node: ast.AST, what: str) -> bool:
        """Record a site; True when it is the one to apply."""
        self.found.append((getattr(node, "lineno", 0), what))
        return len(self.found) - 1 == self.target

    # what is never mutated
    def visit_Import(self, node: ast.Import) -> ast.AST:
        return node

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return node

    def visit_Assert(self, node: ast.Assert) -> ast.AST:
        return node

    def visit_arg(self, node: ast.arg) -> ast.AST:
        return node  # annotations

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST | None:
        if node.value is not None:
            node.value = self.visit(node.value)
        return self._statement(node)

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        args = node.args
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [None if d is None else self.visit(d) for d in args.kw_defaults]
        self._in_function += 1
        last = node.body[-1]
        if isinstance(last, ast.Return) and _is_none(last.value):
            node.body = self._body(node.body[:-1]) + [last]  # removing it changes nothing
        else:
            node.body = self._body(node.body)
        self._in_function -= 1
        return node

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.body = self._body(node.body)
        return node

    def _body(self, body: list[ast.stmt]) -> list[ast.stmt]:
        out = []
        for i, stmt in enumerate(body):
            if i == 0 and _is_docstring(stmt):
                out.append(stmt)
                continue
            if isinstance(stmt, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "__slots__" for t in stmt.targets
            ):
                out.append(stmt)
                continue
            new = self.visit(stmt)
            if new is not None:
                out.append(new)
        return out or [ast.Pass()]

    def generic_visit(self, node: ast.AST) -> ast.AST:
        for name in ("body", "orelse", "finalbody"):
            body = getattr(node, name, None)
            if isinstance(body, list) and body and isinstance(body[0], ast.stmt):
                setattr(node, name, self._body(body))
        for name, value in ast.iter_fields(node):
            if name in ("body", "orelse", "finalbody", "returns", "annotation"):
                continue
            if isinstance(value, list):
                setattr(node, name, [self._child(v) for v in value])
            elif isinstance(value, ast.AST):
                setattr(node, name, self._child(value))
        return node

    def _child(self, value: object) -> object:
        return self.visit(value) if isinstance(value, ast.AST) else value

    def visit_Module(self, node: ast.Module) -> ast.AST:
        node.body = self._body(node.body)
        return node

    # statements
    def _statement(self, node: ast.stmt) -> ast.stmt | None:
        removable = self._in_function and isinstance(node, _REMOVABLE)
        if removable and self._site(node, f"removed {ast.unparse(node).splitlines()[0][:60]}"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST | None:
        node.value = self.visit(node.value)
        return self._statement(node)

    def visit_AugAssign(self, node: ast.AugAssign) -> ast.AST | None:
        node.value = self.visit(node.value)
        return self._statement(node)

    def visit_Expr(self, node: ast.Expr) -> ast.AST | None:
        if isinstance(node.value, ast.Constant):
            return node  # a docstring or ``...``
        node.value = self.visit(node.value)
        return self._statement(node)

    def visit_Return(self, node: ast.Return) -> ast.AST | None:
        if node.value is not None:
            node.value = self.visit(node.value)
        return self._statement(node)

    def visit_Raise(self, node: ast.Raise) -> ast.AST | None:
        return self._statement(node)

    def visit_Delete(self, node: ast.Delete) -> ast.AST | None:
        return self._statement(node)

    def visit_Continue(self, node: ast.Continue) -> ast.AST | None:
        return self._statement(node)

    def visit_Break(self, node: ast.Break) -> ast.AST | None:
        return self._statement(node)

    # expressions
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for i, op in enumerate(node.ops):
            flipped = _FLIP[type(op)]
            if self._site(node, f"'{_SYMBOL[type(op)]}' -> '{_SYMBOL[flipped]}'"):
                node.ops[i] = flipped()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.And):
            if self._site(node, "'and' -> 'or'"):
                node.op = ast.Or()
        elif self._site(node, "'or' -> 'and'"):
            node.op = ast.And()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._site(node, "'not' removed"):
            return node.operand
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Add):
            if self._site(node, "'+' -> '-'"):
                node.op = ast.Sub()
        elif isinstance(node.op, ast.Sub) and self._site(node, "'-' -> '+'"):
            node.op = ast.Add()
        return node

    def visit_Call(self, node: ast.Call) -> ast.AST:
        f = node.func
        if isinstance(f, ast.Name) and f.id == "field":
            return node  # a dataclass field's flags (repr, compare, ...): not behaviour
        self.generic_visit(node)
        if isinstance(f, ast.Name) and f.id in ("min", "max"):
            other = "max" if f.id == "min" else "min"
            if self._site(node, f"'{f.id}' -> '{other}'"):
                node.func = ast.copy_location(ast.Name(other, ast.Load()), f)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._site(node, f"{value} -> {not value}"):
                return ast.copy_location(ast.Constant(not value), node)
        elif isinstance(value, int) and self._site(node, f"{value} -> {value + 1}"):
            return ast.copy_location(ast.Constant(value + 1), node)
        return node


def _is_none(value: ast.expr | None) -> bool:
    return value is None or (isinstance(value, ast.Constant) and value.value is None)


def _is_docstring(stmt: ast.stmt) -> bool:
    return (
        isinstance(stmt, ast.Expr)
        and isinstance(stmt.value, ast.Constant)
        and isinstance(stmt.value.value, str)
    )


def source_of(module: str) -> Path:
    return CORE / f"{module}.py"


def sites(source: str) -> list[tuple[int, str]]:
    """Rule 1: ``(line, what)`` of every mutation site of ``source``, in a fixed order."""
    walker = _Sites()
    walker.visit(ast.parse(source))
    return walker.found


def mutate(source: str, index: int) -> ast.Module:
    """``source``'s tree with the mutation at site ``index`` applied."""
    tree = ast.parse(source)
    _Sites(index).visit(tree)
    return ast.fix_missing_locations(tree)


def mutants(module: str) -> list[Mutant]:
    """Every mutation site of ``tencrypt/core/<module>.py``."""
    found = sites(source_of(module).read_text())
    return [Mutant(module, i, line, what) for i, (line, what) in enumerate(found)]


def mutated_code(module: str, index: int) -> object | None:
    """The compiled module with mutation ``index`` applied; None if it does not compile."""
    path = source_of(module)
    try:
        return compile(mutate(path.read_text(), index), str(path), "exec")
    except (SyntaxError, ValueError):
        return None


def tests_of(module: str) -> list[str]:
    """Rule 2: the unit test files that import ``tencrypt.core.<module>``."""
    pattern = re.compile(
        rf"tencrypt\.core\.{module}\b|from tencrypt\.core import [^\n]*\b{module}\b"
    )
    return sorted(
        str(p.relative_to(REPO)) for p in UNIT.glob("test_*.py") if pattern.search(p.read_text())
    )


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves one module from a code object instead of its file (rule 3)."""

    def __init__(self, name: str, path: Path, code: object) -> None:
        self.name, self.path, self.code = name, path, code

    def find_spec(self, fullname, path, target=None):  # type: ignore[no-untyped-def]
        if fullname != self.name:
            return None
        return importlib.util.spec_from_file_location(fullname, self.path, loader=self)

    def create_module(self, spec):  # type: ignore[no-untyped-def]
        return None

    def exec_module(self, module):  # type: ignore[no-untyped-def]
        exec(self.code, module.__dict__)  # noqa: S102 - the mutant under test


def _child(module: str, code: object | None, tests: list[str]) -> int:
    """In the forked child: pytest over ``tests`` with the mutant installed."""
    import pytest

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if code is not None:
        sys.meta_path.insert(0, _Finder(f"tencrypt.core.{module}", source_of(module), code))
    args = ["-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=", *tests]
    return int(pytest.main(args))


def run(module: str, code: object | None, tests: list[str], timeout: float) -> tuple[str, float]:
    """Rule 3-4: ``(outcome, seconds)``; outcome is passed, failed, timeout or error."""
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:
        os.setpgid(0, 0)
        rc = 3
        try:
            os.chdir(REPO)
            rc = _child(module, code, tests)
        finally:
            os._exit(rc)
    deadline = start + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() > deadline:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return "timeout", time.monotonic() - start
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    rc = os.waitstatus_to_exitcode(status)
    if rc == 0:
        return "passed", elapsed
    if rc in (1, 2):  # tests failed, or collection/import failed under the mutant
        return "failed", elapsed
    return "error", elapsed


@dataclass(slots=True)
class Tally:
    killed: int = 0
    survived: int = 0
    timeout: int = 0
    error: int = 0
    not_run: int = 0

    @property
    def score(self) -> float:
        run = self.killed + self.survived + self.timeout
        return 100.0 * (self.killed + self.timeout) / run if run else 0.0


def _selected(module: str, sample: int | None, seed: int) -> list[Mutant]:
    found = mutants(module)
    if sample is not None and sample < len(found):
        found = sorted(random.Random(f"{seed}:{module}").sample(found, sample), key=_order)
    return found


def _order(m: Mutant) -> int:
    return m.index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="*", default=list(DEFAULT), help="core module names")
    parser.add_argument("--tests", nargs="+", help="test files (default: rule 2)")
    parser.add_argument("--budget", type=float, default=3600.0, help="seconds for the whole run")
    parser.add_argument("--timeout-factor", type=float, default=3.0)
    parser.add_argument("--sample", type=int, help="mutants per module (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    parser.add_argument("-v", "--verbose", action="store_true", help="print every mutant")
    args = parser.parse_args(argv)
    for module in args.modules:
        if not source_of(module).is_file():
            parser.error(f"no tencrypt/core/{module}.py")
    if args.list:
        for module in args.modules:
            for m in _selected(module, args.sample, args.seed):
                print(f"tencrypt/core/{module}.py:{m.line}: #{m.index} {m.what}")
        return 0
    for name in WARM:
        __import__(name)
    from hypothesis import settings

    settings.register_profile("mutate", derandomize=True, database=None)
    settings.load_profile("mutate")
    stop_at = time.monotonic() + args.budget
    totals = Tally()
    failed_baseline = False
    for module in args.modules:
        tests = args.tests or tests_of(module)
        tally = Tally()
        survivors: list[Mutant] = []
        outcome, base = run(module, None, tests, args.budget)
        if outcome != "passed":
            print(f"{module}: the unmutated tests do not pass ({outcome}): {' '.join(tests)}")
            failed_baseline = True
            continue
        timeout = args.timeout_factor * base + 5.0
        selected = _selected(module, args.sample, args.seed)
        print(f"{module}: {len(selected)} mutants, tests {' '.join(tests)} ({base:.1f} s)")
        for m in selected:
            if time.monotonic() > stop_at:
                tally.not_run += 1
                continue
            code = mutated_code(module, m.index)
            if code is None:
                tally.error += 1
                continue
            outcome, _ = run(module, code, tests, timeout)
            if outcome == "failed":
                tally.killed += 1
            elif outcome == "timeout":
                tally.timeout += 1
            elif outcome == "passed":
                tally.survived += 1
                survivors.append(m)
            else:
                tally.error += 1
            if args.verbose:
                print(f"  tencrypt/core/{module}.py:{m.line}: #{m.index} {m.what}: {outcome}")
        for m in survivors:
            print(f"  SURVIVED tencrypt/core/{module}.py:{m.line}: #{m.index} {m.what}")
        print(_line(module, tally))
        for f in ("killed", "survived", "timeout", "error", "not_run"):
            setattr(totals, f, getattr(totals, f) + getattr(tally, f))
    print(_line("total", totals))
    return 1 if failed_baseline else 0


def _line(name: str, t: Tally) -> str:
    run = t.killed + t.survived + t.timeout
    return (
        f"{name}: score {t.score:.1f} % ({t.killed + t.timeout}/{run}): killed {t.killed}, "
        f"timeout {t.timeout}, survived {t.survived}, error {t.error}, not run {t.not_run}"
    )


if __name__ == "__main__":
    sys.exit(main())
