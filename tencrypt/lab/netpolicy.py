"""NetworkPolicy in the lab: the CNI's enforcement on the nodes, and the agent's documents for
the proxies, both from the same Kubernetes objects (issue #23).

A real cluster's CNI (OVN-Kubernetes, Calico, ...) enforces NetworkPolicies on the packets it
forwards between pods; the node agent hands each patched pod's proxy its reduced policy
(agent/netpol.py). The lab does both from the topology's ``network_policies`` and its pods
(labels, named container ports, IPs as Kubernetes ``Pod`` objects), so an unpatched and a
patched run face the same rules.

Rules of the CNI emulation (nft table ``inet tencrypt-lab-netpol`` in every node):
1. Enforced in the node's ``forward`` hook, after kube-proxy's DNAT (so on pod IPs and target
   ports, as Kubernetes defines policies), for pod-to-pod traffic bridged on the node
   (``bridge-nf-call-iptables=1``) and routed across nodes alike. Traffic to and from the
   node itself is never policed ("traffic to and from the node where a Pod is running is
   always allowed").
2. Replies (conntrack's reply direction) and related ICMP errors pass: a policy is about
   who may open a connection. Every packet of a connection's opening direction is checked
   against the rules in force, so a rule that is removed ends the connections it allowed
   (OVN-Kubernetes re-evaluates established connections after an ACL change the same way).
3. A pod's egress is checked on the node it runs on, its ingress on the node it runs on; a
   direction no policy isolates has no chain. The chains come from each pod's
   ``tencrypt-netpol/1`` document (agent/netpol.py's reduction, the proxies' input): the
   pod's own addresses, then each rule as ``return`` (allowed, go on to the other end's
   check), then a counted ``drop``. Every IP family the lab's pods have is emulated (``ip``
   and ``ip6`` matches, a pod's every address in its chains); an address, ``ipBlock`` or
   named-port destination of a family the pods do not have matches nothing, as in a cluster
   without that family.
4. The tunnel's UDP 1337 between patched pods is an ordinary flow here: a policy that does
   not admit it drops the tunnel, as a real CNI would.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tencrypt.agent.netpol import World, sorted_ips
from tencrypt.errors import SetupError
from tencrypt.lab.topology import Pod
from tencrypt.linux import netns
from tencrypt.nodesync.kubeobjects import build_namespace, stable_uid

if TYPE_CHECKING:
    from tencrypt.lab.view import LabView as Lab

TABLE = "tencrypt-lab-netpol"
Doc = dict[str, Any]


def pod_object(pod: Pod) -> dict[str, Any]:
    """``pod`` as the API server has it: labels, named container ports, phase and IPs."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": pod.name,
            "namespace": pod.project,
            "uid": stable_uid("pod", pod.project, pod.name),
            "labels": dict(pod.labels),
        },
        "spec": {
            "nodeName": pod.node,
            "containers": [
                {
                    "name": "web",
                    "ports": [
                        {"name": name, "containerPort": port, "protocol": "TCP"}
                        for name, port in sorted(pod.ports.items())
                    ],
                }
            ],
        },
        "status": {
            "phase": "Running",
            "podIP": pod.ip,
            "podIPs": [{"ip": ip} for ip in pod.ips or [pod.ip]],
        },
    }


def world(lab: Lab, project: str) -> World:
    """The project's pods, policies and namespace, parsed as the agent parses them."""
    return World.of(
        project,
        lab.topology.network_policies,
        [pod_object(p) for p in lab.pods.values() if p.project == project],
        [build_namespace(project)],
    )


def documents(lab: Lab) -> dict[str, Doc]:
    """Every pod's ``tencrypt-netpol/1`` document, by pod name."""
    out: dict[str, Doc] = {}
    for project in lab.projects:
        w = world(lab, project)
        for pod in lab.pods.values():
            if pod.project == project:
                out[pod.name] = w.reduce(pod.name)
    return out


def tunnel_blocked(lab: Lab, project: str) -> dict[str, list[tuple[str, str]]]:
    """Per pod of ``project``: (direction, policy) under which the CNI drops the tunnel."""
    out: dict[str, list[tuple[str, str]]] = {}
    for b in world(lab, project).tunnel_blocked():
        out.setdefault(b.pod, []).append((b.direction, b.policy))
    return out


def build_ruleset(
    pods: Iterable[Pod], docs: Mapping[str, Doc], families: tuple[int, ...] | None = None
) -> str:
    """The node's table for its ``pods`` (rule 3), replacing any previous one atomically;
    ``families``: the IP families emulated (default: those of the pods' addresses)."""
    pods = list(pods)
    fams = families or _families(pods)
    head = [f"table inet {TABLE} {{}}", f"delete table inet {TABLE}", f"table inet {TABLE} {{"]
    forward = [
        "  chain forward {",
        "    type filter hook forward priority filter + 10; policy accept;",
        "    ct direction reply accept",
        "    ct state related accept",
    ]
    chains: list[str] = []
    for pod in sorted(pods, key=lambda p: p.name):
        doc = docs.get(pod.name)
        if doc is None:
            continue
        for way, own, peer in (("egress", "saddr", "daddr"), ("ingress", "daddr", "saddr")):
            direction = doc[way]
            if not direction["isolated"]:
                continue
            chain = f"{way}_{pod.name}"
            mine = [ip for ip in pod.ips or [pod.ip] if _version(ip) in fams]
            forward += [f"    {_kw(ip)} {own} {ip} jump {chain}" for ip in mine]
            chains += [f"  chain {chain} {{", *(f"    {_kw(ip)} {peer} {ip} return" for ip in mine)]
            for rule in direction["rules"]:
                chains += [f"    {r} return" for r in _rule(rule, peer, doc, fams)]
            chains += [f'    counter drop comment "{_quote(", ".join(direction["policies"]))}"']
            chains.append("  }")
    return "\n".join([*head, *forward, "  }", *chains, "}"]) + "\n"


def _rule(rule: Doc, peer: str, doc: Doc, fams: tuple[int, ...] = (4,)) -> list[str]:
    """The nft matches of one rule: one line per (peer match, port match) pair."""
    peers = rule["peers"]
    if peers == "any":
        addr = [""]
    else:
        addr = []
        for fam in fams:
            ips = [ip for ip in peers["ips"] if _version(ip) == fam]
            if ips:
                addr.append(f"{_KW[fam]} {peer} {{ {', '.join(ips)} }} ")
        for block in peers["blocks"]:
            fam = ipaddress.ip_network(block["cidr"]).version
            if fam not in fams:
                continue
            kw = _KW[fam]
            excepts = [c for c in block["except"] if ipaddress.ip_network(c).version == fam]
            addr.append(
                f"{kw} {peer} {block['cidr']} "
                + (f"{kw} {peer} != {{ {', '.join(excepts)} }} " if excepts else "")
            )
    ports = rule["ports"]
    if ports == "any":
        if addr == [""]:
            return [f"meta nfproto ipv{fam}" for fam in fams]
        return [a.rstrip() for a in addr]
    out = []
    for p in ports:
        proto = p["protocol"].lower()
        if "name" in p:  # egress: the name resolved per destination (named_ports)
            named = doc.get("named_ports", {})
            for ip in sorted_ips(named):
                names = named[ip]
                numbers = names.get(f"{p['protocol']}/{p['name']}")
                if numbers and _version(ip) in fams and _peer_has(peers, ip):
                    listed = ", ".join(map(str, numbers))
                    out.append(
                        f"{_kw(ip)} {peer} {ip} meta l4proto {proto} th dport {{ {listed} }}"
                    )
            continue
        span = str(p["port"]) if p["port"] == p["end"] else f"{p['port']}-{p['end']}"
        out += [f"{a}meta l4proto {proto} th dport {span}" for a in addr]
    return out


_KW = {4: "ip", 6: "ip6"}  # nft's match keyword per family


def _version(ip: str) -> int:
    return ipaddress.ip_address(ip).version


def _kw(ip: str) -> str:
    return _KW[_version(ip)]


def _families(pods: Iterable[Pod]) -> tuple[int, ...]:
    found = {_version(ip) for p in pods for ip in p.ips or [p.ip]}
    return tuple(sorted(found)) or (4,)


def _peer_has(peers: Any, ip: str) -> bool:
    if peers == "any" or ip in peers["ips"]:
        return True
    addr = ipaddress.ip_address(ip)
    for block in peers["blocks"]:
        if addr in ipaddress.ip_network(block["cidr"]) and not any(
            addr in ipaddress.ip_network(c) for c in block["except"]
        ):
            return True
    return False


def _quote(text: str) -> str:
    return text.replace('"', "'")[:120]


def program(lab: Lab) -> None:
    """Rule 3 on every node of ``lab``: one ``nft -f`` transaction each."""
    docs = documents(lab)
    for node in lab.nodes.values():
        ruleset = build_ruleset([p for p in lab.pods.values() if p.node == node.name], docs)
        proc = netns.run(node.netns, ["nft", "-f", "-"], input=ruleset, check=False)
        if proc.returncode != 0:
            raise SetupError(
                f"{node.name}: nft refused the NetworkPolicy table: {proc.stderr.strip()}\n"
                + ruleset
            )


def counters(lab: Lab, node: str) -> dict[str, int]:
    """Packets each pod chain of ``node`` dropped (``ingress_nginx2``: 3), for tests."""
    proc = netns.run(
        lab.nodes[node].netns, ["nft", "-j", "list", "table", "inet", TABLE], check=False
    )
    if proc.returncode != 0:
        return {}
    out: dict[str, int] = {}
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        for expr in rule.get("expr", []):
            if "counter" in expr:
                out[rule["chain"]] = expr["counter"]["packets"]
    return out


def describe(lab: Lab) -> str:
    """One line per pod that a policy isolates, for ``tencrypt lab netpol show``."""
    lines = []
    for name, doc in sorted(documents(lab).items()):
        ways = [
            f"{way} isolated by {', '.join(doc[way]['policies'])}"
            for way in ("ingress", "egress")
            if doc[way]["isolated"]
        ]
        if ways:
            lines.append(f"{name}: {'; '.join(ways)}")
    return "\n".join(lines) or "no pod is isolated by a NetworkPolicy"
