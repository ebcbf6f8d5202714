#!/usr/bin/env bash
# The checks, in the order CI runs them (.ci/run -> scripts/test.sh -> this script); developers
# run the same script before they push:
#   1. ruff check            lint (rules in pyproject.toml [tool.ruff.lint])
#   2. ruff format --check   the formatter's layout, changing nothing
#   3. mypy                  the package, --strict's checks on tencrypt/core/ ([tool.mypy])
#   4. pytest --cov          the test suite with branch coverage of tencrypt/core/ and its floor
#                            ([tool.coverage.report] fail_under: raise it, never lower it)
# Every step runs even when an earlier one failed, so one run shows everything; the exit code is
# non-zero if any failed. Arguments go to pytest. With a selection of tests (any argument that
# is not an option, e.g. `tests/unit` or `-k noise`), the coverage figure is printed but the
# floor is not enforced: a subset of the suite cannot be held to the whole suite's figure.
# Python: $PYTHON, else .venv/bin/python (scripts/install.sh makes it). Needs no root; the
# namespace tests in tests/netns/ skip without it.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
if [ ! -x "$PY" ] && ! command -v "$PY" >/dev/null 2>&1; then
    echo "check.sh: no $PY; run scripts/install.sh first or set PYTHON" >&2
    exit 2
fi

failed=()
step() {
    local name=$1
    shift
    echo "check.sh: $name" >&2
    "$@" || failed+=("$name")
}

step "ruff check" "$PY" -m ruff check .
step "ruff format --check" "$PY" -m ruff format --check .
step "mypy" "$PY" -m mypy
if [ "${#failed[@]}" -gt 0 ]; then
    echo "check.sh: FAILED before the tests: ${failed[*]}" >&2
fi

floor=()
for arg in "$@"; do
    if [[ $arg != -* ]]; then
        floor=(--cov-fail-under=0)
        echo "check.sh: a selection of tests: coverage is reported, its floor not enforced" >&2
        break
    fi
done
"$PY" -m pytest --cov --cov-report=term-missing:skip-covered "${floor[@]}" "$@"
status=$?
if [ "$status" -ne 0 ] || [ "${#failed[@]}" -gt 0 ]; then
    exit $((status ? status : 1))
fi
