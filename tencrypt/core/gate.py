"""The gate every handshake message passes before the tunnel spends a Diffie-Hellman on it.

Stages of an initiation, cheapest first (``Gate.initiation``; core/handshaking.py then
checks the claimed pod IP and does the DH):

1. Version and length: a version-1 or version-2 message (72 or 88 bytes; responses 64 or
   80) is OLD_VERSION, a short one SHORT, any other length BAD_HANDSHAKE.
2. mac1 (one keyed BLAKE2s per key of the ring, about a microsecond each; core/keyring.py):
   BAD_MAC. Nothing without a project key of the ring gets further, and so far no Noise
   hashing, no AEAD, no DH has run. The key whose mac1 verified is the message's key.
3. A byte-identical copy of an initiation that the budgets admitted before:
   HANDSHAKE_REPLAY (one dictionary lookup, nothing recorded). A captured initiation
   replayed from many spoofed sources therefore spends nobody's tokens.
4. The per-source token bucket (HANDSHAKE_SOURCES_FULL when the table of buckets is full of
   busy sources and this one has none; HANDSHAKE_RATELIMIT when its bucket is empty), then
   the global budget of handshakes per second (HANDSHAKE_BUDGET): a key holder cannot make
   us do more Noise and DH work than ``handshake_budget_rate`` a second, from however many
   sources. Only now is the mac1 recorded for stage 3 (HANDSHAKE_TABLE_FULL if that table
   is full).
5. Noise ``read_message`` from that key's psk-premixed template (hashes and one AEAD, no DH):
   BAD_HANDSHAKE.
6. The timestamp: more than ``initiation_max_skew`` in the future is FUTURE_HANDSHAKE (it
   would block the pod IP until the clock catches up); older than ``initiation_max_age`` or
   not newer than the last one accepted from either claimed pod address is STALE_HANDSHAKE;
   claims whose stamps the full table could not hold are HANDSHAKE_TABLE_FULL.

A response passes 1, 2 and 4 (``Gate.response_envelope``, ``Gate.admit``) before its DH.

Rules:
- Nothing here raises on input from the network; every refusal is one DropReason.
- Bounded before budgeted (DESIGN §1a): nothing a datagram carries is recorded before stage
  4 admitted it, and every table has a size bound with a counted drop when full: the seen
  mac1 values ``handshake.table_bound`` of the Limits (what the global budget admits while
  an entry lives: 105,100 by default, about 15 MB at most), the timestamps twice that (a
  dual-stack claim records two addresses: about 26 MB at most),
  the per-source buckets 4,096 sources. The tables are also pruned by age at most once a
  second (``prune``), as handshake.py says.
"""

from __future__ import annotations

from tencrypt.core import handshake, wire
from tencrypt.core.handshake import (
    HandshakeBudget,
    HandshakeLimiter,
    Initiation,
    InitiationStamps,
    Keygen,
    SeenMacs,
    Templates,
    table_bound,
)
from tencrypt.core.keyring import KeyRing
from tencrypt.core.peer import Limits
from tencrypt.core.stats import DropReason
from tencrypt.core.wire import Buffer

PRUNE_EVERY = 1.0  # seconds of `now` between two prunes of the tables


class Gate:
    """The responder's (and initiator's) defences before any DH. See the module rules."""

    __slots__ = ("ring", "stamps", "seen", "limiter", "budget", "_limits", "_next_prune")

    def __init__(self, keys: bytes | KeyRing, keygen: Keygen, limits: Limits) -> None:
        """``keys``: the ring, or one project key (a ring of that key as current)."""
        self.ring = keys if isinstance(keys, KeyRing) else KeyRing(Templates(keys, keygen))
        bound = table_bound(
            limits.handshake_budget_rate,
            limits.handshake_budget_burst,
            limits.initiation_max_age,
            limits.initiation_max_skew,
        )
        self.stamps = InitiationStamps(2 * bound)  # one or two claimed addresses each
        self.seen = SeenMacs(bound)
        self.limiter = HandshakeLimiter(limits.handshake_rate, limits.handshake_burst)
        self.budget = HandshakeBudget(limits.handshake_budget_rate, limits.handshake_budget_burst)
        self._limits = limits
        self._next_prune = float("-inf")

    def envelope(self, datagram: Buffer, length: int) -> Templates | DropReason:
        """Stages 1-2 for a message that must be ``length`` bytes long: the key it uses."""
        n = len(datagram)
        if n != length:
            if wire.is_old_version(datagram):
                return DropReason.OLD_VERSION
            return DropReason.SHORT if n < length else DropReason.BAD_HANDSHAKE
        key = self.ring.find(datagram)
        return DropReason.BAD_MAC if key is None else key

    def admit(self, source_ip: str, now: float) -> DropReason | None:
        """Stage 4: a token from the source's bucket, then one from the global budget."""
        if not self.limiter.room(source_ip, now):
            return DropReason.HANDSHAKE_SOURCES_FULL
        if not self.limiter.allow(source_ip, now):
            return DropReason.HANDSHAKE_RATELIMIT
        if not self.budget.allow(now):
            return DropReason.HANDSHAKE_BUDGET
        return None

    def initiation(
        self, datagram: Buffer, source_ip: str, now: float, wall: float
    ) -> Initiation | DropReason:
        """Stages 1-6: the authenticated initiation (with its key), or why it was refused."""
        key = self.envelope(datagram, wire.INITIATION_LEN)
        if isinstance(key, DropReason):
            return key
        mac = bytes(datagram[-wire.MAC_LEN :])
        if self.seen.seen(mac):
            return DropReason.HANDSHAKE_REPLAY
        reason = self.admit(source_ip, now)
        if reason is not None:
            return reason
        wall_ns = int(wall * 1e9)
        if not self.seen.record(mac, wall_ns):
            return DropReason.HANDSHAKE_TABLE_FULL
        init = handshake.read_initiation(key, datagram)
        if init is None:
            return DropReason.BAD_HANDSHAKE
        limits = self._limits
        if init.unix_ns > wall_ns + int(limits.initiation_max_skew * 1e9):
            return DropReason.FUTURE_HANDSHAKE
        claims = init.pod_ips.present
        if not self.stamps.fresh(
            claims, init.unix_ns, wall_ns, int(limits.initiation_max_age * 1e9)
        ):
            return DropReason.STALE_HANDSHAKE
        if not self.stamps.room(claims):
            return DropReason.HANDSHAKE_TABLE_FULL
        return init

    def response_envelope(self, datagram: Buffer) -> Templates | DropReason:
        return self.envelope(datagram, wire.RESPONSE_LEN)

    def prune(self, now: float, wall: float) -> None:
        """Forget what can no longer matter; does work at most once per PRUNE_EVERY."""
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY
        wall_ns = int(wall * 1e9)
        max_age_ns = int(self._limits.initiation_max_age * 1e9)
        self.stamps.prune(wall_ns, max_age_ns)
        self.seen.prune(wall_ns, max_age_ns)
        self.limiter.prune(now)
