"""Standalone strict mode's inbound check: a plaintext connection from the pod network is
classified by its source before the kernel lets it in (DESIGN §1a, issue #11).

Without a membership file the proxy cannot know every pod of its project, so an unpatched pod
of the project could open plaintext connections to this one. The kernel holds the first packet
of every new TCP or UDP connection from the pod network (linux.nfqueue's rule); this gate:

1. reads the queued packets (``NfQueue.read_batch``) and takes each one's source address;
2. decides by ``core.policy.decide_inbound`` from the classification table: the project's ->
   refused (dropped, counted ``plaintext_from_project``); another project's -> accepted;
   unknown -> held while one reverse (PTR) lookup per source decides (a SYN retransmitted
   meanwhile joins the same wait), then decided again with the lookup's answer;
3. answers all verdicts it can in one ``verdicts`` call.

Once a source is known to be the project's it is in the firewall's sets, which drop its
packets before they ever reach the queue. Held packets are bounded per source and in total;
past the bound the packet is refused (``inbound_hold_full``): fail closed, the client retries.
A packet the gate cannot parse is refused too (counted by nfqueue as malformed).
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from tencrypt.core.classify import AddrClass, ClassTable
from tencrypt.core.holdqueue import HoldQueue
from tencrypt.core.nfqmsg import parse_flow
from tencrypt.core.policy import Verdict, decide_inbound
from tencrypt.core.stats import Counter, DropReason, Stats
from tencrypt.linux.nfqueue import NfQueue
from tencrypt.logutil import RateLimitedLog

log = logging.getLogger("tencrypt.inbound")
QUEUE_NUM = 42  # queues are per network namespace: any fixed number will do
HOLD_PER_SOURCE = 16
HOLD_TOTAL = 1024


class InboundGate:
    def __init__(
        self,
        queue: NfQueue,
        table: ClassTable,
        stats: Stats,
        classify: Callable[[str], Awaitable[AddrClass | None]],
        clock: Callable[[], float],
        spawn: Callable[[Awaitable[Any]], None],
        locked: Callable[[], bool] = lambda: False,
    ) -> None:
        self.queue, self.table, self.stats = queue, table, stats
        self.classify, self.clock, self.spawn = classify, clock, spawn
        self.locked = locked  # a broken membership feed (core/policy.decide_inbound)
        self.held: HoldQueue[str, int] = HoldQueue(HOLD_PER_SOURCE, HOLD_TOTAL)  # packet ids
        self.ratelog = RateLimitedLog(log)

    def on_readable(self) -> None:
        now = self.clock()
        decisions: list[tuple[int, bool]] = []
        for packet in self.queue.read_batch():
            flow = parse_flow(packet.payload)
            if flow is None:
                decisions.append((packet.packet_id, False))
                continue
            src = str(ipaddress.ip_address(flow.src))
            verdict = decide_inbound(
                self.table.lookup(src, now),
                looked_up=self.table.known_unknown(src, now),
                locked=self.locked(),
            )
            if verdict is Verdict.HOLD:
                self._hold(src, packet.packet_id, decisions)
            else:
                decisions.append((packet.packet_id, self._accept(src, verdict)))
        if decisions:
            self.queue.verdicts(decisions)

    def _hold(self, src: str, packet_id: int, decisions: list[tuple[int, bool]]) -> None:
        new, refused = self.held.add(src, [packet_id])
        if refused:
            self.stats.drop(DropReason.INBOUND_HOLD_FULL)
            decisions.append((packet_id, False))
        elif new:
            self.spawn(self._lookup(src))

    async def _lookup(self, src: str) -> None:
        try:
            await self.classify(src)
        except Exception:  # unknown after all: decide_inbound says what that means
            log.exception("reverse lookup of %s failed", src)
        now = self.clock()
        if self.table.lookup(src, now) is None and not self.table.known_unknown(src, now):
            self.table.note_unknown(src, now)
        verdict = decide_inbound(self.table.lookup(src, now), looked_up=True, locked=self.locked())
        ids = self.held.pop(src)
        if ids:
            accept = self._accept(src, verdict, len(ids))
            self.queue.verdicts([(i, accept) for i in ids])

    def _accept(self, src: str, verdict: Verdict, packets: int = 1) -> bool:
        if verdict is Verdict.REFUSE:
            self.stats.drop(DropReason.PLAINTEXT_FROM_PROJECT, packets)
            self.ratelog.warn(
                "plaintext-from-project",  # a reason, never an address: logutil rule 1
                "refused a plaintext connection from %s: it is "
                "this project's (a pod without a tencrypt proxy?)",
                src,
            )
            return False
        self.stats.inc(Counter.INBOUND_ACCEPTED, packets)
        return True

    def close(self) -> None:
        self.queue.close()  # the kernel drops whatever still waits: fail closed
