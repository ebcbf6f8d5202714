"""The shared Kubernetes package and the line between product and test doubles."""

import ast
from pathlib import Path

import tencrypt
from tencrypt.kube import objects
from tests.unit.test_purity import FORBIDDEN, imported_roots

PRODUCT = Path(tencrypt.__file__).parent


def imported_modules(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_the_product_imports_no_test_double():
    """The wheel and the node image hold tencrypt/ only: nothing in it may need tests/."""
    offenders = {}
    for path in sorted(PRODUCT.rglob("*.py")):
        bad = {
            m
            for m in imported_modules(path)
            if m.split(".")[0] == "tests" or m.endswith((".fakeapi", "kubefakes"))
        }
        if bad:
            offenders[str(path.relative_to(PRODUCT))] = sorted(bad)
    assert offenders == {}
    assert not list(PRODUCT.rglob("fakeapi.py"))


def test_the_checker_sees_an_import_of_the_doubles(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("from tests.kubefakes.fakeapi import FakeApiServer\nimport tests.kubefakes\n")
    assert imported_modules(probe) == {"tests.kubefakes.fakeapi", "tests.kubefakes"}


def test_object_basics_are_pure():
    assert not imported_roots(Path(objects.__file__)) & (FORBIDDEN | {"kubernetes"})
