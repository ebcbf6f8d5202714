"""The tunnel's 1-RTT handshake: Noise NNpsk0 messages in wire.py's envelopes, plus the
responder's defences against replayed and excessive initiations.

Stages of an initiation at the responder, cheapest first (session.py drives them):

1. ``read_initiation``: length, then the psk-keyed AEAD of the Noise payload (hashes and one
   ChaCha20-Poly1305, no Diffie-Hellman). Anything forged stops here.
2. ``InitiationStamps.fresh``: the TAI64N timestamp must be newer than the last one accepted
   from the same pod IP and not older than ``max_age``: a replayed initiation stops here.
3. ``HandshakeLimiter.allow``: a token bucket per source IP, so that even a key holder
   cannot make us burn CPU on Diffie-Hellman.
4. ``build_response``: a fresh ephemeral key, the ``ee`` DH, the response and the keys.

Rules:
- Nothing here raises on input from the network: failures are ``None``.
- Both tables are bounded: timestamps older than ``max_age`` can be forgotten (an initiation
  that old is refused by age anyway); idle token buckets are full and can be forgotten.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from tencrypt.core import wire
from tencrypt.core.noise import HandshakeState

Keygen = Callable[[], X25519PrivateKey]


@dataclass(frozen=True, slots=True)
class Keys:
    """The two directions of a new session, as one ChaCha20Poly1305 object each."""

    send: ChaCha20Poly1305
    recv: ChaCha20Poly1305


@dataclass(frozen=True, slots=True)
class Initiation:
    """What a responder learned from an authenticated initiation (before any DH)."""

    state: HandshakeState
    sender_index: int
    unix_ns: int
    pod_ip: bytes


def _keys(state: HandshakeState) -> Keys:
    assert state.result is not None  # only called once the pattern is complete
    first, second = state.result
    assert first.aead is not None and second.aead is not None
    if state.initiator:
        return Keys(send=first.aead, recv=second.aead)
    return Keys(send=second.aead, recv=first.aead)


def _state(psk: bytes, initiator: bool, keygen: Keygen) -> HandshakeState:
    return HandshakeState(wire.NOISE_PROTOCOL, initiator, wire.PROLOGUE, psk=psk, keygen=keygen)


def build_initiation(psk: bytes, sender_index: int, unix_ns: int, pod_ip: bytes,
                     keygen: Keygen) -> tuple[HandshakeState, bytes]:
    """Message 1 (``psk, e``) and the initiator's state that awaits the response."""
    state = _state(psk, True, keygen)
    payload = wire.build_initiation_payload(sender_index, unix_ns, pod_ip)
    return state, wire.build_initiation(state.write_message(payload))


def read_initiation(psk: bytes, datagram: wire.Buffer,
                    keygen: Keygen) -> Initiation | None:
    """Stage 1: authenticate message 1 under the psk. No DH happens here (``keygen`` is only
    called later, by ``build_response``)."""
    message = wire.parse_initiation(datagram)
    if message is None:
        return None
    state = _state(psk, False, keygen)
    payload = state.read_message(message)
    if payload is None:
        return None
    fields = wire.parse_initiation_payload(payload)
    if fields is None:
        return None
    return Initiation(state, *fields)


def build_response(initiation: Initiation, sender_index: int,
                   pod_ip: bytes) -> tuple[bytes, Keys] | None:
    """Stage 4: message 2 (``e, ee``) and the responder's session keys; None on a bad key."""
    state = initiation.state
    try:
        message = state.write_message(wire.build_response_payload(sender_index, pod_ip))
    except ValueError:  # the initiator's ephemeral was a low-order point: no shared secret
        return None
    return wire.build_response(initiation.sender_index, message), _keys(state)


def read_response(state: HandshakeState, noise_message: bytes) -> tuple[int, bytes, Keys] | None:
    """``(responder_index, responder_pod_ip, keys)``; None (state untouched) if it fails."""
    payload = state.read_message(noise_message)
    if payload is None:
        return None
    fields = wire.parse_response_payload(payload)
    if fields is None:
        return None
    return fields[0], fields[1], _keys(state)


class InitiationStamps:
    """Stage 2: the newest initiation timestamp accepted per pod IP (nanoseconds)."""

    __slots__ = ("_last",)

    def __init__(self) -> None:
        self._last: dict[bytes, int] = {}

    def fresh(self, pod_ip: bytes, unix_ns: int, wall_ns: int, max_age_ns: int) -> bool:
        if unix_ns < wall_ns - max_age_ns:
            return False
        return unix_ns > self._last.get(pod_ip, -1)

    def accept(self, pod_ip: bytes, unix_ns: int) -> None:
        self._last[pod_ip] = unix_ns

    def prune(self, wall_ns: int, max_age_ns: int) -> None:
        horizon = wall_ns - max_age_ns
        self._last = {ip: ns for ip, ns in self._last.items() if ns >= horizon}

    def __len__(self) -> int:
        return len(self._last)


class HandshakeLimiter:
    """Stage 3: a token bucket per source IP: ``rate`` per second, at most ``burst`` saved.

    The table is capped at ``max_sources``; when full, full (idle) buckets are forgotten
    first, and if every bucket is busy a new source is refused rather than let it grow.
    """

    __slots__ = ("rate", "burst", "max_sources", "_buckets")

    def __init__(self, rate: float, burst: int, max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.max_sources = max_sources
        self._buckets: dict[str, tuple[float, float]] = {}  # source -> (tokens, at)

    def allow(self, source: str, now: float) -> bool:
        bucket = self._buckets.get(source)
        if bucket is None:
            if len(self._buckets) >= self.max_sources:
                self.prune(now)
                if len(self._buckets) >= self.max_sources:
                    return False
            tokens = self.burst
        else:
            tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.rate)
        if tokens < 1.0:
            self._buckets[source] = (tokens, now)
            return False
        self._buckets[source] = (tokens - 1.0, now)
        return True

    def prune(self, now: float) -> None:
        self._buckets = {src: (tokens, at) for src, (tokens, at) in self._buckets.items()
                         if tokens + (now - at) * self.rate < self.burst}

    def __len__(self) -> int:
        return len(self._buckets)
