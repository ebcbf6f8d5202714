"""Flow life times shared by the proxy's two NAT tables: the receiver's (core/nat.py, standalone
VIP sessions) and the sender's Service translation (core/conntrack.py).

Rules:
1. Every flow is in one timeout class — TCP open, TCP closed, UDP (and any other protocol),
   ICMP — and sits in that class's queue in last-activity order, so reaping stops at the
   first live entry and the longest-idle flow of a class is at the front.
2. Idle time counts from the last packet either way. A flow past its class's timeout is dead
   at once (``dead`` says so; its table removes it), even before ``reap`` collects it.
3. TCP (``on_tcp``): an RST closes a flow; a FIN each way closes it; a SYN without ACK from the
   side that opens connections reopens a closed flow (the tuple is reused). Closed flows live
   ``tcp_closed`` seconds, long enough for the last ACKs and retransmitted FINs.
4. Family-blind: a key is the table's own tuple, whose addresses are ``packet.addr_key``s, so
   IPv4 and IPv6 flows live side by side under the same classes and timeouts (ICMPv6 echoes
   in the ICMP class).
Pure: keys and flows in, nothing read from a clock (``now`` is a monotonic time argument).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

TCP_OPEN, TCP_CLOSED, UDP_LIKE, ICMP_LIKE = range(4)  # rule 1's classes (queue numbers)
FIN_IN, FIN_OUT = 1, 2  # the FINs a TCP flow has seen, by direction (rule 3)
TCP_FIN, TCP_SYN, TCP_RST, TCP_ACK = 0x01, 0x02, 0x04, 0x10  # RFC 793 §3.1 (as core/packet)
# the default timeouts (seconds) of every table but TCP open's, which each table chooses
TCP_CLOSED_TIMEOUT, UDP_TIMEOUT, ICMP_TIMEOUT = 10.0, 180.0, 30.0


@dataclass(slots=True)
class FlowState:
    last_seen: float
    queue: int  # timeout class, and the queue the key sits in
    fins: int = 0  # FIN_IN | FIN_OUT seen


K = TypeVar("K", bound=Hashable)
F = TypeVar("F", bound=FlowState)


class IdleFlows(Generic[K, F]):
    """The flows of one table, their classes' queues and timeouts (rules 1-3)."""

    __slots__ = ("flows", "queues", "timeouts")

    def __init__(self, timeouts: tuple[float, float, float, float]) -> None:
        self.timeouts = timeouts  # indexed by class: TCP open, TCP closed, UDP, ICMP
        self.flows: dict[K, F] = {}
        self.queues: tuple[OrderedDict[K, None], ...] = tuple(OrderedDict() for _ in timeouts)

    def __len__(self) -> int:
        return len(self.flows)

    def dead(self, key: K, now: float) -> bool:
        """Is there a flow under ``key`` that rule 2 calls dead? (Nothing is removed.)"""
        flow = self.flows.get(key)
        return flow is not None and now - flow.last_seen >= self.timeouts[flow.queue]

    def insert(self, key: K, flow: F) -> None:
        self.flows[key] = flow
        self.queues[flow.queue][key] = None

    def remove(self, key: K) -> F:
        flow = self.flows.pop(key)
        del self.queues[flow.queue][key]
        return flow

    def touch(self, key: K, flow: F, queue: int, now: float) -> None:
        """A packet of the flow: it moves to the back of ``queue`` (its class from now on)."""
        flow.last_seen = now
        if queue == flow.queue:
            self.queues[queue].move_to_end(key)
        else:
            del self.queues[flow.queue][key]
            self.queues[queue][key] = None
            flow.queue = queue

    def on_tcp(self, key: K, flow: F, flags: int, fin_bit: int, opener: int, now: float) -> None:
        """Rule 3 for one TCP segment travelling in direction ``fin_bit`` (FIN_IN or FIN_OUT);
        ``opener`` is the direction new connections start from."""
        queue = flow.queue
        if flags & TCP_RST:
            queue = TCP_CLOSED
        elif flags & TCP_SYN and not flags & TCP_ACK and fin_bit == opener:
            if queue == TCP_CLOSED:  # the tuple is reused for a new connection
                flow.fins = 0
                queue = TCP_OPEN
        elif flags & TCP_FIN:
            flow.fins |= fin_bit
            if flow.fins == FIN_IN | FIN_OUT:
                queue = TCP_CLOSED
        self.touch(key, flow, queue, now)

    def reap(self, now: float) -> list[tuple[K, F]]:
        """Remove every flow past its timeout and return them (rule 1: each queue stops at
        its first live entry)."""
        removed: list[tuple[K, F]] = []
        flows = self.flows
        for queue, timeout in zip(self.queues, self.timeouts, strict=True):
            while queue:
                key = next(iter(queue))
                flow = flows[key]
                if now - flow.last_seen < timeout:
                    break
                queue.popitem(last=False)
                del flows[key]
                removed.append((key, flow))
        return removed

    def next_expiry(self) -> float | None:
        """When ``reap`` next has a flow to remove (the earliest front of a class's queue
        plus its timeout), or None: no flow. Rule 1 makes it O(classes)."""
        flows = self.flows
        due = [
            flows[next(iter(queue))].last_seen + timeout
            for queue, timeout in zip(self.queues, self.timeouts, strict=True)
            if queue
        ]
        return min(due, default=None)

    def oldest(self, queue: int) -> K | None:
        """The key idle longest in class ``queue``, or None."""
        return next(iter(self.queues[queue]), None)

    def victim(self) -> K | None:
        """What a full table evicts: the closed TCP flow idle longest, else the flow idle
        longest of any class (None: the table is empty)."""
        key = self.oldest(TCP_CLOSED)
        if key is None:
            oldest = [k for k in map(self.oldest, range(len(self.queues))) if k is not None]
            key = min(oldest, key=lambda k: self.flows[k].last_seen, default=None)
        return key


def earliest(*deadlines: float | None) -> float | None:
    """The earliest of ``deadlines`` that exist (None: no deadline), or None."""
    return min((d for d in deadlines if d is not None), default=None)


def opens(flags: int) -> bool:
    """TCP ``flags`` of a segment that opens a connection: SYN without ACK."""
    return bool(flags & TCP_SYN) and not flags & TCP_ACK


def reopens(flow: FlowState, flags: int) -> bool:
    """Rule 3 seen from a table: a SYN without ACK on a closed TCP flow is a new connection
    on a reused tuple (the table decides it again)."""
    return flow.queue == TCP_CLOSED and opens(flags)
