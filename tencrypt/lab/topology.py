"""What the lab builds: nodes, pods, Services and their addresses, as plain data.

Rules:
- A topology names projects and pods; ``plan(lab_name, nodes)`` turns it into concrete ``Node``
  and ``Pod`` records (namespaces, addresses, MTU). Nothing here touches the system.
- Every name the kernel sees stays short: namespaces are ``<lab>-node<N>`` and ``<lab>-<pod>``,
  the node side of a pod's veth is ``v<pod>`` (at most 15 characters, IFNAMSIZ - 1).
- Addresses are derived, never guessed at run time: a pod's IP is ``host`` inside the pod CIDR
  of the node it lands on (default ``10 + its position``, so nginx1 is 172.17.0.11), its Service
  VIP is the same offset inside the Service CIDR unless the topology pins one.
- In a one-node lab every pod lands on node1 whatever its ``node`` says; in a two-node lab the
  pods whose ``node`` is 2 land on node2. Two nodes talk over VXLAN, so pod MTUs drop to 1450.

Topology JSON (``tencrypt lab up --config FILE``); every key but ``pods`` is optional and the
values shown are the defaults::

    {
      "service_cidr": "172.30.0.0/16",           # Service VIPs (and the DNS address) live here
      "dns_ip": "172.30.0.2",                    # cluster DNS (dnsmasq) on every node
      "pod_cidrs": ["172.17.0.0/16", "172.18.0.0/16"],   # node1's, node2's; bridge IP = .1
      "underlay_cidr": "192.168.200.0/24",       # node eth0 <-> node eth0 (2-node lab only)
      "overlay_cidr": "10.42.0.0/24",            # vxlan0 addresses (2-node lab only)
      "vni": 42, "vxlan_port": 4789,
      "port": 8080,                              # every pod's HTTP server and Service port
      "pods": [
        {"name": "nginx1", "project": "myproject"},
        {"name": "nginx2", "project": "myproject", "node": 2},
        {"name": "cakephp", "project": "project2", "host": 13, "vip": "172.30.0.13"}
      ]
    }

Per pod: ``name`` (also its Service name; ``[a-z][a-z0-9]{0,13}``), ``project`` (a DNS label),
optional ``node`` (1 or 2, the node it prefers in a two-node lab), ``host`` (host number inside
the node's pod CIDR) and ``vip``.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tencrypt.errors import UsageError

CLUSTER_DOMAIN = "cluster.local"
MTU_PLAIN = 1500
VXLAN_OVERHEAD = 50  # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 (RFC 7348)
MAX_NODES = 2

LAB_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,15}$")
POD_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,13}$")
PROJECT_RE = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(slots=True, frozen=True)
class PodSpec:
    name: str
    project: str
    node: int = 1
    host: int | None = None
    vip: str | None = None


@dataclass(slots=True)
class Pod:
    name: str
    project: str
    netns: str
    ip: str
    vip: str
    node: str
    mtu: int
    fqdn: str  # <svc>.<project>.svc.cluster.local, the Service name (service name = pod name)
    port: int = 8080
    prefixlen: int = 16
    gateway: str = ""  # the node bridge's IP, the pod's default route
    host_if: str = ""  # node-side end of the pod's veth pair

    @property
    def endpoint_fqdn(self) -> str:
        """Kubernetes endpoint-style name of the pod IP: ``<pod>.<svc>.<project>.svc...``."""
        return f"{self.name}.{self.fqdn}"


@dataclass(slots=True)
class Node:
    name: str
    netns: str
    bridge: str
    pod_cidr: str
    bridge_ip: str
    underlay_if: str | None = None
    underlay_ip: str | None = None  # this node's address on the underlay (2-node lab)
    overlay_ip: str | None = None  # vxlan0's address (2-node lab)


@dataclass(slots=True, frozen=True)
class Service:
    """A ClusterIP Service with one endpoint: what kube-proxy (and Tencrypt's updater) program."""

    name: str
    project: str
    vip: str
    endpoint: str
    port: int


@dataclass(slots=True)
class Topology:
    pods: list[PodSpec]
    service_cidr: str = "172.30.0.0/16"
    dns_ip: str = "172.30.0.2"
    pod_cidrs: list[str] = field(default_factory=lambda: ["172.17.0.0/16", "172.18.0.0/16"])
    underlay_cidr: str = "192.168.200.0/24"
    overlay_cidr: str = "10.42.0.0/24"
    vni: int = 42
    vxlan_port: int = 4789
    port: int = 8080

    @classmethod
    def default(cls) -> Topology:
        return cls(
            pods=[
                PodSpec("nginx1", "myproject"),
                PodSpec("nginx2", "myproject", node=2),
                PodSpec("cakephp", "project2"),
            ]
        )

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Topology:
        raw_pods = data.get("pods") if isinstance(data, dict) else None
        if not isinstance(raw_pods, list):
            raise UsageError('lab topology: expected a JSON object with a list under "pods"')
        known = {f for f in cls.__dataclass_fields__ if f != "pods"}
        unknown = set(data) - known - {"pods"}
        if unknown:
            raise UsageError(f"lab topology: unknown keys {sorted(unknown)}")
        allowed = set(PodSpec.__dataclass_fields__)
        for entry in raw_pods:
            if not isinstance(entry, dict) or set(entry) - allowed:
                raise UsageError(
                    f"lab topology: bad pod entry {entry!r} (keys: {', '.join(sorted(allowed))})"
                )
        try:
            pods = [PodSpec(**p) for p in raw_pods]
            topo = cls(pods=pods, **{k: v for k, v in data.items() if k != "pods"})  # type: ignore[arg-type]
        except TypeError as exc:
            raise UsageError(f"lab topology: {exc}") from exc
        topo.validate()
        return topo

    @classmethod
    def from_file(cls, path: str | Path) -> Topology:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except OSError as exc:
            raise UsageError(f"lab topology: cannot read {path}: {exc.strerror}") from exc
        except json.JSONDecodeError as exc:
            raise UsageError(f"lab topology: {path} is not valid JSON: {exc}") from exc

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def validate(self) -> None:
        names, vips = set(), set()
        for spec in self.pods:
            if not POD_NAME_RE.match(spec.name) or re.match(r"^node\d+$", spec.name):
                raise UsageError(
                    f"lab topology: bad pod name {spec.name!r} (want "
                    "[a-z][a-z0-9]{0,13}, not node<N>)"
                )
            if not PROJECT_RE.match(spec.project):
                raise UsageError(f"lab topology: bad project name {spec.project!r}")
            if spec.name in names:
                raise UsageError(f"lab topology: pod {spec.name!r} declared twice")
            if not 1 <= spec.node <= MAX_NODES:
                raise UsageError(f"lab topology: pod {spec.name!r}: node must be 1..{MAX_NODES}")
            names.add(spec.name)
        if len(self.pod_cidrs) < MAX_NODES:
            raise UsageError(f"lab topology: pod_cidrs needs {MAX_NODES} entries")
        self._check_overlaps()
        for i, spec in enumerate(self.pods):
            vip = self._vip(spec, i)
            if vip in vips or vip == self.dns_ip:
                raise UsageError(f"lab topology: VIP {vip} of {spec.name!r} is already taken")
            vips.add(vip)

    def _check_overlaps(self) -> None:
        nets = {
            "service_cidr": self.service_cidr,
            "underlay_cidr": self.underlay_cidr,
            "overlay_cidr": self.overlay_cidr,
            **{f"pod_cidrs[{i}]": c for i, c in enumerate(self.pod_cidrs[:MAX_NODES])},
        }
        parsed = [(what, _net(cidr, what)) for what, cidr in nets.items()]
        for i, (what, net) in enumerate(parsed):
            for other, net2 in parsed[i + 1 :]:
                if net.overlaps(net2):
                    raise UsageError(f"lab topology: {what} {net} overlaps {other} {net2}")
        if ipaddress.ip_address(self.dns_ip) not in _net(self.service_cidr, "service_cidr"):
            raise UsageError(f"lab topology: dns_ip {self.dns_ip} is outside {self.service_cidr}")

    def _vip(self, spec: PodSpec, index: int) -> str:
        net = _net(self.service_cidr, "service_cidr")
        vip = ipaddress.ip_address(spec.vip) if spec.vip else net.network_address + 11 + index
        if vip not in net:
            raise UsageError(f"lab topology: VIP {vip} of {spec.name!r} is outside {net}")
        return str(vip)

    def services(self, pods: dict[str, Pod]) -> list[Service]:
        return [Service(p.name, p.project, p.vip, p.ip, p.port) for p in pods.values()]

    def plan(self, lab: str, nodes: int) -> tuple[dict[str, Node], dict[str, Pod]]:
        """The concrete nodes and pods of lab ``lab`` with ``nodes`` nodes (1 or 2)."""
        if not LAB_NAME_RE.match(lab):
            raise UsageError(
                f"bad lab name {lab!r}: want [a-z][a-z0-9]{{0,15}} (no dashes: it "
                "prefixes every namespace, <name>-node1, <name>-<pod>)"
            )
        if not 1 <= nodes <= MAX_NODES:
            raise UsageError(f"a lab has 1 to {MAX_NODES} nodes, not {nodes}")
        self.validate()
        planned = {n.name: n for n in (self._node(lab, i, nodes) for i in range(1, nodes + 1))}
        mtu = MTU_PLAIN - VXLAN_OVERHEAD if nodes > 1 else MTU_PLAIN
        pods: dict[str, Pod] = {}
        for index, spec in enumerate(self.pods):
            node = planned[f"node{spec.node if spec.node <= nodes else 1}"]
            net = _net(node.pod_cidr, "pod_cidrs")
            ip = net.network_address + (spec.host if spec.host is not None else 11 + index)
            if ip not in net or str(ip) == node.bridge_ip or ip == net.broadcast_address:
                raise UsageError(f"lab topology: pod {spec.name!r}: {ip} is not a host of {net}")
            pods[spec.name] = Pod(
                name=spec.name,
                project=spec.project,
                netns=f"{lab}-{spec.name}",
                ip=str(ip),
                vip=self._vip(spec, index),
                node=node.name,
                mtu=mtu,
                fqdn=f"{spec.name}.{spec.project}.svc.{CLUSTER_DOMAIN}",
                port=self.port,
                prefixlen=net.prefixlen,
                gateway=node.bridge_ip,
                host_if=f"v{spec.name}",
            )
        if len({p.ip for p in pods.values()}) != len(pods):
            raise UsageError("lab topology: two pods share an IP address")
        return planned, pods

    def _node(self, lab: str, index: int, count: int) -> Node:
        net = _net(self.pod_cidrs[index - 1], "pod_cidrs")
        node = Node(
            name=f"node{index}",
            netns=f"{lab}-node{index}",
            bridge="br0",
            pod_cidr=str(net),
            bridge_ip=str(net.network_address + 1),
        )
        if count > 1:
            under = _net(self.underlay_cidr, "underlay_cidr")
            over = _net(self.overlay_cidr, "overlay_cidr")
            node.underlay_if = "eth0"
            node.underlay_ip = f"{under.network_address + index}/{under.prefixlen}"
            node.overlay_ip = f"{over.network_address + index}/{over.prefixlen}"
        return node


def _net(cidr: str, what: str) -> ipaddress.IPv4Network:
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise UsageError(f"lab topology: {what}: {exc}") from exc
    if not isinstance(net, ipaddress.IPv4Network):
        raise UsageError(f"lab topology: {what}: {cidr} is not IPv4")
    return net


def pod_from_dict(data: dict[str, object]) -> Pod:
    return Pod(**data)  # type: ignore[arg-type]


def node_from_dict(data: dict[str, object]) -> Node:
    return Node(**data)  # type: ignore[arg-type]
