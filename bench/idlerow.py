"""The "idle proxies on one node" row: what ``python -m bench.idle`` measured (issue 26: 50 idle
proxies, their CPU, RSS, PSS and private memory), read from the JSON file it writes, for the
report and the targets (``tencrypt bench --idle-json PATH``).

Rules:
- The file is another tool's result, read as given: ``parse_idle`` takes its text and returns an
  ``IdleRow``, or raises ``MeasureError`` saying what is missing; the bench then reports a
  failure and the idle targets say *not measured*, never a made-up zero.
- The file (one JSON object, as bench/idle.py's ``--json`` writes it) holds one record per
  proxy, a list under ``per_proxy`` (or ``proxies``): memory as ``rss``, ``pss`` and
  ``private`` (or ``private_clean`` + ``private_dirty``, as ``/proc/PID/smaps_rollup`` names
  them), each with its unit in the key (``_kb``, ``_mb`` or ``_bytes``), and the CPU used during
  the idle window as ``cpu_s`` (utime + stime in seconds) or ``cpu_ticks`` (clock ticks,
  ``clk_tck`` per second, 100 if not given). Beside the list: ``idle_s`` (or ``seconds``: the
  idle window, required to turn CPU into a share of a core) and optionally ``mode``
  (``exec``/``fork``) and ``zygote`` (or ``parent``), one record of the same shape for the warm
  parent the proxies were forked from: a node pays its memory once, shared by every proxy.
- Figures per proxy are medians over the proxies (CPU also the largest), memory in MB (2**20
  bytes, as the rest of the report: ``/proc`` counts kB), CPU in % of one core averaged over
  the window. "What a node pays per pod" is the proxies' private memory plus the parent's,
  divided by the number of proxies (the issue's measure); their PSS plus the parent's, divided
  the same way, is given beside it (every page counted once, shared ones split).
- The row joins the run as measurements of lab shape 0 (a node of its own, not one of the
  bench's labs), system ``tencrypt``, test ``idle``, clients = the number of proxies: the CSV
  carries it like every other figure; the markdown gives it a section of its own.
- Pure: text in, a record out; ``load`` alone reads a file.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.measure import MeasureError
from bench.report import TENCRYPT, Run

IDLE_TEST = "idle"
IDLE_NODES = 0  # the shape the row's measurements carry: not a lab of the bench
UNITS = {"_kb": 1 / 1024, "_mb": 1.0, "_bytes": 1 / 2**20}  # -> MB
DEFAULT_CLK_TCK = 100


@dataclass(slots=True, frozen=True)
class IdleRow:
    proxies: int
    seconds: float  # the idle window
    mode: str  # "exec", "fork" or "" (not said)
    rss_mb: float  # medians per proxy
    pss_mb: float
    private_mb: float
    cpu_pct: float  # median per proxy, % of one core over the window
    cpu_pct_max: float
    total_rss_mb: float  # sums over the proxies (the parent apart)
    total_pss_mb: float
    total_private_mb: float
    total_cpu_pct: float
    parent_private_mb: float = 0.0  # the warm parent's, paid once per node (fork mode)
    parent_pss_mb: float = 0.0
    parent_cpu_pct: float = 0.0

    @property
    def paid_per_pod_mb(self) -> float:
        """The private memory a node pays per enabled pod, the parent's shared out."""
        return (self.total_private_mb + self.parent_private_mb) / self.proxies

    @property
    def pss_per_pod_mb(self) -> float:
        """The proxies' PSS and the parent's, per proxy: every page once, shared ones split."""
        return (self.total_pss_mb + self.parent_pss_mb) / self.proxies


def _mb(record: dict[str, Any], name: str) -> float | None:
    for suffix, scale in UNITS.items():
        value = record.get(name + suffix)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value) * scale
    return None


def _memory(record: dict[str, Any], name: str) -> float:
    value = _mb(record, name)
    if value is None and name == "private":
        clean, dirty = _mb(record, "private_clean"), _mb(record, "private_dirty")
        if clean is not None and dirty is not None:
            value = clean + dirty
    if value is None or value < 0:
        keys = ", ".join(name + s for s in UNITS)
        raise MeasureError(f"idle JSON: a proxy record has no {keys}: {sorted(record)}")
    return value


def _cpu_s(record: dict[str, Any]) -> float:
    seconds = record.get("cpu_s")
    if isinstance(seconds, int | float) and not isinstance(seconds, bool) and seconds >= 0:
        return float(seconds)
    ticks, per_s = record.get("cpu_ticks"), record.get("clk_tck", DEFAULT_CLK_TCK)
    if isinstance(ticks, int) and ticks >= 0 and isinstance(per_s, int) and per_s > 0:
        return ticks / per_s
    raise MeasureError(f"idle JSON: a proxy record has no cpu_s or cpu_ticks: {sorted(record)}")


def parse_idle(text: str) -> IdleRow:
    """The row from the text of bench/idle.py's JSON file (module docstring)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MeasureError(f"idle JSON: not JSON: {text[:200]!r}") from exc
    if not isinstance(data, dict):
        raise MeasureError("idle JSON: not an object")
    records = next((data[k] for k in ("per_proxy", "proxies") if isinstance(data.get(k), list)), [])
    if not records:
        raise MeasureError("idle JSON: no per-proxy records (a list under per_proxy or proxies)")
    if not all(isinstance(r, dict) for r in records):
        raise MeasureError("idle JSON: a per-proxy record is not an object")
    seconds = data.get("idle_s", data.get("seconds"))
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds <= 0:
        raise MeasureError("idle JSON: no idle window (seconds > 0)")
    memory = {k: [_memory(r, k) for r in records] for k in ("rss", "pss", "private")}
    cpu = [100.0 * _cpu_s(r) / seconds for r in records]
    parent = next((data[k] for k in ("zygote", "parent") if isinstance(data.get(k), dict)), None)
    mode = data.get("mode")
    return IdleRow(
        proxies=len(records),
        seconds=float(seconds),
        mode=mode if isinstance(mode, str) else "",
        rss_mb=statistics.median(memory["rss"]),
        pss_mb=statistics.median(memory["pss"]),
        private_mb=statistics.median(memory["private"]),
        cpu_pct=statistics.median(cpu),
        cpu_pct_max=max(cpu),
        total_rss_mb=sum(memory["rss"]),
        total_pss_mb=sum(memory["pss"]),
        total_private_mb=sum(memory["private"]),
        total_cpu_pct=sum(cpu),
        parent_private_mb=_memory(parent, "private") if parent else 0.0,
        parent_pss_mb=_memory(parent, "pss") if parent else 0.0,
        parent_cpu_pct=100.0 * _cpu_s(parent) / seconds if parent else 0.0,
    )


def load(path: Path) -> IdleRow:
    try:
        text = path.read_text()
    except OSError as exc:
        raise MeasureError(f"idle JSON {path}: {exc.strerror or exc}") from exc
    return parse_idle(text)


METRICS = {  # IdleRow field -> (metric, unit)
    "rss_mb": ("rss_mb", "MB"),
    "pss_mb": ("pss_mb", "MB"),
    "private_mb": ("private_mb", "MB"),
    "paid_per_pod_mb": ("paid_per_pod_mb", "MB"),
    "pss_per_pod_mb": ("pss_per_pod_mb", "MB"),
    "cpu_pct": ("cpu_pct", "%"),
    "cpu_pct_max": ("cpu_pct_max", "%"),
    "total_rss_mb": ("total_rss_mb", "MB"),
    "total_pss_mb": ("total_pss_mb", "MB"),
    "total_private_mb": ("total_private_mb", "MB"),
    "total_cpu_pct": ("total_cpu_pct", "%"),
    "parent_private_mb": ("parent_private_mb", "MB"),
    "parent_pss_mb": ("parent_pss_mb", "MB"),
    "parent_cpu_pct": ("parent_cpu_pct", "%"),
    "seconds": ("seconds", "s"),
}


def add_to(run: Run, row: IdleRow) -> None:
    """The row's figures as measurements of the run (shape 0, test ``idle``)."""
    for name, (metric, unit) in METRICS.items():
        run.add(IDLE_NODES, TENCRYPT, IDLE_TEST, row.proxies, metric, getattr(row, name), unit)
    run.idle_note = f"{row.mode} mode" if row.mode else ""


def of(run: Run) -> dict[str, float] | None:
    """The row's figures back from the run (metric -> value, ``proxies`` too), or None."""
    found = [m for m in run.measurements if (m.nodes, m.test) == (IDLE_NODES, IDLE_TEST)]
    if not found:
        return None
    return {"proxies": float(found[0].clients), **{m.metric: m.value for m in found}}


def render(run: Run) -> list[str]:
    """The markdown section of the row, if the run has it."""
    got = of(run)
    if got is None:
        return []
    n = int(got["proxies"])
    mode = f", {run.idle_note}" if run.idle_note else ""

    def mb(metric: str) -> str:
        return f"{got[metric]:.1f}" if metric in got else "–"

    def pct(metric: str) -> str:
        return f"{got[metric]:.3f}" if metric in got else "–"

    rows = [
        ["RSS MB", mb("rss_mb"), mb("total_rss_mb")],
        ["PSS MB", mb("pss_mb"), mb("total_pss_mb")],
        ["private (unshared) MB", mb("private_mb"), mb("total_private_mb")],
        [
            "CPU, % of one core",
            f"{pct('cpu_pct')} (largest {pct('cpu_pct_max')})",
            pct("total_cpu_pct"),
        ],
    ]
    if got.get("parent_private_mb"):
        rows.append(
            [
                "the warm parent (once per node)",
                f"private {mb('parent_private_mb')} MB, PSS {mb('parent_pss_mb')} MB, "
                f"CPU {pct('parent_cpu_pct')} %",
                "",
            ]
        )
    lines = [
        f"## {n} idle proxies on one node (bench/idle.py{mode})",
        "",
        f"Each proxy a `tencrypt run` that reached ready in a network namespace of its own, then "
        f"idle for {got.get('seconds', 0):.0f} s; memory from /proc/PID/smaps_rollup at the end, "
        "CPU (utime + stime) over the idle window. What a node pays per enabled pod (private "
        f"memory, a warm parent's shared out): {mb('paid_per_pod_mb')} MB"
        + (
            f" (the parent's own: {mb('parent_private_mb')} MB)"
            if got.get("parent_private_mb")
            else ""
        )
        + f"; PSS per pod, the same way: {mb('pss_per_pod_mb')} MB.",
        "",
        "| Figure | per proxy (median) | all proxies |",
        "|---|---|---|",
        *(f"| {' | '.join(r)} |" for r in rows),
        "",
    ]
    return lines
