"""bench/attach.py's NetworkPolicies for ``tencrypt-netpol``: both benchmark pods isolated both
ways, the benchmark and the tunnel admitted, nothing else between them."""

from __future__ import annotations

from bench.attach import SERVER, bench_policies, bench_topology
from tencrypt.agent.netpol import World
from tencrypt.core.netpolicy import from_doc
from tencrypt.core.packet import ICMP, TCP, UDP
from tencrypt.lab.netpolicy import pod_object
from tencrypt.nodesync.kubeobjects import build_namespace


def world() -> tuple[World, str, str, str]:
    _, pods = bench_topology().plan("b", 1)
    a, b, other = pods["nginx1"], pods[SERVER], pods["nginx3"]
    w = World.of(
        a.project,
        bench_policies(a, b),
        [pod_object(p) for p in pods.values()],
        [build_namespace(a.project)],
    )
    return w, a.ip, b.ip, other.ip


def test_both_pods_are_isolated_both_ways_and_the_tunnel_is_admitted() -> None:
    w, _, _, _ = world()
    for name in ("nginx1", SERVER):
        doc = w.reduce(name)
        assert doc["ingress"]["isolated"] and doc["egress"]["isolated"], name
        assert w.blocked_for(name) == [], name
    assert not any(p.malformed for p in w.policies)


def test_the_benchmark_passes_and_nothing_else_does() -> None:
    w, a, b, other = world()
    client, server = from_doc(w.reduce("nginx1")), from_doc(w.reduce(SERVER))
    for proto, port in ((TCP, 5201), (UDP, 5201), (TCP, 5202), (ICMP, 0)):
        assert client.egress(b, proto, port).allowed
        assert server.ingress(a, proto, port).allowed
    assert client.egress(other, UDP, 53).allowed  # DNS, to anyone
    assert not client.egress(other, TCP, 8080).allowed
    assert not server.ingress(other, TCP, 5201).allowed
    assert server.ingress(other, UDP, 1337).allowed  # the tunnel, from the project
