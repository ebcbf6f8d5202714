"""The tunnel's 1-RTT handshake: Noise NNpsk0 messages in wire.py's envelopes (version 3,
with mac1 and a pod address per family), plus the tables of the responder's defences. The order in which they run is in
core/gate.py.

Rules:
- Nothing here raises on input from the network: failures are ``None``.
- ``Templates`` holds one Noise state per role with the psk already mixed (Noise §9: the
  leading ``psk`` token needs nothing from the message); every handshake starts from a copy.
- Every table is bounded twice: by time, and by size. Timestamps and seen mac1 values older
  than ``max_age`` are forgotten (an initiation that old is refused by age anyway, one from
  more than ``max_skew`` in the future is refused before it is stored); idle token buckets
  are full and can be forgotten; the global budget is one bucket. And each table holds at
  most ``max_entries`` (``max_sources``) entries: a full table refuses to record more
  (``record``/``accept`` return False, ``room`` says so beforehand), and the gate (core/
  gate.py) turns that into a counted drop. ``table_bound`` is what the global budget can
  admit while an entry lives, so a full table means a clock that misbehaves, not load.
- Timestamps are kept per claimed pod address (4 or 16 packed bytes: the two families never
  share a key); an initiation must be newer than the last accepted from each address it
  claims, and only the addresses the identity rules accepted are recorded, so a claim that
  was refused blocks nobody. A dual-stack handshake records two, hence ``2 * table_bound``.
- Per-source buckets are keyed by the outer source's canonical text (``wire.outer_ip``): one
  bucket per IPv4 or IPv6 address. Not per IPv6 /64 as WireGuard's rate limiter does: pods
  of one node share a prefix, and would share one bucket; the global budget bounds the total.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import wire
from tencrypt.core.noise import HandshakeState
from tencrypt.core.psk import fingerprint

Keygen = Callable[[], X25519PrivateKey]


@dataclass(frozen=True, slots=True)
class Keys:
    """The two directions of a new session, as one ChaCha20Poly1305 object each, and as the
    raw 32-byte keys (what the batch loops of core/fastpath.py take)."""

    send: ChaCha20Poly1305
    recv: ChaCha20Poly1305
    send_key: bytes | None = None
    recv_key: bytes | None = None


@dataclass(frozen=True, slots=True)
class Initiation:
    """What a responder learned from an authenticated initiation (before any DH)."""

    state: HandshakeState
    sender_index: int
    unix_ns: int
    pod_ips: wire.PodIPs
    templates: Templates  # the project key it used: the response uses the same one


def _keys(state: HandshakeState) -> Keys:
    assert state.result is not None  # only called once the pattern is complete
    first, second = state.result
    assert first.aead is not None and second.aead is not None
    if state.initiator:
        return Keys(first.aead, second.aead, first.key, second.key)
    return Keys(second.aead, first.aead, second.key, first.key)


class Templates:
    """Per project key: its fingerprint, the mac1 key and one psk-premixed Noise state per
    role."""

    __slots__ = ("fingerprint", "mac_key", "initiator", "responder")

    def __init__(self, psk: bytes, keygen: Keygen) -> None:
        self.fingerprint = fingerprint(psk)
        self.mac_key = wire.derive_mac_key(psk)
        self.initiator = _premixed(psk, True, keygen)
        self.responder = _premixed(psk, False, keygen)


def _premixed(psk: bytes, initiator: bool, keygen: Keygen) -> HandshakeState:
    state = HandshakeState(wire.NOISE_PROTOCOL, initiator, wire.PROLOGUE, psk=psk, keygen=keygen)
    state.premix_psk()
    return state


def build_initiation(
    templates: Templates, sender_index: int, unix_ns: int, pod_ips: wire.PodIPs | bytes
) -> tuple[HandshakeState, bytes]:
    """Message 1 (``psk, e``) with its mac1, and the initiator's state awaiting the response."""
    state = templates.initiator.clone()
    payload = wire.build_initiation_payload(sender_index, unix_ns, pod_ips)
    return state, wire.build_initiation(state.write_message(payload), templates.mac_key)


def read_initiation(templates: Templates, datagram: wire.Buffer) -> Initiation | None:
    """Authenticate message 1 under the psk (hashes and one AEAD, no DH: ``keygen`` is only
    called later, by ``build_response``). mac1 must have been checked before."""
    message = wire.parse_initiation(datagram)
    if message is None:
        return None
    state = templates.responder.clone()
    payload = state.read_message(message)
    if payload is None:
        return None
    fields = wire.parse_initiation_payload(payload)
    if fields is None:
        return None
    return Initiation(state, *fields, templates)


def build_response(
    initiation: Initiation, sender_index: int, pod_ips: wire.PodIPs | bytes, mac_key: bytes
) -> tuple[bytes, Keys] | None:
    """Message 2 (``e, ee``) with its mac1 and the responder's session keys; None on a bad
    key."""
    state = initiation.state
    try:
        message = state.write_message(wire.build_response_payload(sender_index, pod_ips))
    except ValueError:  # the initiator's ephemeral was a low-order point: no shared secret
        return None
    return wire.build_response(initiation.sender_index, message, mac_key), _keys(state)


def read_response(
    state: HandshakeState, noise_message: bytes
) -> tuple[int, wire.PodIPs, Keys] | None:
    """``(responder_index, responder_pod_ips, keys)``; None (state untouched) if it fails."""
    payload = state.read_message(noise_message)
    if payload is None:
        return None
    fields = wire.parse_response_payload(payload)
    if fields is None:
        return None
    return fields[0], fields[1], _keys(state)


def table_bound(budget_rate: float, budget_burst: int, max_age: float, max_skew: float) -> int:
    """The most initiations the global budget admits while one of them can stay in a table
    (its timestamp may be ``max_skew`` ahead, then it lives ``max_age``): the size bound of
    ``SeenMacs`` and ``InitiationStamps``. 105,100 with the default Limits."""
    return int(budget_rate * (max_age + max_skew)) + budget_burst


class InitiationStamps:
    """The newest initiation timestamp accepted per claimed pod address (nanoseconds; the key
    is the packed address, 4 or 16 bytes), for at most ``max_entries`` addresses."""

    __slots__ = ("_last", "max_entries")

    def __init__(self, max_entries: int = 1 << 17) -> None:
        self._last: dict[bytes, int] = {}
        self.max_entries = max_entries

    def fresh(self, pod_ips: Iterable[bytes], unix_ns: int, wall_ns: int, max_age_ns: int) -> bool:
        """Not older than ``max_age`` and newer than the last one accepted from each of
        ``pod_ips`` (the caller refuses future stamps first, so an entry never outlives
        max_age + skew)."""
        if unix_ns < wall_ns - max_age_ns:
            return False
        last = self._last
        return all(unix_ns > last.get(ip, -1) for ip in pod_ips)

    def room(self, pod_ips: Iterable[bytes]) -> bool:
        """Could ``accept`` record the stamp of each of ``pod_ips`` (each has one already, or
        there is room for the new ones)?"""
        new = sum(1 for ip in set(pod_ips) if ip not in self._last)
        return len(self._last) + new <= self.max_entries

    def accept(self, pod_ip: bytes, unix_ns: int) -> bool:
        """Record ``pod_ip``'s newest stamp; False (nothing recorded) when the table is full."""
        if not self.room((pod_ip,)):
            return False
        self._last[pod_ip] = unix_ns
        return True

    def prune(self, wall_ns: int, max_age_ns: int) -> None:
        horizon = wall_ns - max_age_ns
        self._last = {ip: ns for ip, ns in self._last.items() if ns >= horizon}

    def __len__(self) -> int:
        return len(self._last)


class SeenMacs:
    """The mac1 of every initiation that the budgets admitted in the last ``max_age``, at most
    ``max_entries`` of them: a byte-identical replay (from any source) is refused after one
    dictionary lookup (``seen``), before it can spend a token of the per-source or global
    budget or any Noise work. Only what a budget admitted is recorded (``record``), so one
    source cannot grow the table faster than its bucket allows."""

    __slots__ = ("_seen", "max_entries")

    def __init__(self, max_entries: int = 1 << 17) -> None:
        self._seen: dict[bytes, int] = {}  # mac1 -> wall ns first seen (insertion order)
        self.max_entries = max_entries

    def seen(self, mac: bytes) -> bool:
        """Was ``mac`` recorded (and not yet pruned)? Changes nothing."""
        return mac in self._seen

    def record(self, mac: bytes, wall_ns: int) -> bool:
        """Remember ``mac``; False (nothing recorded) when the table is full."""
        if mac in self._seen:
            return True
        if len(self._seen) >= self.max_entries:
            return False
        self._seen[mac] = wall_ns
        return True

    def prune(self, wall_ns: int, max_age_ns: int) -> None:
        horizon = wall_ns - max_age_ns
        seen = self._seen
        while seen:
            mac, at = next(iter(seen.items()))
            if at >= horizon:
                break
            del seen[mac]

    def __len__(self) -> int:
        return len(self._seen)


class HandshakeBudget:
    """One token bucket for all sources: at most ``rate`` handshakes a second (``burst``
    saved) go on to Noise work, however many sources they come from."""

    __slots__ = ("rate", "burst", "_tokens", "_at")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._tokens = float(burst)
        self._at: float | None = None

    def allow(self, now: float) -> bool:
        if self._at is not None:
            self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


class HandshakeLimiter:
    """A token bucket per source IP: ``rate`` per second, at most ``burst`` saved.

    The table is capped at ``max_sources``; when full, full (idle) buckets are forgotten
    first, and if every bucket is busy a new source is refused rather than let it grow
    (``room`` tells that refusal from an empty bucket, so that it is counted as its own).
    """

    __slots__ = ("rate", "burst", "max_sources", "_buckets")

    def __init__(self, rate: float, burst: int, max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)

    def room(self, source: str, now: float) -> bool:
        """Has ``source`` a bucket, or is there room for one (after forgetting idle ones)?
        ``source`` is canonical text (``wire.outer_ip``): the caller's job, once a message."""
        if source in self._buckets or len(self._buckets) < self.max_sources:
            return True
        self.prune(now)
        return len(self._buckets) < self.max_sources

    def allow(self, source: str, now: float) -> bool:
        if not self.room(source, now):
            return False
        bucket = self._buckets.get(source)
        if bucket is None:
            tokens = self.burst
        else:
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def prune(self, now: float) -> None:
        self._buckets = {
            src: (tokens, at)
            for src, (tokens, at) in self._buckets.items()
            if tokens + (now - at) * self.rate < self.burst
        }

    def __len__(self) -> int:
        return len(self._buckets)
