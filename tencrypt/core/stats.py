"""Counters of everything the data path does, and the reasons it drops things.

Rules:
- One ``Stats`` object per proxy; every pure state machine that can drop input is handed it.
- A drop is ``stats.drop(DropReason.X)``: never an exception, never a per-packet log line.
- Counters only grow. Gauges (sessions, flow-table size) are read from their owners at
  export time, not mirrored here.
- Every counter and drop reason is declared here, once: an undeclared one fails loudly (an
  assertion in ``inc`` and ``drop``), so /metrics (core/exposition.py) can write each from start,
  at 0, with its help text.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field


class DropReason(enum.Enum):
    # datagrams on :1337
    SHORT = "short"
    UNKNOWN_TYPE = "unknown_type"
    UNKNOWN_INDEX = "unknown_index"
    BAD_TAG = "bad_tag"
    REPLAY = "replay"
    EXPIRED_SESSION = "expired_session"
    NOT_IPV4 = "not_ipv4"  # an authenticated plaintext that is not one IPv4 or IPv6 packet
    BAD_HANDSHAKE = "bad_handshake"
    STALE_HANDSHAKE = "stale_handshake"
    HANDSHAKE_RATELIMIT = "handshake_ratelimit"  # the per-source token bucket is empty
    # handshake defences (core/gate.py, core/identity.py)
    BAD_MAC = "bad_mac"  # mac1 does not verify: no project key (dropped before any Noise work)
    OLD_VERSION = "old_version"  # a version-1 or -2 handshake message (72 / 64, 88 / 80 bytes)
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
    # the tunnel runs over IPv4: an IPv6 packet to a pod whose IPv4 address the membership does
    # not pair with it (podIPs) has no way into it: refused, never in the clear
    NO_TUNNEL_ADDRESS = "no_tunnel_address"
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
    AttributeError, not a new Prometheus series. /metrics exports each as ``tencrypt_<x>_total``
    with its help text, the second element of its definition (a member without one does not
    import). Names say whose they are: ``agent_*`` the node agent's, ``nodesync_*`` node-sync's,
    the others the proxy's (``PROXY_COUNTERS``, ``NODESYNC_COUNTERS``)."""

    help: str  # the HELP line of its metric family

    def __new__(cls, value: str, help: str) -> Counter:  # noqa: A002 - Prometheus' word
        member = str.__new__(cls, value)
        member._value_ = value
        member.help = help
        return member

    # tunnel (core/session.py)
    PACKETS_SEALED = "packets_sealed", "Inner packets sealed into tunnel datagrams."
    BYTES_SEALED = "bytes_sealed", "Bytes of inner packets sealed into tunnel datagrams."
    PACKETS_OPENED = "packets_opened", "Tunnel datagrams authenticated, opened and accepted."
    BYTES_OPENED = "bytes_opened", "Bytes of inner packets opened from accepted tunnel datagrams."
    HANDSHAKES_INITIATED = "handshakes_initiated", "Handshake initiations this proxy sent."
    HANDSHAKES_RESPONDED = "handshakes_responded", "Handshake initiations this proxy answered."
    HANDSHAKES_COMPLETED = "handshakes_completed", "Handshakes that completed into a session."
    HANDSHAKES_WRONG_KEY = (  # a member's mac1 under no key of the ring
        "handshakes_wrong_key",
        "Initiations from project members whose MAC verifies under no key of the ring.",
    )
    KEY_MISMATCHES_UNLISTED = (  # ... from a source the full list left out
        "key_mismatches_unlisted",
        "Wrong-key initiations from sources left out of the full key_mismatch list.",
    )
    KEEPALIVES_SENT = "keepalives_sent", "Keepalive datagrams sent on idle sessions."
    KEEPALIVES_RECEIVED = "keepalives_received", "Keepalive datagrams received and authenticated."
    REKEYS = "rekeys", "Sessions replaced by a new handshake (on time or message count)."
    VIP_DATA_ELSEWHERE = (  # a VIP's session heard from another address
        "vip_data_elsewhere",
        "Datagrams of a Service VIP's session that came from another address.",
    )
    CLAIMS_UNPAIRED = (  # identity: a dual-stack peer's second address left out
        "claims_unpaired",
        "Handshake claims of a second address family not accepted (not paired with the "
        "source's address by the membership, or refused by a claim rule): their sessions "
        "carry the source's family only.",
    )
    # the proxy's data path (daemon.py)
    SUPER_PACKETS_SPLIT = "super_packets_split", "TSO super-packets from tenc0 cut into segments."
    PACKETS_BYPASSED = (  # sent in the clear: positively another project's
        "packets_bypassed",
        "Packets sent in the clear out of the uplink: their destination is another project's.",
    )
    PACKETS_PLAINTEXT_FALLBACK = (  # --no-strict only
        "packets_plaintext_fallback",
        "Packets sent in the clear to an unreachable peer (--no-strict only).",
    )
    PLAINTEXT_FALLBACK = (  # --no-strict: a peer given up, then in clear
        "plaintext_fallback",
        "Peers given up and then reached in the clear (--no-strict only).",
    )
    PEERS_UNREACHABLE = (
        "peers_unreachable",
        "Peers found unreachable: their handshakes went unanswered.",
    )
    TUN_INJECT_ERRORS = "tun_inject_errors", "Opened packets tenc0 refused to take."
    EXPRESS_FAILURES = (
        "express_failures",
        "Times the express lane raised in the event loop's wait and was stopped (a bug).",
    )
    DATAGRAMS_SEND_DROPPED = (
        "datagrams_send_dropped",
        "Tunnel datagrams the UDP socket did not send (buffer full or error).",
    )
    CLASSIFICATION_CONFLICTS = (  # an answer against trusted evidence
        "classification_conflicts",
        "DNS answers that contradicted stronger evidence about an address (ignored).",
    )
    CLASSIFICATION_RESERVED_REFUSED = (  # the pod's boundary
        "classification_reserved_refused",
        "Answers naming a reserved address (this pod, gateway, DNS, loopback...) as internal.",
    )
    # ... beyond the MAX_CONFLICTS waiting to be logged: counted here, not logged
    CLASSIFICATION_CONFLICTS_UNLOGGED = (
        "classification_conflicts_unlogged",
        "Classification conflicts counted but not logged (too many waiting).",
    )
    CLASSIFICATION_EVICTIONS = (  # the full table made room (classify.py)
        "classification_evictions",
        "Addresses evicted from the full classification table.",
    )
    CLASSIFICATION_UNKNOWN_EVICTIONS = (  # oldest "unknown"
        "classification_unknown_evictions",
        "Unclassified addresses evicted from the classification table to make room.",
    )
    MEMBERSHIP_LOADS = "membership_loads", "Membership files from the node agent loaded."
    KEY_RELOADS = (  # a new key ring from the key file (linux/keyfile.py)
        "key_reloads",
        "Key rings loaded from the project's key file.",
    )
    KEY_RELOAD_REFUSALS = (  # a malformed key file, the ring kept
        "key_reload_refusals",
        "Key files refused as malformed (the loaded ring was kept).",
    )
    INBOUND_ACCEPTED = (  # standalone: queued connections let in
        "inbound_accepted",
        "Held inbound plaintext connections let in after their source was classified.",
    )
    OUTBOUND_ACCEPTED = (  # standalone: queued connections let out (clear)
        "outbound_accepted",
        "Held outbound connections let out in the clear after classification.",
    )
    OUTBOUND_TO_TUNNEL = (  # ... sent into tenc0: the project's
        "outbound_to_tunnel",
        "Held outbound packets sent back into tenc0: their destination is the project's.",
    )
    # UDP batches (linux/gso.py)
    UDP_GSO_SENDS = "udp_gso_sends", "UDP GSO sends (one sendmsg carrying many datagrams)."
    GSO_FALLBACK = "gso_fallback", "Times the kernel refused UDP GSO, turning it off."
    GSO_OVERSIZE = "gso_oversize", "GSO sends refused for a datagram above the route's MTU."
    UDP_TRUNCATED = (
        "udp_truncated",
        "Received UDP messages larger than the receive buffer (truncated).",
    )
    # receiver NAT (core/nat.py)
    NAT_FLOWS_CREATED = "nat_flows_created", "Receiver NAT flows created."
    NAT_FLOWS_EVICTED = "nat_flows_evicted", "Receiver NAT flows evicted from the full table."
    NAT_FLOWS_EXPIRED = "nat_flows_expired", "Receiver NAT flows expired after idling."
    NAT_VIP_REMAPPED = "nat_vip_remapped", "Receiver NAT flows whose VIP was re-mapped."
    # sender's Service translation (core/conntrack.py)
    SERVICE_FLOWS_CREATED = "service_flows_created", "Service flows created (an endpoint picked)."
    SERVICE_FLOWS_EXPIRED = "service_flows_expired", "Service flows expired after idling."
    SERVICE_FLOWS_EVICTED = "service_flows_evicted", "Service flows evicted from the full table."
    SERVICE_FLOWS_REPICKED = (  # their endpoint went: UDP/ICMP re-pick
        "service_flows_repicked",
        "UDP and ICMP Service flows given a new endpoint after theirs went away.",
    )
    # conntrack.py rule 8: a SYN straight to an endpoint reuses a Service flow's wire tuple
    SERVICE_FLOWS_REUSED = (  # the Service flow was closed: it ends
        "service_flows_reused",
        "Closed Service flows ended by a new connection straight to the endpoint on their tuple.",
    )
    SERVICE_TUPLE_CONFLICTS = (  # it was open: both share one tuple
        "service_tuple_conflicts",
        "Open Service flows sharing their tuple with a new connection straight to the endpoint.",
    )
    NETPOL_FLOWS_EVICTED = (  # core/policyflows.py rule 7: table full
        "netpol_flows_evicted",
        "NetworkPolicy flows evicted from the full flow table.",
    )
    STANDALONE_VIP_PACKETS = (  # sealed to a VIP: the node picks (no feed)
        "standalone_vip_packets",
        "Packets sealed to a Service VIP for the node to forward (standalone mode).",
    )
    # DNS proxy (core/dnsmsg.py, linux/dns.py)
    DNS_QUERIES = "dns_queries", "DNS queries received from the pod's applications over UDP."
    DNS_ANSWERS = "dns_answers", "DNS answers relayed to the pod's applications."
    DNS_REVERSE_LOOKUPS = "dns_reverse_lookups", "PTR lookups sent to classify an address."
    DNS_TCP_QUERIES = (
        "dns_tcp_queries",
        "DNS queries received from the pod's applications over TCP.",
    )
    DNS_UPSTREAM_ERRORS = "dns_upstream_errors", "Errors talking to the cluster DNS server."
    DNS_CLIENT_ERRORS = "dns_client_errors", "Errors answering the pod's DNS clients."
    DNS_CACHE_HITS = "dns_cache_hits", "DNS queries answered from the proxy's cache."
    DNS_ANSWERS_HELD = (  # held until their routes and firewall elements
        "dns_answers_held",
        "DNS answers held until their routes and firewall elements were in place.",
    )
    DNS_ANSWERS_HELD_TOO_LONG = (  # ... not in place in time: SERVFAIL
        "dns_answers_held_too_long",
        "Held DNS answers replaced by SERVFAIL: their routes did not come in time.",
    )
    DNS_CACHE_EVICTIONS = (  # an answer (or its index) dropped: cache full
        "dns_cache_evictions",
        "DNS answers evicted from the full cache.",
    )
    # routes and firewall (linux/effects.py)
    ROUTES_ADDED = "routes_added", "Routes added in the pod (tenc0 and uplink /32s)."
    ROUTES_REMOVED = "routes_removed", "Routes removed from the pod."
    FIREWALL_ELEMENTS_ADDED = "firewall_elements_added", "Addresses added to the firewall's sets."
    FIREWALL_ELEMENTS_DELETED = (
        "firewall_elements_deleted",
        "Addresses deleted from the firewall's sets.",
    )
    EFFECT_ERRORS = "effect_errors", "Route or firewall changes that failed (retried)."
    # NFQUEUE (linux/nfqueue.py)
    NFQUEUE_PACKETS = "nfqueue_packets", "Packets the kernel queued to the inbound gate."
    NFQUEUE_ACCEPTED = "nfqueue_accepted", "Queued packets given an accept verdict."
    NFQUEUE_REFUSED = "nfqueue_refused", "Queued packets given a drop verdict."
    NFQUEUE_MALFORMED = "nfqueue_malformed", "NFQUEUE messages that could not be parsed."
    NFQUEUE_OVERFLOWS = (
        "nfqueue_overflows",
        "Times queued packets were lost: the socket buffer was full.",
    )
    NFQUEUE_KERNEL_ERRORS = "nfqueue_kernel_errors", "Errors the kernel reported on the queue."
    NFQUEUE_VERDICT_ERRORS = "nfqueue_verdict_errors", "Verdicts the kernel did not take."
    NFQUEUE_RECV_ERRORS = "nfqueue_recv_errors", "Errors reading the NFQUEUE socket."
    # node agent (agent/)
    AGENT_BAD_OBJECT = "agent_bad_object", "Malformed API objects the agent ignored."
    AGENT_KEY_PROBLEMS = "agent_key_problems", "Project key Secrets the agent could not use."
    AGENT_MEMBERS_WRITE_FAILED = (
        "agent_members_write_failed",
        "Membership files the agent failed to write.",
    )
    AGENT_PROXIES_FOUND_DEAD = (
        "agent_proxies_found_dead",
        "Proxies the agent found dead when it started.",
    )
    AGENT_PROXIES_ADOPTED = "agent_proxies_adopted", "Running proxies the agent adopted at start."
    AGENT_PROXY_EXITS = "agent_proxy_exits", "Proxy processes that exited."
    AGENT_PROXY_STARTS = "agent_proxy_starts", "Proxy processes the agent started."
    AGENT_PROXY_STOPS = "agent_proxy_stops", "Proxy processes the agent stopped."
    # node-sync (nodesync/)
    NODESYNC_APPLIED = "nodesync_applied", "Rule transactions node-sync applied to the node."
    NODESYNC_BAD_OBJECT = "nodesync_bad_object", "Malformed API objects node-sync ignored."
    NODESYNC_CONNTRACK_DELETED = (
        "nodesync_conntrack_deleted",
        "Conntrack entries node-sync deleted after an endpoint went away.",
    )


PROXY_COUNTERS = tuple(c for c in Counter if not c.startswith(("agent_", "nodesync_")))
NODESYNC_COUNTERS = tuple(c for c in Counter if c.startswith("nodesync_"))


@dataclass(slots=True)
class Stats:
    """Monotonic counters. ``counters`` holds named event counts, ``drops`` drop reasons."""

    counters: dict[str, int] = field(default_factory=dict)
    drops: dict[DropReason, int] = field(default_factory=dict)

    def inc(self, name: Counter, n: int = 1) -> None:
        assert isinstance(name, Counter), f"undeclared counter {name!r}"
        self.counters[name] = self.counters.get(name, 0) + n

    def drop(self, reason: DropReason, n: int = 1) -> None:
        assert isinstance(reason, DropReason), f"undeclared drop reason {reason!r}"
        self.drops[reason] = self.drops.get(reason, 0) + n

    def get(self, name: str) -> int:
        return self.counters.get(name, 0)

    def dropped(self, reason: DropReason) -> int:
        return self.drops.get(reason, 0)


def snapshot(stats: Stats) -> dict[str, dict[str, int]]:
    """Counters and drops (by reason value) as JSON-ready data, for ``/status``."""
    return {
        "counters": dict(sorted(stats.counters.items())),
        "drops": {
            reason.value: n for reason, n in sorted(stats.drops.items(), key=lambda kv: kv[0].value)
        },
    }


def merge(parts: Iterable[Stats]) -> Stats:
    total = Stats()
    for part in parts:
        for k, v in part.counters.items():
            total.counters[k] = total.counters.get(k, 0) + v
        for r, v in part.drops.items():
            total.drop(r, v)
    return total
