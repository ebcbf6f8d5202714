"""core/services.py: the Service table the sending proxy resolves cluster IPs with, and the
membership file's Service entries (format 2)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tencrypt.core.membership import FORMAT, Members, MembershipError, parse_members
from tencrypt.core.membership import render_members as render
from tencrypt.core.packet import ICMP, SCTP, TCP, UDP
from tencrypt.core.services import (
    Endpoint,
    Port,
    Service,
    ServiceError,
    ServiceTable,
    parse_service,
    render_service,
)

VIP = "172.30.5.9"
P1, P2, P3, OUTSIDER = "10.128.0.11", "10.128.0.12", "10.129.0.13", "10.200.0.9"
PODS = frozenset({P1, P2, P3})
HTTP = Port("http", TCP, 80)


def n(ip: str) -> int:
    return int(ipaddress.IPv4Address(ip))


def ep(ip: str, target: int = 8080, name: str = "http", proto: int = TCP, **kw) -> Endpoint:
    return Endpoint(ip, (Port(name, proto, target),), **kw)


def web(*endpoints: Endpoint, ports=(HTTP,), affinity: float = 0.0) -> Service:
    return Service("web", (VIP,), tuple(ports), tuple(endpoints), affinity)


def test_a_service_port_maps_to_each_endpoints_own_target_port():
    # a named targetPort resolves per endpoint: the slice carries each pod's number
    table = ServiceTable.build([web(ep(P1, 8080), ep(P2, 9090))], PODS)
    b = table.lookup(n(VIP), TCP, 80)
    assert b is not None and set(b.choose) == {(n(P1), 8080), (n(P2), 9090)}
    assert b.keep == frozenset(b.choose) and b.service == "web"
    assert n(VIP) in table and len(table) == 1 and table.packed == {bytes([172, 30, 5, 9])}


def test_another_port_protocol_or_cluster_ip_has_no_backends():
    table = ServiceTable.build([web(ep(P1))], PODS)
    assert table.lookup(n(VIP), TCP, 81) is None
    assert table.lookup(n(VIP), UDP, 80) is None
    assert table.lookup(n("172.30.5.10"), TCP, 80) is None


def test_endpoints_without_the_ports_name_are_not_backends_of_it():
    metrics = Port("metrics", TCP, 9100)
    svc = web(ep(P1), Endpoint(P2, (Port("metrics", TCP, 9100),)), ports=(HTTP, metrics))
    table = ServiceTable.build([svc], PODS)
    assert table.lookup(n(VIP), TCP, 80).choose == ((n(P1), 8080),)  # type: ignore[union-attr]
    assert table.lookup(n(VIP), TCP, 9100).choose == ((n(P2), 9100),)  # type: ignore[union-attr]


def test_not_ready_endpoints_get_no_new_flow_and_terminating_ones_only_as_a_last_resort():
    svc = web(
        ep(P1),
        ep(P2, ready=False, serving=False),
        ep(P3, ready=False, serving=True, terminating=True),
    )
    b = ServiceTable.build([svc], PODS).lookup(n(VIP), TCP, 80)
    assert b is not None and b.choose == ((n(P1), 8080),)
    assert b.keep == {(n(P1), 8080), (n(P3), 8080)}  # a serving terminating pod finishes flows
    only_terminating = web(ep(P3, ready=False, serving=True, terminating=True))
    b = ServiceTable.build([only_terminating], PODS).lookup(n(VIP), TCP, 80)
    assert b is not None and b.choose == ((n(P3), 8080),)
    none = web(ep(P2, ready=False, serving=False, terminating=True))
    b = ServiceTable.build([none], PODS).lookup(n(VIP), TCP, 80)
    assert b is not None and b.choose == () and b.keep == frozenset()


def test_endpoints_that_are_not_project_pods_are_never_chosen_and_counted():
    table = ServiceTable.build([web(ep(P1), ep(OUTSIDER))], PODS)
    assert table.lookup(n(VIP), TCP, 80).choose == ((n(P1), 8080),)  # type: ignore[union-attr]
    assert table.unusable == 1


def test_zone_hints_narrow_the_choice_only_when_every_candidate_has_them():
    hinted = web(ep(P1, zones=("a",)), ep(P2, zones=("b",)))
    assert ServiceTable.build([hinted], PODS, zone="a").lookup(n(VIP), TCP, 80).choose == (
        (n(P1), 8080),
    )  # type: ignore[union-attr]
    assert len(ServiceTable.build([hinted], PODS, zone="c").lookup(n(VIP), TCP, 80).choose) == 2  # type: ignore[union-attr]
    assert len(ServiceTable.build([hinted], PODS).lookup(n(VIP), TCP, 80).choose) == 2  # type: ignore[union-attr]
    partly = web(ep(P1, zones=("a",)), ep(P2))
    assert len(ServiceTable.build([partly], PODS, zone="a").lookup(n(VIP), TCP, 80).choose) == 2  # type: ignore[union-attr]


def test_icmp_echo_goes_to_any_ready_endpoint_once_each():
    svc = web(ep(P1), Endpoint(P1, (Port("dns", UDP, 53),)), ep(P2, ready=False, serving=False))
    b = ServiceTable.build([svc], PODS).lookup(n(VIP), ICMP, 0)
    assert b is not None and b.choose == ((n(P1), 0),)


def test_affinity_and_headless():
    sticky = web(ep(P1), affinity=600)
    assert ServiceTable.build([sticky], PODS).lookup(n(VIP), TCP, 80).affinity == 600  # type: ignore[union-attr]
    headless = Service("db", (), (HTTP,), (ep(P1),))
    assert len(ServiceTable.build([headless], PODS)) == 0


# --- the file's form --------------------------------------------------------------------------


def test_a_format_2_file_round_trips_with_services_and_ranges():
    m = Members(
        "shop",
        7,
        PODS,
        frozenset({VIP}),
        (web(ep(P1, zones=("a",)), ep(P2, ready=False, terminating=True), affinity=10800),),
        ("172.30.0.0/16",),
        ("10.128.0.0/14",),
        "a",
    )
    text = render(m)
    assert f'"format": "{FORMAT}"' in text
    assert parse_members(text) == m
    assert render(parse_members(text)) == text


def test_a_format_2_file_carries_the_services_cluster_ips_as_members():
    text = (
        '{"format": "tencrypt-members/2", "project": "shop", "generation": 1, "pods": [],'
        ' "services": [{"name": "web", "ips": ["172.30.5.9", "fd00::9"], "ports": []},'
        ' {"name": "db", "ips": []}]}'
    )
    m = parse_members(text)
    assert m.services == {"172.30.5.9", "fd00::9"}
    assert m.service_table is not None and [s.name for s in m.service_table] == ["web", "db"]
    assert m.service_cidrs == () and m.pod_cidrs == () and m.zone is None


@pytest.mark.parametrize(
    "entry, says",
    [
        ("5", "JSON object"),
        ("{}", "'name'"),
        ('{"name": "w", "ips": "172.30.0.1"}', "'ips' must be a list"),
        ('{"name": "w", "ips": ["x"]}', "not an IP address"),
        ('{"name": "w", "ports": [{"port": 0}]}', "not in 1..65535"),
        ('{"name": "w", "ports": [{"port": 80, "protocol": "ICMP"}]}', "TCP, UDP or SCTP"),
        ('{"name": "w", "ports": [{"port": 80}, {"port": 80, "name": "b"}]}', "listed twice"),
        ('{"name": "w", "endpoints": [{"ip": "10.0.0.1", "ready": "yes"}]}', "'ready'"),
        ('{"name": "w", "endpoints": [{"ip": "10.0.0.1", "zones": [1]}]}', "'zones'"),
        ('{"name": "w", "endpoints": [{"ip": 3}]}', "not an IP address"),
        ('{"name": "w", "affinitySeconds": -1}', "affinitySeconds"),
        ('{"name": "w", "affinitySeconds": true}', "affinitySeconds"),
    ],
)
def test_malformed_service_data_is_refused_with_a_clear_message(entry, says):
    with pytest.raises(ServiceError, match=says):
        import json

        parse_service(json.loads(entry))
    text = f'{{"format": "{FORMAT}", "project": "p", "generation": 1, "services": [{entry}]}}'
    with pytest.raises(MembershipError, match=says):
        parse_members(text)


def test_two_services_of_one_name_refuse_the_file():
    text = (
        f'{{"format": "{FORMAT}", "project": "p", "generation": 1,'
        ' "services": [{"name": "w"}, {"name": "w"}]}'
    )
    with pytest.raises(MembershipError, match="listed twice"):
        parse_members(text)


names = st.text("abcdefghij-", min_size=1, max_size=8)
ports = st.builds(Port, names, st.sampled_from([TCP, UDP, SCTP]), st.integers(1, 65535))
endpoints = st.builds(
    Endpoint,
    st.ip_addresses(v=4).map(str),
    st.lists(ports, max_size=3).map(tuple),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.one_of(st.none(), st.lists(names, max_size=2).map(tuple)),
)


@given(
    names,
    st.lists(st.ip_addresses(v=4).map(str), max_size=2, unique=True).map(tuple),
    st.lists(ports, max_size=4, unique_by=lambda p: (p.protocol, p.port)).map(tuple),
    st.lists(endpoints, max_size=4).map(tuple),
    st.integers(0, 86400).map(float),
)
def test_render_parse_round_trip(name, ips, port_list, endpoint_list, affinity):
    svc = Service(name, ips, port_list, endpoint_list, affinity)
    assert parse_service(render_service(svc)) == svc
