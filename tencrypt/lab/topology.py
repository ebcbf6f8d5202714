"""What the lab builds: nodes, pods, Services and their addresses, as plain data.

Rules:
- A topology names projects, pods and Services; ``plan(lab_name, nodes)`` turns it into
  concrete ``Node``, ``Pod`` and ``Service`` records (namespaces, addresses, MTU, endpoints
  and their ports). Nothing here touches the system.
- Every name the kernel sees stays short: namespaces are ``<lab>-node<N>`` and ``<lab>-<pod>``,
  the node side of a pod's veth is ``v<pod>`` (at most 15 characters, IFNAMSIZ - 1).
- Addresses are derived, never guessed at run time: a pod's IP is ``host`` inside the pod CIDR
  of the node it lands on (default ``10 + its position``, so nginx1 is 172.17.0.11), its own
  Service's VIP the same offset inside the Service CIDR unless the topology pins one; the
  Services of ``services`` get ``100 + their position`` unless pinned.
- Every pod has a Service of its own name (kube-proxy's one-endpoint case; ports
  ``service_ports``, default ``http`` = ``port``); ``services`` adds Services as Kubernetes
  has them: several replicas behind one VIP, a ``port`` that differs from its
  ``targetPort`` (a number, or the name of a container port of each pod: ``ports``),
  several Services in front of one pod, headless ones (no VIP: DNS names the pods).
- In a one-node lab every pod lands on node1 whatever its ``node`` says; in a two-node lab the
  pods whose ``node`` is 2 land on node2. Two nodes talk over VXLAN, so pod MTUs drop to 1450
  (1430 when VXLAN runs over the IPv6 underlay of an IPv6-only lab: its outer header is 40
  bytes, not 20).
- IP families (``ip_family``), as a Kubernetes cluster has them: ``ipv4`` (the default),
  ``dual`` (every pod has an IPv4 and an IPv6 address, every Service two cluster IPs, IPv4
  first: ``ipFamilyPolicy: RequireDualStack``) or ``ipv6`` (IPv6 only, the cluster DNS on
  ``dns_ip6``). The primary family's address is ``Pod.ip`` / ``Pod.vip`` / ``Service.vip``
  (Kubernetes' ``status.podIP`` / ``spec.clusterIP``); ``ips`` / ``vips`` hold every family's,
  primary first (``status.podIPs`` / ``spec.clusterIPs``). IPv6 addresses come from ULA
  prefixes and repeat the IPv4 host number's digits, so that they read alike: nginx1 is
  172.17.0.11 and fd00:17::11, its VIP 172.30.0.11 and fd00:30::11 (host ``n`` is
  ``int(str(n), 16)`` inside the IPv6 prefix). A pinned ``vip`` is IPv4 and ``vip6`` IPv6; a
  pinned address of a family the lab does not run is ignored.

Topology JSON (``tencrypt lab up --config FILE``); every key but ``pods`` is optional and the
values shown are the defaults, but for ``pods`` and ``services``, which show the default
topology's::

    {
      "service_cidr": "172.30.0.0/16",           # Service VIPs (and the DNS address) live here
      "dns_ip": "172.30.0.2",                    # cluster DNS (dnsmasq) on every node
      "pod_cidrs": ["172.17.0.0/16", "172.18.0.0/16"],   # node1's, node2's; bridge IP = .1
      "underlay_cidr": "192.168.200.0/24",       # node eth0 <-> node eth0 (2-node lab only)
      "overlay_cidr": "10.42.0.0/24",            # vxlan0 addresses (2-node lab only)
      "vni": 42, "vxlan_port": 4789,
      "ip_family": "ipv4",                       # ipv4 | dual | ipv6
      "service_cidr6": "fd00:30::/108",          # IPv6 Service VIPs (Kubernetes: /108 at most)
      "dns_ip6": "fd00:30::2",                   # the cluster DNS's IPv6 address
      "pod_cidrs6": ["fd00:17::/64", "fd00:18::/64"],    # node1's, node2's; bridge IP = ::1
      "underlay_cidr6": "fd00:200::/64",         # node eth0 addresses (2-node ipv6 lab only)
      "overlay_cidr6": "fd00:42::/64",           # vxlan0's IPv6 addresses (2-node dual/ipv6)
      "port": 8080,                              # every pod's HTTP server (container port http)
      "pods": [
        {"name": "nginx1", "project": "myproject"},
        {"name": "nginx2", "project": "myproject", "node": 2},
        {"name": "cakephp", "project": "project2"},
        {"name": "nginx3", "project": "myproject"}
      ],
      "services": [
        {"name": "web", "project": "myproject", "pods": ["nginx2", "nginx3"],
         "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
        {"name": "db", "project": "myproject", "pods": ["nginx3"], "headless": true}
      ],
      "network_policies": []                     # networking.k8s.io/v1 NetworkPolicy objects
    }

Per pod: ``name`` (also its own Service's name; ``[a-z][a-z0-9]{0,13}``), ``project`` (a DNS
label), optional ``node`` (1 or 2, the node it prefers in a two-node lab), ``host`` (host
number inside the node's pod CIDR), ``vip``, ``vip6``, ``ports`` (named container ports, each
served by an HTTP server: default ``{"http": port}``), ``service_ports`` (its own Service's
ports) and ``labels`` (default ``{"app": <name>}``: what NetworkPolicies select).
Per Service: ``name``, ``project``, ``pods`` (its endpoints, pods of the project), ``ports``
(``name``, ``port``, ``targetPort`` number or container port name, ``protocol`` TCP or UDP;
default ``http`` 80 -> ``http``), optional ``vip``, ``vip6``, ``headless``, ``affinity`` (ClientIP
timeout in seconds) and ``not_ready`` (endpoint pods listed but not ready).
``network_policies`` are Kubernetes NetworkPolicy objects (each with ``metadata.name`` and a
``metadata.namespace`` that is a project): the nodes enforce them as a CNI would and the
patched pods' proxies get them as the agent hands them (lab/netpolicy.py).
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
VXLAN6_OVERHEAD = 70  # outer IPv6 40 + UDP 8 + VXLAN 8 + inner Ethernet 14
MAX_NODES = 2
IP_FAMILIES = {"ipv4": (4,), "dual": (4, 6), "ipv6": (6,)}  # --ip-family -> families, primary first
MAX_SERVICE_PREFIX6 = 108  # kube-apiserver refuses an IPv6 Service CIDR wider than a /108

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
    ports: dict[str, int] | None = None  # named container ports (default {"http": port})
    service_ports: list[dict[str, object]] | None = None  # its own Service's spec.ports
    labels: dict[str, str] | None = None  # the Pod's labels (default {"app": name})
    vip6: str | None = None


@dataclass(slots=True, frozen=True)
class ServiceSpec:
    name: str
    project: str
    pods: list[str] = field(default_factory=list)
    ports: list[dict[str, object]] = field(
        default_factory=lambda: [{"name": "http", "port": 80, "targetPort": "http"}]
    )
    vip: str | None = None
    headless: bool = False
    affinity: int = 0
    not_ready: list[str] = field(default_factory=list)
    vip6: str | None = None


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
    ports: dict[str, int] = field(default_factory=dict)  # named container ports it serves
    labels: dict[str, str] = field(default_factory=dict)  # what NetworkPolicies select
    ips: list[str] = field(default_factory=list)  # status.podIPs: every family's, ip first
    vips: list[str] = field(default_factory=list)  # its Service's clusterIPs, vip first

    @property
    def endpoint_fqdn(self) -> str:
        """Kubernetes endpoint-style name of the pod IP: ``<pod>.<svc>.<project>.svc...``."""
        return f"{self.name}.{self.fqdn}"

    def ip_of(self, family: int) -> str | None:
        """The pod's address of IP ``family`` (4 or 6), None if it has none."""
        return _of(self.ips or [self.ip], family)

    def vip_of(self, family: int) -> str | None:
        return _of(self.vips or [self.vip], family)


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
    pod_cidrs: list[str] = field(default_factory=list)  # every family's, pod_cidr first
    bridge_ips: list[str] = field(default_factory=list)  # br0's, bridge_ip first
    overlay_ips: list[str] = field(default_factory=list)  # vxlan0's, overlay_ip first


@dataclass(slots=True, frozen=True)
class ServicePort:
    name: str
    port: int
    target: int | str  # a number, or the name of a container port of each endpoint
    protocol: str = "TCP"


@dataclass(slots=True, frozen=True)
class Endpoint:
    pod: str
    ip: str
    ports: dict[str, int]  # the pod's named container ports
    ready: bool = True
    ips: tuple[str, ...] = ()  # every family's address of the pod, ip first (empty: just ip)

    @property
    def addresses(self) -> tuple[str, ...]:
        return self.ips or (self.ip,)

    def target(self, port: ServicePort) -> int | None:
        """The endpoint's number for ``port`` (None: it has no container port of that name)."""
        return port.target if isinstance(port.target, int) else self.ports.get(port.target)


@dataclass(slots=True, frozen=True)
class Service:
    """A Service as kube-proxy, node-sync and the agent's feed see it. ``vip`` None: headless."""

    name: str
    project: str
    vip: str | None
    ports: tuple[ServicePort, ...]
    endpoints: tuple[Endpoint, ...]
    affinity: int = 0
    vips: tuple[str, ...] = ()  # spec.clusterIPs, vip first (empty: just vip, if any)

    @property
    def fqdn(self) -> str:
        return f"{self.name}.{self.project}.svc.{CLUSTER_DOMAIN}"

    @property
    def cluster_ips(self) -> tuple[str, ...]:
        return self.vips or ((self.vip,) if self.vip else ())

    def vip_of(self, family: int) -> str | None:
        return _of(self.cluster_ips, family)


@dataclass(slots=True)
class Topology:
    pods: list[PodSpec]
    services: list[ServiceSpec] = field(default_factory=list)
    service_cidr: str = "172.30.0.0/16"
    dns_ip: str = "172.30.0.2"
    pod_cidrs: list[str] = field(default_factory=lambda: ["172.17.0.0/16", "172.18.0.0/16"])
    underlay_cidr: str = "192.168.200.0/24"
    overlay_cidr: str = "10.42.0.0/24"
    vni: int = 42
    vxlan_port: int = 4789
    port: int = 8080
    network_policies: list[dict[str, object]] = field(default_factory=list)  # k8s objects
    ip_family: str = "ipv4"
    service_cidr6: str = "fd00:30::/108"
    dns_ip6: str = "fd00:30::2"
    pod_cidrs6: list[str] = field(default_factory=lambda: ["fd00:17::/64", "fd00:18::/64"])
    underlay_cidr6: str = "fd00:200::/64"
    overlay_cidr6: str = "fd00:42::/64"

    @property
    def families(self) -> tuple[int, ...]:
        """The lab's IP families, primary first: (4,), (4, 6) or (6,)."""
        return IP_FAMILIES.get(self.ip_family, (4,))

    @property
    def primary(self) -> int:
        return self.families[0]

    @property
    def dns_ips(self) -> list[str]:
        """The cluster DNS Service's addresses, primary first (resolv.conf names the first)."""
        return [self.dns_ip if f == 4 else self.dns_ip6 for f in self.families]

    @property
    def service_cidrs(self) -> list[str]:
        return [self.service_cidr if f == 4 else self.service_cidr6 for f in self.families]

    @classmethod
    def default(cls) -> Topology:
        return cls(
            pods=[
                PodSpec("nginx1", "myproject"),
                PodSpec("nginx2", "myproject", node=2),
                PodSpec("cakephp", "project2"),
                PodSpec("nginx3", "myproject"),
            ],
            services=[
                ServiceSpec("web", "myproject", ["nginx2", "nginx3"]),
                ServiceSpec("db", "myproject", ["nginx3"], headless=True),
            ],
        )

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> Topology:
        raw_pods = data.get("pods") if isinstance(data, dict) else None
        if not isinstance(raw_pods, list):
            raise UsageError('lab topology: expected a JSON object with a list under "pods"')
        raw_services = data.get("services", [])
        if not isinstance(raw_services, list):
            raise UsageError('lab topology: "services" must be a list')
        known = {f for f in cls.__dataclass_fields__ if f not in ("pods", "services")}
        unknown = set(data) - known - {"pods", "services"}
        if unknown:
            raise UsageError(f"lab topology: unknown keys {sorted(unknown)}")
        pods = _entries(raw_pods, PodSpec, "pod")
        services = _entries(raw_services, ServiceSpec, "service")
        try:
            rest = {k: v for k, v in data.items() if k not in ("pods", "services")}
            topo = cls(pods=pods, services=services, **rest)  # type: ignore[arg-type]
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
        if self.ip_family not in IP_FAMILIES:
            raise UsageError(
                f"lab topology: ip_family {self.ip_family!r}: want one of {', '.join(IP_FAMILIES)}"
            )
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
            labels = spec.labels if spec.labels is not None else {}
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
            ):
                raise UsageError(f"lab topology: pod {spec.name!r}: labels must map text to text")
        if len(self.pod_cidrs) < MAX_NODES or len(self.pod_cidrs6) < MAX_NODES:
            raise UsageError(f"lab topology: pod_cidrs and pod_cidrs6 need {MAX_NODES} entries")
        self._check_overlaps()
        dns = set(self.dns_ips)
        for i, spec in enumerate(self.pods):
            for vip in (self._vip(spec, i, f) for f in self.families):
                if vip in vips or vip in dns:
                    raise UsageError(f"lab topology: VIP {vip} of {spec.name!r} is already taken")
                vips.add(vip)
        projects = {p.name: p.project for p in self.pods}
        for policy in self.network_policies:
            meta = policy.get("metadata") if isinstance(policy, dict) else None
            ns, name = (
                (meta.get("namespace"), meta.get("name")) if isinstance(meta, dict) else (0, 0)
            )
            if ns not in set(projects.values()) or not isinstance(name, str):
                raise UsageError(
                    "lab topology: a NetworkPolicy needs metadata.name and a metadata.namespace "
                    f"that is a project of the lab: {json.dumps(policy)[:200]}"
                )
        for j, svc in enumerate(self.services):
            if not POD_NAME_RE.match(svc.name) or svc.name in names:
                raise UsageError(f"lab topology: bad or taken Service name {svc.name!r}")
            names.add(svc.name)
            for pod in [*svc.pods, *svc.not_ready]:
                if projects.get(pod) != svc.project:
                    raise UsageError(
                        f"lab topology: Service {svc.name!r}: {pod!r} is not a pod of "
                        f"project {svc.project!r}"
                    )
            _service_ports(svc.ports, f"Service {svc.name!r}")
            if not svc.headless:
                for vip in (self._service_vip(svc, j, f) for f in self.families):
                    if vip in vips or vip in dns:
                        raise UsageError(
                            f"lab topology: VIP {vip} of {svc.name!r} is already taken"
                        )
                    vips.add(vip)

    def _check_overlaps(self) -> None:
        for family, nets in (
            (
                4,
                {
                    "service_cidr": self.service_cidr,
                    "underlay_cidr": self.underlay_cidr,
                    "overlay_cidr": self.overlay_cidr,
                    **{f"pod_cidrs[{i}]": c for i, c in enumerate(self.pod_cidrs[:MAX_NODES])},
                },
            ),
            (
                6,
                {
                    "service_cidr6": self.service_cidr6,
                    "underlay_cidr6": self.underlay_cidr6,
                    "overlay_cidr6": self.overlay_cidr6,
                    **{f"pod_cidrs6[{i}]": c for i, c in enumerate(self.pod_cidrs6[:MAX_NODES])},
                },
            ),
        ):
            parsed = [(what, _net(cidr, what, family)) for what, cidr in nets.items()]
            for i, (what, net) in enumerate(parsed):
                for other, net2 in parsed[i + 1 :]:
                    if net.overlaps(net2):  # type: ignore[arg-type]
                        raise UsageError(f"lab topology: {what} {net} overlaps {other} {net2}")
        for key, dns, cidr, family in (
            ("dns_ip", self.dns_ip, self.service_cidr, 4),
            ("dns_ip6", self.dns_ip6, self.service_cidr6, 6),
        ):
            if _address(dns, key) not in _net(cidr, "service_cidr", family):
                raise UsageError(f"lab topology: {key} {dns} is outside {cidr}")
        if _net(self.service_cidr6, "service_cidr6", 6).prefixlen < MAX_SERVICE_PREFIX6:
            raise UsageError(
                f"lab topology: service_cidr6 {self.service_cidr6} is wider than a "
                f"/{MAX_SERVICE_PREFIX6}, which Kubernetes refuses for IPv6 Services"
            )

    def _vip(self, spec: PodSpec, index: int, family: int = 4) -> str:
        return self._pick_vip(spec.vip if family == 4 else spec.vip6, 11 + index, family, spec)

    def _service_vip(self, spec: ServiceSpec, index: int, family: int = 4) -> str:
        return self._pick_vip(spec.vip if family == 4 else spec.vip6, 100 + index, family, spec)

    def _pick_vip(
        self, pinned: str | None, host: int, family: int, spec: PodSpec | ServiceSpec
    ) -> str:
        cidr = self.service_cidr if family == 4 else self.service_cidr6
        net = _net(cidr, "service_cidr" if family == 4 else "service_cidr6", family)
        vip = _address(pinned, f"vip of {spec.name!r}") if pinned else host_in(net, host)
        if vip not in net:
            raise UsageError(f"lab topology: VIP {vip} of {spec.name!r} is outside {net}")
        return str(vip)

    def plan_services(self, pods: dict[str, Pod]) -> list[Service]:
        """Every Service: each pod's own, then ``services`` (rules)."""
        out = []
        for spec in self.pods:
            pod = pods[spec.name]
            ports = spec.service_ports or [
                {"name": "http", "port": self.port, "targetPort": self.port}
            ]
            out.append(
                Service(
                    pod.name,
                    pod.project,
                    pod.vip,
                    _service_ports(ports, f"pod {pod.name!r}"),
                    (Endpoint(pod.name, pod.ip, pod.ports, ips=tuple(pod.ips)),),
                    vips=tuple(pod.vips),
                )
            )
        for j, svc in enumerate(self.services):
            endpoints = tuple(
                Endpoint(
                    n,
                    pods[n].ip,
                    pods[n].ports,
                    ready=n not in svc.not_ready,
                    ips=tuple(pods[n].ips),
                )
                for n in dict.fromkeys([*svc.pods, *svc.not_ready])
            )
            vips = (
                () if svc.headless else tuple(self._service_vip(svc, j, f) for f in self.families)
            )
            out.append(
                Service(
                    svc.name,
                    svc.project,
                    vips[0] if vips else None,
                    _service_ports(svc.ports, f"Service {svc.name!r}"),
                    endpoints,
                    svc.affinity,
                    vips,
                )
            )
        return out

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
        overhead = VXLAN6_OVERHEAD if self.primary == 6 else VXLAN_OVERHEAD
        mtu = MTU_PLAIN - overhead if nodes > 1 else MTU_PLAIN
        pods: dict[str, Pod] = {}
        for index, spec in enumerate(self.pods):
            node = planned[f"node{spec.node if spec.node <= nodes else 1}"]
            ips = []
            for family, cidr in zip(self.families, node.pod_cidrs, strict=True):
                net = _net(cidr, "pod_cidrs" if family == 4 else "pod_cidrs6", family)
                ip = host_in(net, spec.host if spec.host is not None else 11 + index)
                if ip not in net or str(ip) in node.bridge_ips or ip == net.broadcast_address:
                    raise UsageError(
                        f"lab topology: pod {spec.name!r}: {ip} is not a host of {net}"
                    )
                ips.append(str(ip))
            vips = [self._vip(spec, index, f) for f in self.families]
            pods[spec.name] = Pod(
                name=spec.name,
                project=spec.project,
                netns=f"{lab}-{spec.name}",
                ip=ips[0],
                vip=vips[0],
                node=node.name,
                mtu=mtu,
                fqdn=f"{spec.name}.{spec.project}.svc.{CLUSTER_DOMAIN}",
                port=self.port,
                prefixlen=int(node.pod_cidr.split("/")[1]),
                gateway=node.bridge_ip,
                host_if=f"v{spec.name}",
                ports=dict(spec.ports or {"http": self.port}),
                labels=dict(spec.labels if spec.labels is not None else {"app": spec.name}),
                ips=ips,
                vips=vips,
            )
        if len({ip for p in pods.values() for ip in p.ips}) != len(pods) * len(self.families):
            raise UsageError("lab topology: two pods share an IP address")
        return planned, pods

    def _node(self, lab: str, index: int, count: int) -> Node:
        nets = [
            _net(self.pod_cidrs[index - 1], "pod_cidrs", 4)
            if family == 4
            else _net(self.pod_cidrs6[index - 1], "pod_cidrs6", 6)
            for family in self.families
        ]
        node = Node(
            name=f"node{index}",
            netns=f"{lab}-node{index}",
            bridge="br0",
            pod_cidr=str(nets[0]),
            bridge_ip=str(nets[0].network_address + 1),
            pod_cidrs=[str(n) for n in nets],
            bridge_ips=[str(n.network_address + 1) for n in nets],
        )
        if count > 1:
            if self.primary == 4:
                under = _net(self.underlay_cidr, "underlay_cidr", 4)
            else:
                under = _net(self.underlay_cidr6, "underlay_cidr6", 6)
            overs = [
                _net(self.overlay_cidr, "overlay_cidr", 4)
                if family == 4
                else _net(self.overlay_cidr6, "overlay_cidr6", 6)
                for family in self.families
            ]
            node.underlay_if = "eth0"
            node.underlay_ip = f"{under.network_address + index}/{under.prefixlen}"
            node.overlay_ips = [f"{o.network_address + index}/{o.prefixlen}" for o in overs]
            node.overlay_ip = node.overlay_ips[0]
        return node


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def host_in(net: IPNetwork, host: int) -> IPAddress:
    """Host ``host`` of ``net``; in IPv6 its decimal digits read as hex, so that host 11 is
    ``...::11`` as it is ``....11`` in IPv4 (module rules)."""
    return net.network_address + (host if net.version == 4 else int(str(host), 16))


def family_of(ip: str) -> int:
    return 6 if ":" in ip else 4


def _of(addresses: list[str] | tuple[str, ...], family: int) -> str | None:
    return next((a for a in addresses if a and family_of(a) == family), None)


def _address(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError as exc:
        raise UsageError(f"lab topology: {what}: {exc}") from exc


def _net(cidr: str, what: str, family: int = 4) -> IPNetwork:
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError as exc:
        raise UsageError(f"lab topology: {what}: {exc}") from exc
    if net.version != family:
        raise UsageError(f"lab topology: {what}: {cidr} is not IPv{family}")
    return net


def _entries(raw: list[object], cls: type, what: str) -> list:  # type: ignore[type-arg]
    allowed = set(cls.__dataclass_fields__)  # type: ignore[attr-defined]
    out = []
    for entry in raw:
        if not isinstance(entry, dict) or set(entry) - allowed:
            raise UsageError(
                f"lab topology: bad {what} entry {entry!r} (keys: {', '.join(sorted(allowed))})"
            )
        try:
            out.append(cls(**entry))
        except TypeError as exc:
            raise UsageError(f"lab topology: {what} {entry!r}: {exc}") from exc
    return out


def _service_ports(ports: list[dict[str, object]], where: str) -> tuple[ServicePort, ...]:
    out = []
    for p in ports:
        name, port = p.get("name", ""), p.get("port")
        target, proto = p.get("targetPort", port), p.get("protocol", "TCP")
        if (
            not isinstance(name, str)
            or not isinstance(port, int)
            or not 0 < port < 65536
            or not isinstance(target, int | str)
            or proto not in ("TCP", "UDP")
            or set(p) - {"name", "port", "targetPort", "protocol"}
        ):
            raise UsageError(f"lab topology: {where}: bad port {p!r}")
        out.append(ServicePort(name, port, target, str(proto)))
    return tuple(out)


def pod_from_dict(data: dict[str, object]) -> Pod:
    return Pod(**data)  # type: ignore[arg-type]


def node_from_dict(data: dict[str, object]) -> Node:
    return Node(**data)  # type: ignore[arg-type]
