"""Whose a setup state directory is: the rule that ties it to one network namespace's life.

`tencrypt setup` keeps its state in ``<state-dir>/netns-<inode>/``, keyed by the inode number
of the pod's network namespace: the one name of it that a process outside (the node agent,
the lab, the launcher) and inside (setup, the proxy) both see. But the kernel hands a freed
inode number to the next namespace it creates, within milliseconds on a busy node: a
directory that outlives its namespace is found by a stranger.

Rules:
1. A namespace's *identity* is ``NetnsId(boot, cookie)``: the kernel's netns cookie
   (``SO_NETNS_COOKIE``, Linux 5.14: a 64-bit counter, never handed out twice within one
   boot) and the boot's id (``/proc/sys/kernel/random/boot_id``), since the counter starts
   again at every boot and a ``--state-dir`` on a disk outlives a reboot (/run does not).
   Setup records the identity of the namespace it runs in (setup.json).
2. A recorded identity and the current one both known: the state is this namespace's if and
   only if they are equal. Anything else is a dead namespace's (*stale*).
3. Without an identity on either side — a setup.json of the format before rule 1, or a kernel
   without ``SO_NETNS_COOKIE`` — the state is this namespace's only if the resolv.conf it
   names is still rewritten by Tencrypt (``podconfig.is_rewritten``). That file belongs to
   the pod (``/proc/PID/root/etc/resolv.conf``, the runtime's per-sandbox file, the lab's
   ``/etc/netns/NAME``) and goes with it; a live pod set up by an older Tencrypt still has
   it rewritten (the upgrade case: adopted, undone and set up again normally). A dead pod's
   is gone, or restored by an undo, so its state is stale. This guess can err only where a
   recycled PID makes ``/proc/PID/root`` another patched pod's; rule 1 leaves no such case.
4. A stale state is never used: `setup` removes it before it records its own (and never
   takes its original resolv.conf for this pod's), `run` refuses to start on it, `setup
   --undo` removes it and touches nothing else of the namespace.

Pure: values in, a decision out; the shell (linux/netnsid.py, linux/podnet.py) reads the
kernel and the files.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tencrypt.core.podconfig import is_rewritten


@dataclass(frozen=True, slots=True)
class NetnsId:
    boot: str  # /proc/sys/kernel/random/boot_id
    cookie: int  # SO_NETNS_COOKIE of a socket made in the namespace

    def to_dict(self) -> dict[str, Any]:
        return {"boot": self.boot, "cookie": self.cookie}

    @classmethod
    def from_dict(cls, d: object) -> NetnsId | None:
        """The identity recorded in setup.json; None for none (``null``, or a file of the
        format before rule 1). ``ValueError`` for something that is neither."""
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ValueError(f"netns identity is not an object: {d!r}")
        boot, cookie = d.get("boot"), d.get("cookie")
        if not isinstance(boot, str) or not boot or type(cookie) is not int or cookie < 0:
            raise ValueError(f"malformed netns identity: {d!r}")
        return cls(boot, cookie)

    def describe(self) -> str:
        return f"cookie {self.cookie} of boot {self.boot}"


def belongs(
    recorded: NetnsId | None,
    current: NetnsId | None,
    resolv_now: Callable[[], str | None],
) -> bool:
    """True if a state that recorded ``recorded`` is the namespace's whose identity is
    ``current`` (rules 2 and 3). ``resolv_now`` returns the text of the resolv.conf the state
    names (None: gone or unreadable); it is called only when rule 3 decides."""
    if recorded is not None and current is not None:
        return recorded == current
    text = resolv_now()
    return text is not None and is_rewritten(text)
