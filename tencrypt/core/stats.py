"""Counters of everything the data path does, and the reasons it drops things.

Rules:
- One ``Stats`` object per proxy; every pure state machine that can drop input is handed it.
- A drop is ``stats.drop(DropReason.X)``: never an exception, never a per-packet log line.
- Counters only grow. Gauges (sessions, flow-table size) are read from their owners at
  export time, not mirrored here.
- ``render_prometheus`` turns a snapshot into Prometheus text exposition format (0.0.4).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


class DropReason(enum.Enum):
    # datagrams on :1337
    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_INDEX = "unknown_index"
    BAD_TAG = "bad_tag"
    REPLAY = "replay"
    EXPIRED_SESSION = "expired_session"
    NOT_IPV4 = "not_ipv4"
    BAD_HANDSHAKE = "bad_handshake"
    STALE_HANDSHAKE = "stale_handshake"
    HANDSHAKE_RATELIMIT = "handshake_ratelimit"  # the per-source token bucket is empty
    # handshake defences (core/gate.py, core/identity.py)
    BAD_MAC = "bad_mac"  # mac1 does not verify: no project key (dropped before any Noise work)
    OLD_VERSION = "old_version"  # a version-1 handshake message (72 / 64 bytes)
    HANDSHAKE_REPLAY = "handshake_replay"  # a byte-identical copy of an initiation seen before
    HANDSHAKE_BUDGET = "handshake_budget"  # the global handshakes-per-second budget is spent
    HANDSHAKE_SOURCES_FULL = "handshake_sources_full"  # no room for a new source's bucket
    HANDSHAKE_TABLE_FULL = "handshake_table_full"  # seen mac1 or timestamp table at its bound
    FUTURE_HANDSHAKE = "future_handshake"  # initiation timestamp beyond the allowed clock skew
    CLAIM_NOT_SOURCE = "claim_not_source"  # claimed pod IP != the datagram's source address
    CLAIM_OUTSIDE_POD_NETWORK = "claim_outside_pod_network"
    CLAIM_SERVICE_IP = "claim_service_ip"  # a Service VIP claimed as a pod IP
    CLAIM_RESERVED = "claim_reserved"  # link-local, loopback, multicast, gateway, DNS, this pod
    CLAIM_NOT_MEMBER = "claim_not_member"  # membership knows the address is not the project's
    CLAIM_REBIND = "claim_rebind"  # a confirmed peer claimed by another endpoint, or renamed
    PEERS_FULL = "peers_full"  # an initiation from a new peer: max_peers, every one busy
    # packets read from tenc0
    MALFORMED_PACKET = "malformed_packet"
    NO_FLOW = "no_flow"
    QUEUE_FULL = "queue_full"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    TOO_BIG = "too_big"
    # DNS proxy
    DNS_MALFORMED_QUERY = "dns_malformed_query"
    DNS_MALFORMED_ANSWER = "dns_malformed_answer"
    DNS_UNKNOWN_ID = "dns_unknown_id"
    DNS_TOO_MANY_PENDING = "dns_too_many_pending"
    DNS_UPSTREAM_TIMEOUT = "dns_upstream_timeout"
    DNS_TOO_BIG = "dns_too_big"
    DNS_WRONG_QUESTION = "dns_wrong_question"
    DNS_TCP_TOO_MANY_CLIENTS = "dns_tcp_too_many_clients"
    # receiver NAT (core/nat.py)
    BAD_DESTINATION = "bad_destination"
    NAT_CONFLICT = "nat_conflict"
    NAT_PEER_QUOTA = "nat_peer_quota"  # a new flow from a peer already holding its quota
    # sender's Service translation (core/conntrack.py, core/dispatch.py)
    SERVICE_NO_ENDPOINT = "service_no_endpoint"  # no such Service port, or no endpoint: REJECT
    SERVICE_UNKNOWN = "service_unknown"  # a project cluster IP the membership does not list yet
    # tunnel (core/session.py): an authenticated inner packet whose source the peer may not use
    BAD_SOURCE = "bad_source"
    # NetworkPolicy (core/policyflows.py): a new flow no rule of an isolating policy allows, or
    # a packet of a flow a newer policy blocks (by policy in the netpol metrics)
    NETWORK_POLICY = "network_policy"
    # fail-closed policy (core/policy.py): a destination in the Service CIDR or the pod network
    # that no source classified, even after a reverse lookup: refused, never in the clear
    UNCLASSIFIED = "unclassified"
    # standalone mode (linux/inbound.py): a plaintext connection from a source that a
    # reverse lookup named as the project's, or one we could not hold while looking it up
    PLAINTEXT_FROM_PROJECT = "plaintext_from_project"
    INBOUND_HOLD_FULL = "inbound_hold_full"


class Counter(enum.StrEnum):
    """Every event counter, beside DropReason: ``stats.inc(Counter.X)``. A typo is an
    AttributeError, not a new Prometheus series; /metrics exports each as ``tencrypt_<x>_total``."""

    # tunnel (core/session.py)
    PACKETS_SEALED = "packets_sealed"
    BYTES_SEALED = "bytes_sealed"
    PACKETS_OPENED = "packets_opened"
    BYTES_OPENED = "bytes_opened"
    HANDSHAKES_INITIATED = "handshakes_initiated"
    HANDSHAKES_RESPONDED = "handshakes_responded"
    HANDSHAKES_COMPLETED = "handshakes_completed"
    HANDSHAKES_WRONG_KEY = "handshakes_wrong_key"  # a member's mac1 under no key of the ring
    KEY_MISMATCHES_UNLISTED = "key_mismatches_unlisted"  # ... from a source the full list left out
    KEEPALIVES_SENT = "keepalives_sent"
    KEEPALIVES_RECEIVED = "keepalives_received"
    REKEYS = "rekeys"
    VIP_DATA_ELSEWHERE = "vip_data_elsewhere"  # a VIP's session heard from another address
    # the proxy's data path (daemon.py)
    SUPER_PACKETS_SPLIT = "super_packets_split"
    PACKETS_BYPASSED = "packets_bypassed"  # sent in the clear: positively another project's
    PACKETS_PLAINTEXT_FALLBACK = "packets_plaintext_fallback"  # --no-strict only
    PLAINTEXT_FALLBACK = "plaintext_fallback"  # --no-strict: a peer given up, then in clear
    PEERS_UNREACHABLE = "peers_unreachable"
    TUN_INJECT_ERRORS = "tun_inject_errors"
    DATAGRAMS_SEND_DROPPED = "datagrams_send_dropped"
    CLASSIFICATION_CONFLICTS = "classification_conflicts"  # an answer against trusted evidence
    CLASSIFICATION_RESERVED_REFUSED = "classification_reserved_refused"  # the pod's boundary
    # ... beyond the MAX_CONFLICTS waiting to be logged: counted here, not logged
    CLASSIFICATION_CONFLICTS_UNLOGGED = "classification_conflicts_unlogged"
    CLASSIFICATION_EVICTIONS = "classification_evictions"  # the full table made room (classify.py)
    CLASSIFICATION_UNKNOWN_EVICTIONS = "classification_unknown_evictions"  # oldest "unknown"
    MEMBERSHIP_LOADS = "membership_loads"
    KEY_RELOADS = "key_reloads"  # a new key ring from the key file (linux/keyfile.py)
    KEY_RELOAD_REFUSALS = "key_reload_refusals"  # a malformed key file, the ring kept
    INBOUND_ACCEPTED = "inbound_accepted"  # standalone: queued connections let in
    OUTBOUND_ACCEPTED = "outbound_accepted"  # standalone: queued connections let out (clear)
    OUTBOUND_TO_TUNNEL = "outbound_to_tunnel"  # ... dropped: the project's, its route comes
    # UDP batches (linux/gso.py)
    UDP_GSO_SENDS = "udp_gso_sends"
    GSO_FALLBACK = "gso_fallback"
    GSO_OVERSIZE = "gso_oversize"
    UDP_TRUNCATED = "udp_truncated"
    # receiver NAT (core/nat.py)
    NAT_FLOWS_CREATED = "nat_flows_created"
    NAT_FLOWS_EVICTED = "nat_flows_evicted"
    NAT_FLOWS_EXPIRED = "nat_flows_expired"
    NAT_VIP_REMAPPED = "nat_vip_remapped"
    # sender's Service translation (core/conntrack.py)
    SERVICE_FLOWS_CREATED = "service_flows_created"
    SERVICE_FLOWS_EXPIRED = "service_flows_expired"
    SERVICE_FLOWS_EVICTED = "service_flows_evicted"
    SERVICE_FLOWS_REPICKED = "service_flows_repicked"  # their endpoint went: UDP/ICMP re-pick
    # conntrack.py rule 8: a SYN straight to an endpoint reuses a Service flow's wire tuple
    SERVICE_FLOWS_REUSED = "service_flows_reused"  # the Service flow was closed: it ends
    SERVICE_TUPLE_CONFLICTS = "service_tuple_conflicts"  # it was open: both share one tuple
    NETPOL_FLOWS_EVICTED = "netpol_flows_evicted"  # core/policyflows.py rule 7: table full
    STANDALONE_VIP_PACKETS = "standalone_vip_packets"  # sealed to a VIP: the node picks (no feed)
    # DNS proxy (core/dnsmsg.py, linux/dns.py)
    DNS_QUERIES = "dns_queries"
    DNS_ANSWERS = "dns_answers"
    DNS_REVERSE_LOOKUPS = "dns_reverse_lookups"
    DNS_TCP_QUERIES = "dns_tcp_queries"
    DNS_UPSTREAM_ERRORS = "dns_upstream_errors"
    DNS_CLIENT_ERRORS = "dns_client_errors"
    DNS_CACHE_HITS = "dns_cache_hits"
    DNS_ANSWERS_HELD = "dns_answers_held"  # held until their routes and firewall elements
    DNS_ANSWERS_HELD_TOO_LONG = "dns_answers_held_too_long"  # ... not in place in time: SERVFAIL
    DNS_CACHE_EVICTIONS = "dns_cache_evictions"  # an answer (or its index) dropped: cache full
    # routes and firewall (linux/effects.py)
    ROUTES_ADDED = "routes_added"
    ROUTES_REMOVED = "routes_removed"
    FIREWALL_ELEMENTS_ADDED = "firewall_elements_added"
    FIREWALL_ELEMENTS_DELETED = "firewall_elements_deleted"
    EFFECT_ERRORS = "effect_errors"
    # NFQUEUE (linux/nfqueue.py)
    NFQUEUE_PACKETS = "nfqueue_packets"
    NFQUEUE_ACCEPTED = "nfqueue_accepted"
    NFQUEUE_REFUSED = "nfqueue_refused"
    NFQUEUE_MALFORMED = "nfqueue_malformed"
    NFQUEUE_OVERFLOWS = "nfqueue_overflows"
    NFQUEUE_KERNEL_ERRORS = "nfqueue_kernel_errors"
    NFQUEUE_VERDICT_ERRORS = "nfqueue_verdict_errors"
    NFQUEUE_RECV_ERRORS = "nfqueue_recv_errors"
    # node agent (agent/)
    AGENT_BAD_OBJECT = "agent_bad_object"
    AGENT_KEY_PROBLEMS = "agent_key_problems"
    AGENT_MEMBERS_WRITE_FAILED = "agent_members_write_failed"
    AGENT_PROXIES_FOUND_DEAD = "agent_proxies_found_dead"
    AGENT_PROXIES_ADOPTED = "agent_proxies_adopted"
    AGENT_PROXY_EXITS = "agent_proxy_exits"
    AGENT_PROXY_STARTS = "agent_proxy_starts"
    AGENT_PROXY_STOPS = "agent_proxy_stops"
    # node-sync (nodesync/)
    NODESYNC_APPLIED = "nodesync_applied"
    NODESYNC_BAD_OBJECT = "nodesync_bad_object"
    NODESYNC_CONNTRACK_DELETED = "nodesync_conntrack_deleted"


@dataclass(slots=True)
class Stats:
    """Monotonic counters. ``counters`` holds named event counts, ``drops`` drop reasons."""

    counters: dict[str, int] = field(default_factory=dict)
    drops: dict[DropReason, int] = field(default_factory=dict)

    def inc(self, name: Counter, n: int = 1) -> None:
        self.counters[name] = self.counters.get(name, 0) + n

    def drop(self, reason: DropReason, n: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + n

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def dropped(self, reason: DropReason) -> int:
        return self.drops.get(reason, 0)


def render_prometheus(
    stats: Stats, gauges: Mapping[str, float] | None = None, prefix: str = "tencrypt"
) -> str:
    """Prometheus text format: counters as ``<prefix>_<name>_total``, drops labelled by reason."""
    lines: list[str] = []
    for name in sorted(stats.counters):
        metric = f"{prefix}_{name}_total"
        lines += [f"# TYPE {metric} counter", f"{metric} {stats.counters[name]}"]
    metric = f"{prefix}_drops_total"
    lines.append(f"# HELP {metric} Packets, datagrams or DNS messages dropped, by reason.")
    lines.append(f"# TYPE {metric} counter")
    for reason in DropReason:
        lines.append(f'{metric}{{reason="{reason.value}"}} {stats.drops.get(reason, 0)}')
    for name, value in sorted((gauges or {}).items()):
        metric = f"{prefix}_{name}"
        lines += [f"# TYPE {metric} gauge", f"{metric} {_number(value)}"]
    return "\n".join(lines) + "\n"


def snapshot(stats: Stats) -> dict[str, dict[str, int]]:
    """Counters and drops (by reason value) as JSON-ready data, for ``/status``."""
    return {
        "counters": dict(sorted(stats.counters.items())),
        "drops": {
            reason.value: n for reason, n in sorted(stats.drops.items(), key=lambda kv: kv[0].value)
        },
    }


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def merge(parts: Iterable[Stats]) -> Stats:
    total = Stats()
    for part in parts:
        for k, v in part.counters.items():
            total.counters[k] = total.counters.get(k, 0) + v
        for r, v in part.drops.items():
            total.drop(r, v)
    return total
