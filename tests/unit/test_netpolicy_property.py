"""Reduce-then-evaluate (``agent/netpol.py`` then ``core/netpolicy.py``) against a reference
written straight from the Kubernetes NetworkPolicy rules over the raw objects, in random small
worlds: pods with labels, addresses and named ports in the project and in another namespace,
namespaces with labels, policies with random selectors, peers, ports and policyTypes.

- Exact on the tunnel's domain: for a flow between two of the project's pods, the verdict is
  the reference's, an allow names a (policy, rule) the reference says allows it, a denial
  names exactly the isolating policies.
- Never wider elsewhere: for a peer that is not one of the project's pods (another
  namespace's pod, an outside address) an allow implies the reference's.
- Corruption never widens: making one policy malformed never allows a flow the intact world
  did not allow.

The reference is meant to be read against
https://kubernetes.io/docs/concepts/services-networking/network-policies/ line by line; it
shares no code with the product.
"""

from __future__ import annotations

import copy
import ipaddress

from hypothesis import given, settings
from hypothesis import strategies as st

from tencrypt.agent.netpol import World
from tencrypt.core.netpolicy import Why, parse_netpol, render_netpol

PROJECT, OTHER = "shop", "other"
PROTO = {"TCP": 6, "UDP": 17, "SCTP": 132}
FLOW_PROTOS = (6, 17, 132, 1)  # TCP, UDP, SCTP, ICMP
FLOW_PORTS = (53, 80, 81, 8080, 9090)
# every flow between two addresses is asked: both directions, each protocol, each port
FLOWS = [
    (d, proto, port) for d in ("Ingress", "Egress") for proto in FLOW_PROTOS for port in FLOW_PORTS
]

# -- the reference: Kubernetes' rules over the raw objects -----------------------------------


def selects(selector: dict, labels: dict) -> bool:
    """metav1.LabelSelector: all requirements hold; an empty selector selects everything."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and not (key in labels and labels[key] in values):
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def policy_types(spec: dict) -> set[str]:
    """Absent policyTypes: Ingress, and Egress if there is any egress rule."""
    if spec.get("policyTypes"):
        return set(spec["policyTypes"])
    return {"Ingress", "Egress"} if spec.get("egress") else {"Ingress"}


def labels_of(obj: dict) -> dict:
    return obj["metadata"].get("labels") or {}


def ips_of(pod: dict) -> list[str]:
    return [e["ip"] for e in pod["status"].get("podIPs", [])]


def reference(world: dict, target: dict, direction: str, peer: str, proto: int, port: int):
    """(allowed, the (policy, rule) that allow it, the policies isolating the direction)."""
    if peer in ips_of(target):
        return True, set(), []  # a pod cannot block access to itself
    ns = target["metadata"]["namespace"]
    applying = [
        p
        for p in world["policies"]
        if p["metadata"]["namespace"] == ns
        and selects(p["spec"]["podSelector"], labels_of(target))
        and direction in policy_types(p["spec"])
    ]
    if not applying:
        return True, set(), []
    destination = target if direction == "Ingress" else pod_at(world, peer)
    allowing = set()
    for p in applying:
        key, peers_key = ("ingress", "from") if direction == "Ingress" else ("egress", "to")
        for index, rule in enumerate(p["spec"].get(key) or []):
            if peer_matches(world, p, rule.get(peers_key), peer) and port_matches(
                rule.get("ports"), proto, port, destination
            ):
                allowing.add((p["metadata"]["name"], index))
    return bool(allowing), allowing, sorted(p["metadata"]["name"] for p in applying)


def pod_at(world: dict, ip: str) -> dict | None:
    return next((p for p in world["pods"] if ip in ips_of(p)), None)


def peer_matches(world: dict, policy: dict, peers, ip: str) -> bool:
    if not peers:
        return True  # empty or missing: every source/destination
    pod = pod_at(world, ip)
    for peer in peers:
        if "ipBlock" in peer:
            addr, block = ipaddress.ip_address(ip), peer["ipBlock"]
            if addr in ipaddress.ip_network(block["cidr"]) and not any(
                addr in ipaddress.ip_network(e) for e in block.get("except", [])
            ):
                return True
        elif pod is not None:
            pod_ns = pod["metadata"]["namespace"]
            if "namespaceSelector" in peer:
                ns_ok = selects(peer["namespaceSelector"], world["namespaces"][pod_ns])
            else:
                ns_ok = pod_ns == policy["metadata"]["namespace"]
            pod_ok = selects(peer.get("podSelector", {}), labels_of(pod))
            if ns_ok and pod_ok:
                return True
    return False


def port_matches(ports, proto: int, port: int, destination: dict | None) -> bool:
    if not ports:
        return True  # empty or missing: every port
    for entry in ports:
        protocol = entry.get("protocol", "TCP")
        if PROTO[protocol] != proto:
            continue
        if "port" not in entry:
            return True
        wanted = entry["port"]
        if isinstance(wanted, int):
            if wanted <= port <= entry.get("endPort", wanted):
                return True
        elif destination is not None:
            for container in destination["spec"]["containers"]:
                for cp in container.get("ports", []):
                    if (cp.get("name"), cp.get("protocol", "TCP"), cp["containerPort"]) == (
                        wanted,
                        protocol,
                        port,
                    ):
                        return True
    return False


# -- random small worlds ------------------------------------------------------------------------

KEYS, VALUES = ("app", "tier"), ("a", "b")
label_maps = st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)
expressions = st.one_of(
    st.builds(
        lambda k, op, vs: {"key": k, "operator": op, "values": vs},
        st.sampled_from(KEYS),
        st.sampled_from(["In", "NotIn"]),
        st.lists(st.sampled_from(VALUES), min_size=1, max_size=2, unique=True),
    ),
    st.builds(
        lambda k, op: {"key": k, "operator": op},
        st.sampled_from(KEYS),
        st.sampled_from(["Exists", "DoesNotExist"]),
    ),
)
selectors = st.builds(
    lambda ml, me: {
        **({"matchLabels": ml} if ml else {}),
        **({"matchExpressions": me} if me else {}),
    },
    label_maps,
    st.lists(expressions, max_size=2),
)
ns_selectors = st.one_of(
    st.just({}),
    st.builds(lambda v: {"matchLabels": {"team": v}}, st.sampled_from(VALUES)),
    st.just({"matchLabels": {"kubernetes.io/metadata.name": PROJECT}}),
    st.just({"matchExpressions": [{"key": "team", "operator": "DoesNotExist"}]}),
)
blocks = st.builds(
    lambda cidr, excepts: {"cidr": cidr, **({"except": excepts} if excepts else {})},
    st.sampled_from(["10.0.0.0/29", "10.0.0.0/16", "10.1.0.0/24", "0.0.0.0/0"]),
    st.lists(st.sampled_from(["10.0.0.2/31", "10.0.0.4/32", "10.1.0.0/30"]), max_size=2),
)
peers = st.one_of(
    st.builds(lambda s: {"podSelector": s}, selectors),
    st.builds(lambda n: {"namespaceSelector": n}, ns_selectors),
    st.builds(lambda s, n: {"podSelector": s, "namespaceSelector": n}, selectors, ns_selectors),
    st.builds(lambda b: {"ipBlock": b}, blocks),
)


@st.composite
def ports(draw):
    entry = {}
    if draw(st.booleans()):
        entry["protocol"] = draw(st.sampled_from(sorted(PROTO)))
    kind = draw(st.sampled_from(["none", "number", "range", "name"]))
    if kind == "number":
        entry["port"] = draw(st.sampled_from(FLOW_PORTS))
    elif kind == "range":
        entry["port"] = draw(st.sampled_from(FLOW_PORTS))
        entry["endPort"] = entry["port"] + draw(st.sampled_from([0, 1, 8010]))
    elif kind == "name":
        entry["port"] = draw(st.sampled_from(["http", "dns", "metrics", "nope"]))
    return entry


def maybe_list(items):
    """Absent, empty (both mean "all" in a rule) or one or two items."""
    return st.one_of(st.none(), st.just([]), st.lists(items, min_size=1, max_size=2))


rules = st.builds(
    lambda peer_list, port_list, key: {
        **({key: peer_list} if peer_list is not None else {}),
        **({"ports": port_list} if port_list is not None else {}),
    },
    maybe_list(peers),
    maybe_list(ports()),
    st.just("from"),
)


def egress_rule(rule: dict) -> dict:
    return {("to" if k == "from" else k): v for k, v in rule.items()}


@st.composite
def policies(draw, index: int):
    spec: dict = {"podSelector": draw(st.one_of(st.just({}), selectors))}
    types = draw(
        st.sampled_from(
            [None, [], ["Ingress"], ["Egress"], ["Ingress", "Egress"], ["Egress", "Ingress"]]
        )
    )
    if types is not None:
        spec["policyTypes"] = types
    for key in ("ingress", "egress"):
        found = draw(maybe_list(rules))
        if found is not None:
            spec[key] = found if key == "ingress" else [egress_rule(r) for r in found]
    meta = {"name": f"p{index}", "namespace": PROJECT}
    return {"kind": "NetworkPolicy", "metadata": meta, "spec": spec}


CONTAINER_PORTS = [  # the same name on two protocols, with the same or another number
    ("http", 80, "TCP"),
    ("http", 8080, "TCP"),
    ("http", 8080, "UDP"),
    ("dns", 53, "UDP"),
    ("dns", 81, "TCP"),
    ("metrics", 9090, "TCP"),
]


@st.composite
def pods(draw, ns: str, subnet: str, count: int):
    out = []
    for i in range(count):
        chosen = draw(
            st.lists(st.sampled_from(CONTAINER_PORTS), max_size=3, unique_by=lambda p: (p[0], p[2]))
        )
        spelt = draw(st.booleans())  # TCP written out, or left to its default
        container_ports = [
            {"name": n, "containerPort": c, **({"protocol": pr} if pr != "TCP" or spelt else {})}
            for n, c, pr in chosen
        ]
        ip = f"{subnet}.{i + 1}"
        out.append(
            {
                "kind": "Pod",
                "metadata": {"name": f"{ns}-{i}", "namespace": ns, "labels": draw(label_maps)},
                "spec": {"containers": [{"name": "app", "ports": container_ports}]},
                "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
            }
        )
    return out


@st.composite
def worlds(draw):
    namespaces = {}
    for name in (PROJECT, OTHER):
        labels = {"kubernetes.io/metadata.name": name}
        if draw(st.booleans()):
            labels["team"] = draw(st.sampled_from(VALUES))
        namespaces[name] = labels
    project_pods = draw(pods(PROJECT, "10.0.0", draw(st.integers(1, 4))))
    other_pods = draw(pods(OTHER, "10.1.0", draw(st.integers(0, 2))))
    count = draw(st.sampled_from([0, 1, 1, 2, 2, 3]))
    return {
        "namespaces": namespaces,
        "pods": project_pods + other_pods,
        "policies": [draw(policies(i)) for i in range(count)],
    }


def tables(world: dict) -> dict:
    namespaces = [
        {"metadata": {"name": n, "labels": labels}} for n, labels in world["namespaces"].items()
    ]
    w = World.of(PROJECT, world["policies"], world["pods"], namespaces)
    return {name: parse_netpol(render_netpol(w.reduce(name))) for name in w.pods}


def project_ips(world: dict) -> list[str]:
    return [ip for p in world["pods"] if p["metadata"]["namespace"] == PROJECT for ip in ips_of(p)]


def decide(table, direction: str, peer: str, proto: int, port: int):
    return (table.ingress if direction == "Ingress" else table.egress)(peer, proto, port)


@settings(max_examples=800, deadline=None)
@given(worlds())
def test_between_the_projects_pods_the_verdict_is_kubernetes(world):
    by_name = tables(world)
    for target in (p for p in world["pods"] if p["metadata"]["namespace"] == PROJECT):
        t = by_name[target["metadata"]["name"]]
        for peer in project_ips(world):
            for direction, proto, port in FLOWS:
                got = decide(t, direction, peer, proto, port)
                ok, allowing, isolating = reference(world, target, direction, peer, proto, port)
                assert got.allowed is ok, (direction, peer, proto, port, got)
                if got.why is Why.RULE:
                    assert (got.policy, got.rule) in allowing
                elif got.why is Why.DENIED:
                    assert list(got.isolating) == isolating
                elif got.why is Why.UNISOLATED:
                    assert isolating == [] and not allowing


@settings(max_examples=200, deadline=None)
@given(worlds(), st.sampled_from(["10.1.0.1", "10.1.0.2", "10.0.0.200", "192.0.2.1"]))
def test_for_any_other_peer_the_verdict_is_never_wider_than_kubernetes(world, peer):
    by_name = tables(world)
    for target in (p for p in world["pods"] if p["metadata"]["namespace"] == PROJECT):
        t = by_name[target["metadata"]["name"]]
        for direction, proto, port in FLOWS:
            if decide(t, direction, peer, proto, port).allowed:
                assert reference(world, target, direction, peer, proto, port)[0]


CORRUPTIONS = [
    lambda spec: spec.update(podSelector={"matchExpressions": [{"key": "app", "operator": "Gt"}]}),
    lambda spec: spec.update(policyTypes=["Ingress", "Sideways"]),
    lambda spec: spec.update(
        ingress=[*(spec.get("ingress") or []), {"ports": [{"protocol": "ICMP"}]}]
    ),
    lambda spec: spec.update(egress=[*(spec.get("egress") or []), {"to": [{}]}]),
    lambda spec: spec.update(
        ingress=[
            *(spec.get("ingress") or []),
            {"from": [{"ipBlock": {"cidr": "10.0.0.0/8"}, "podSelector": {}}]},
        ]
    ),
    lambda spec: spec.update(unknownField=True),
]


@settings(max_examples=200, deadline=None)
@given(worlds(), st.data())
def test_corrupting_a_policy_never_allows_more(world, data):
    if not world["policies"]:
        return
    corrupt = copy.deepcopy(world)
    victim = data.draw(st.sampled_from(corrupt["policies"]))
    data.draw(st.sampled_from(CORRUPTIONS))(victim["spec"])
    before, after = tables(world), tables(corrupt)
    for name, t in after.items():
        for peer in project_ips(world):
            for direction, proto, port in FLOWS:
                if decide(t, direction, peer, proto, port).allowed:
                    assert decide(before[name], direction, peer, proto, port).allowed
