"""The metric families Tencrypt's processes export, and their Prometheus text exposition (0.0.4).

Hand-written, not prometheus_client: a proxy runs in every pod, and its memory is a measure
(DESIGN §5). Pure: numbers in, text out; the shells read /proc and the kernel (linux/procstat.py,
linux/firewall.py) and hand the numbers here.

Rules:
1. Every family is declared once, in ``FAMILIES``: name, type, help, label names. The renderers
   look the name up there, so an undeclared family or a wrong label set is an exception (a bug
   the unit tests find), never a series Prometheus would take without its HELP.
2. Counters end in ``_total``, nothing else does (checked when this module is imported).
3. Every family is written with its ``# HELP`` and ``# TYPE`` lines even before it has a sample,
   and every counter whose label values are known in advance (event counters, drop reasons,
   firewall rules) is written from start, at 0: ``rate()`` and ``increase()`` need the zero.
4. Each process exports its own: the proxy ``PROXY_COUNTERS``, node-sync ``NODESYNC_COUNTERS``
   (core/stats.py); both add ``tencrypt_build_info`` and the ``process_*`` families, named and
   computed as the official client's process collector does.
5. Label values and help text are escaped as the format says (backslash, quote, newline).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tencrypt.core.stats import Counter, DropReason, Stats


class Kind(enum.StrEnum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True, slots=True)
class Family:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()


C, G, H = Kind.COUNTER, Kind.GAUGE, Kind.HISTOGRAM
# The proxy's gauges, read from their owners at request time (observe.render_metrics).
_PROXY_GAUGES = (
    ("sessions", "Live tunnel sessions."),
    ("peers", "Peers known to the tunnel (with or without a live session)."),
    (
        "peers_unanswered",
        "Peers whose handshake initiations have gone unanswered for 5 s or more (no proxy "
        "there, or the tunnel's UDP dropped on the way, e.g. by a NetworkPolicy).",
    ),
    ("flow_table_entries", "Entries in the receiver's NAT flow table."),
    ("service_flow_entries", "Entries in the sender's Service flow table (cluster mode)."),
    ("service_cluster_ips", "Service cluster IPs the proxy resolves itself (cluster mode)."),
    ("cluster_mode", "1 when Services are resolved here from the agent's feed, else 0."),
    ("dns_table_entries", "Addresses in the classification table."),
    ("addresses_internal", "Addresses classified as the project's (sealed)."),
    ("addresses_external", "Addresses classified as another project's or outside (clear)."),
    ("members", "Addresses in the project's membership from the node agent."),
    ("held_destinations", "Destinations whose packets are held awaiting classification."),
    ("key_mismatch_sources", "Project members whose handshakes verify under no key held."),
    ("service_cidr_mismatch", "1 when the agent's Service CIDR differs from the routed one."),
    ("membership_broken", "1 when the membership file is unusable (all refused), else 0."),
    ("netpol_enforced", "1 when a NetworkPolicy from the agent selects this pod, else 0."),
    ("netpol_flow_entries", "Entries in the NetworkPolicy flow table."),
)
_FAMILIES: tuple[Family, ...] = (
    *(Family(f"tencrypt_{c}_total", C, c.help) for c in Counter),
    Family(
        "tencrypt_drops_total",
        C,
        "Packets, datagrams or DNS messages dropped, by reason.",
        ("reason",),
    ),
    *(Family(f"tencrypt_{name}", G, text) for name, text in _PROXY_GAUGES),
    Family(
        "tencrypt_firewall_packets_total",
        C,
        "Packets the pod's nftables table refused, by rule, direction (in: plaintext from a "
        "project address; out: to a project address leaving the uplink) and IP family.",
        ("rule", "direction", "family"),
    ),
    Family(
        "tencrypt_key",
        G,
        "Project keys by fingerprint and role: 1 for a key the ring holds, 0 for a retired one.",
        ("fingerprint", "role"),
    ),
    Family(
        "tencrypt_key_sessions",
        G,
        "Live sessions keyed from each project key.",
        ("fingerprint", "role"),
    ),
    Family(
        "tencrypt_key_handshakes_total",
        C,
        "Handshakes completed under each project key.",
        ("fingerprint",),
    ),
    Family(
        "tencrypt_netpol_flows_allowed_total",
        C,
        "New flows a NetworkPolicy rule allowed, by direction, policy and rule.",
        ("direction", "policy", "rule"),
    ),
    Family(
        "tencrypt_netpol_packets_denied_total",
        C,
        "Packets no NetworkPolicy rule allowed, by direction and the isolating policies.",
        ("direction", "policies"),
    ),
    Family(
        "tencrypt_netpol_tunnel_blocked",
        G,
        "1 for each policy the agent says blocks the tunnel's own UDP to this pod.",
        ("direction", "policy"),
    ),
    Family(
        "tencrypt_nodesync_sync_duration_seconds",
        H,
        "Time one sync took to program the node, by backend and mode (full or partial).",
        ("backend", "mode"),
    ),
    Family(
        "tencrypt_nodesync_programmed_elements",
        G,
        "Chains, map elements or rules the node holds after the last sync.",
        ("backend",),
    ),
    Family(
        "tencrypt_nodesync_last_success_timestamp_seconds",
        G,
        "When the last sync succeeded (Unix time; 0: none yet).",
    ),
    Family("tencrypt_nodesync_sync_failures_total", C, "Syncs that failed (retried, then full)."),
    Family(
        "tencrypt_agent_proxies",
        G,
        "Proxies the node agent supervises on its node, by phase (starting, ready, dead).",
        ("phase",),
    ),
    Family(
        "tencrypt_agent_ready",
        G,
        "1 once the agent has listed the cluster and reconciled its node (/readyz), else 0.",
    ),
    Family("tencrypt_agent_passes_total", C, "Passes that reconciled the node's pods."),
    Family(
        "tencrypt_agent_last_pass_timestamp_seconds",
        G,
        "When the agent's last pass ended (Unix time; 0: none yet).",
    ),
    Family("tencrypt_agent_project_keys", G, "Projects whose key ring the agent holds."),
    Family(
        "tencrypt_proxy_up",
        G,
        "1 when the agent could read the proxy's metrics at this scrape, else 0.",
        ("namespace", "pod"),
    ),
    Family(
        "tencrypt_build_info",
        G,
        "Always 1: the version, the Python and the data path's loops (c or python).",
        ("version", "python", "fastpath"),
    ),
    Family("process_cpu_seconds_total", C, "Total user and system CPU time spent in seconds."),
    Family("process_resident_memory_bytes", G, "Resident memory size in bytes."),
    Family("process_virtual_memory_bytes", G, "Virtual memory size in bytes."),
    Family("process_open_fds", G, "Number of open file descriptors."),
    Family("process_max_fds", G, "Maximum number of open file descriptors."),
    Family(
        "process_start_time_seconds", G, "Start time of the process since unix epoch in seconds."
    ),
)


def _declare(families: Iterable[Family]) -> dict[str, Family]:
    table: dict[str, Family] = {}
    for f in families:
        if f.name in table or not f.help or (f.kind is C) != f.name.endswith("_total"):
            raise ValueError(f"metric family {f.name}: duplicate, no help, or misnamed {f.kind}")
        table[f.name] = f
    return table


FAMILIES = _declare(_FAMILIES)
Labels = tuple[str, ...]  # label values, in the family's label order


def header(name: str) -> list[str]:
    """A family's ``# HELP`` and ``# TYPE`` lines (KeyError: not declared, rule 1)."""
    f = FAMILIES[name]
    text = f.help.replace("\\", "\\\\").replace("\n", "\\n")
    return [f"# HELP {name} {text}", f"# TYPE {name} {f.kind}"]


def sample(name: str, labels: Labels, value: float, suffix: str = "", extra: str = "") -> str:
    """One sample line; ``suffix`` and ``extra`` (a pre-rendered label) serve histograms."""
    names = FAMILIES[name].labels
    if len(labels) != len(names):
        raise ValueError(f"{name} takes labels {names}, not {labels}")
    pairs = [f'{k}="{escape(v)}"' for k, v in zip(names, labels, strict=True)]
    pairs += [extra] if extra else []
    body = "{" + ",".join(pairs) + "}" if pairs else ""
    return f"{name}{suffix}{body} {number(value)}"


def family(name: str, samples: Iterable[tuple[Labels, float]]) -> list[str]:
    """A whole family: its header, then one line per (label values, value)."""
    return header(name) + [sample(name, labels, value) for labels, value in samples]


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def text(lines: Sequence[str]) -> str:
    return "\n".join(lines) + "\n"


def render_counters(stats: Stats, counters: Iterable[Counter]) -> list[str]:
    """Each of ``counters`` from start (0 until counted), and any other counted one."""
    names = sorted({*counters, *stats.counters})
    out: list[str] = []
    for name in names:
        out += family(f"tencrypt_{name}_total", [((), stats.counters.get(name, 0))])
    return out


def render_prometheus(
    stats: Stats, gauges: Mapping[str, float] | None = None, counters: Iterable[Counter] = ()
) -> str:
    """Counters (``counters`` at least), every drop reason, and ``tencrypt_<gauge>``s."""
    lines = render_counters(stats, counters)
    lines += family(
        "tencrypt_drops_total", [((r.value,), stats.drops.get(r, 0)) for r in DropReason]
    )
    for name, value in sorted((gauges or {}).items()):
        lines += family(f"tencrypt_{name}", [((), value)])
    return text(lines)


@dataclass(frozen=True, slots=True)
class ProcessSample:
    """What the ``process_*`` families say, read from /proc/self by linux/procstat.py."""

    cpu_seconds: float
    resident_bytes: int
    virtual_bytes: int
    start_time: float  # Unix time
    open_fds: int
    max_fds: int  # the soft RLIMIT_NOFILE


def parse_stat(
    stat: str, boot_time: float, ticks: int, page_size: int
) -> tuple[float, int, int, float]:
    """(CPU seconds, resident bytes, virtual bytes, start time) from /proc/self/stat (proc(5):
    utime 14, stime 15, starttime 22 in clock ticks, vsize 23 in bytes, rss 24 in pages). The
    fields are counted after the command name's last ')' (a name may hold spaces)."""
    fields = stat[stat.rindex(")") + 2 :].split()  # fields[0] is field 3, state
    utime, stime, start = int(fields[11]), int(fields[12]), int(fields[19])
    vsize, rss = int(fields[20]), int(fields[21])
    return (utime + stime) / ticks, rss * page_size, vsize, boot_time + start / ticks


def parse_boot_time(proc_stat: str) -> float:
    """``btime`` of /proc/stat: when the machine booted (Unix time)."""
    for line in proc_stat.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def parse_max_fds(limits: str) -> int:
    """The soft limit of "Max open files" in /proc/self/limits (-1 when unlimited)."""
    for line in limits.splitlines():
        if line.startswith("Max open files"):
            soft = line[len("Max open files") :].split()[0]
            return -1 if soft == "unlimited" else int(soft)
    raise ValueError("no 'Max open files' line in /proc/self/limits")


def render_process(sample: ProcessSample | None) -> list[str]:
    """The ``process_*`` families (headers alone when /proc could not be read)."""
    values = (
        ("process_cpu_seconds_total", None if sample is None else sample.cpu_seconds),
        ("process_resident_memory_bytes", None if sample is None else sample.resident_bytes),
        ("process_virtual_memory_bytes", None if sample is None else sample.virtual_bytes),
        ("process_start_time_seconds", None if sample is None else sample.start_time),
        ("process_open_fds", None if sample is None else sample.open_fds),
        ("process_max_fds", None if sample is None else sample.max_fds),
    )
    out: list[str] = []
    for name, value in values:
        out += family(name, [] if value is None else [((), value)])
    return out


def render_build_info(version: str, python: str, fastpath: str) -> list[str]:
    return family("tencrypt_build_info", [((version, python, fastpath), 1)])
