"""The node's proxies in the agent's /metrics: each proxy serves its metrics on a Unix socket
in its state directory (linux/metrics.py); the agent reads them all when it is scraped and
serves them as one exposition, every sample labelled with its pod's namespace and name.

Rules:
1. One family once: its HELP and TYPE from the first proxy that has it, then every proxy's
   samples of it, grouped (the text format wants a family's samples together).
2. A proxy that does not answer within ``TIMEOUT`` is ``tencrypt_proxy_up{...} 0`` and
   contributes nothing else; a scrape never waits longer than about
   ``TIMEOUT * ceil(proxies / WORKERS)``.
3. ``merge`` is pure (text in, text out); ``scrape`` does the reading.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from tencrypt.core import exposition
from tencrypt.linux.metrics import SOCKET_FILE, get_unix

TIMEOUT = 1.0  # seconds a proxy has to answer
WORKERS = 16
UP = "tencrypt_proxy_up"


@dataclass(slots=True)
class _Family:
    help: str | None = None
    type: str | None = None
    samples: list[str] = field(default_factory=list)


def _labelled(sample: str, labels: str) -> str:
    """``name{a="b"} 1`` or ``name 1`` with ``labels`` put first."""
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=-1)
    if name_end < 0:
        return ""  # not a sample line
    if sample[name_end] == "{":
        inner = sample[name_end + 1 :]
        sep = "" if inner.startswith("}") else ","
        return f"{sample[:name_end]}{{{labels}{sep}{inner}"
    return f"{sample[:name_end]}{{{labels}}}{sample[name_end:]}"


def _members(family: str) -> tuple[str, ...]:
    """The sample names a family's samples may carry (histograms and summaries)."""
    return (family, f"{family}_bucket", f"{family}_sum", f"{family}_count")


def merge(scraped: Sequence[tuple[str, str, str | None]], own: str = "") -> str:
    """``own`` exposition (the agent's, unlabelled) and, for each proxy, (namespace, pod,
    exposition text or None when it did not answer), as one exposition (rules 1 and 2): a
    family both have (``process_*``, build info) is written once, the agent's sample beside
    each proxy's labelled one."""
    families: dict[str, _Family] = {}
    _fold(families, own, "")
    declared = exposition.FAMILIES[UP]
    up = families.setdefault(UP, _Family(declared.help, str(declared.kind)))
    for namespace, pod, text in scraped:
        labels = f'namespace="{exposition.escape(namespace)}",pod="{exposition.escape(pod)}"'
        up.samples.append(f"{UP}{{{labels}}} {0 if text is None else 1}")
        _fold(families, text or "", labels)
    out: list[str] = []
    for name, family in families.items():
        if family.help is not None:
            out.append(f"# HELP {name} {family.help}")
        if family.type is not None:
            out.append(f"# TYPE {name} {family.type}")
        out += family.samples
    return "\n".join(out) + "\n"


def _fold(families: dict[str, _Family], text: str, labels: str) -> None:
    """One exposition's families into ``families``, its samples given ``labels`` first."""
    current: str | None = None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            parts = line.split(" ", 3)
            if len(parts) < 4:
                continue
            current = parts[2]
            family = families.setdefault(current, _Family())
            if parts[1] == "HELP" and family.help is None:
                family.help = parts[3]
            elif parts[1] == "TYPE" and family.type is None:
                family.type = parts[3]
        elif line and not line.startswith("#"):
            sample = _labelled(line, labels) if labels else line
            if sample:
                name = line.split("{", 1)[0].split(" ", 1)[0]
                if current and name in _members(current):  # e.g. a histogram's _bucket
                    name = current
                families.setdefault(name, _Family()).samples.append(sample)


def read_one(path: Path) -> str | None:
    """One proxy's /metrics over its socket, or None (rule 2)."""
    try:
        code, body = get_unix(path, "/metrics", TIMEOUT)
        return body.decode() if code == 200 else None
    except (OSError, ValueError, UnicodeDecodeError):
        return None


def scrape(proxies: Sequence[tuple[str, str, Path]], own: str = "") -> str:
    """(namespace, pod, the proxy's state directory) for each proxy: their metrics, merged
    with ``own``."""
    if not proxies:
        return merge([], own)
    with ThreadPoolExecutor(min(WORKERS, len(proxies))) as pool:
        texts = list(pool.map(lambda p: read_one(p[2] / SOCKET_FILE), proxies))
    return merge([(ns, pod, t) for (ns, pod, _), t in zip(proxies, texts, strict=True)], own)
