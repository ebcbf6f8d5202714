"""The lab: an OpenShift-like cluster of network namespaces on this machine.

One node (``--nodes 1``)::

    <lab>-nginx1        <lab>-nginx2        <lab>-cakephp          pods: eth0 172.17.0.1x/16,
     eth0 .11            eth0 .12            eth0 .13              default via 172.17.0.1,
       |                   |                   |                   resolv.conf -> 172.30.0.2,
     vnginx1             vnginx2             vcakephp              http.server :8080
    +-------------------- br0 172.17.0.1/16 ---------------------+
    | <lab>-node1: ip_forward, bridge-nf-call-iptables=1,          |
    | nat KUBE-SERVICES (VIP:8080) + TENCRYPT (VIP:1337 udp/tcp),  |
    | dnsmasq on 172.30.0.2 (svc A/PTR, pod endpoint A/PTR)        |
    +--------------------------------------------------------------+

Two nodes (``--nodes 2``): node2 has its own br0 172.18.0.1/16 (nginx2 lives there), and the
nodes are joined the OpenShift SDN way::

    <lab>-node1 eth0 192.168.200.1/24 <--veth--> <lab>-node2 eth0 192.168.200.2/24  (underlay)
    <lab>-node1 vxlan0 10.42.0.1 (VNI 42, :4789) <-> <lab>-node2 vxlan0 10.42.0.2     (overlay)
    node1: 172.18.0.0/16 via 10.42.0.2 dev vxlan0; node2: 172.17.0.0/16 via 10.42.0.1

and every pod's MTU is 1450. Both nodes carry all Service rules and a dnsmasq.

IP families (``--ip-family``, topology key ``ip_family``; topology.py has the addresses):

    ipv4 (default)  as above.
    dual            every pod also has fd00:17::1x/64 (node2's fd00:18::1x), default route
                    via the bridge's fd00:17::1; every Service also an IPv6 VIP in
                    fd00:30::/108 (ip6tables DNAT); dnsmasq answers A and AAAA, on 172.30.0.2
                    and fd00:30::2 (resolv.conf names 172.30.0.2). Two nodes: the underlay
                    and VXLAN stay IPv4, vxlan0 also has fd00:42::1/64 and carries
                    fd00:18::/64 via fd00:42::2 (MTU 1450).
    ipv6            IPv6 only: pods fd00:17::1x/64, VIPs and DNS (fd00:30::2) in
                    fd00:30::/108; two nodes: underlay eth0 fd00:200::1/64 <-> ::2/64, VXLAN
                    over IPv6 (local/remote the underlay addresses), vxlan0 fd00:42::1/64,
                    pod MTU 1430 (the outer IPv6 header costs 20 bytes more than IPv4's).

With IPv6, the nodes forward it (``net.ipv6.conf.all.forwarding=1``), bridged frames pass
ip6tables too (``bridge-nf-call-ip6tables=1``), br0 floods multicast (no snooping: nothing
answers MLD here, and neighbour discovery must reach every port), and duplicate address
detection is off in every lab namespace (``accept_dad=0`` before its links exist, ``nodad``
on every address): addresses are usable at once, and ``up`` waits until no address of a
namespace is tentative rather than sleeping. An IPv4 lab is built exactly as before.

Stages of ``up`` (each prints one line on stderr):
 1. clean whatever a previous lab of the same name left (``cleanup.sweep``);
 2. write the state (``/run/tencrypt-lab/<lab>/state.json``) and one key per project;
 3. nodes: namespace, sysctls, bridge, the Service CIDR route, the DNS address;
 4. (two nodes) the underlay veth, vxlan0 and the routes to the other node's pods;
 5. pods: namespace, veth into the bridge, address, default route, resolv.conf, web root
    (with IPv6: an address and a default route per family, then wait until no address of
    any lab namespace is tentative);
 6. Services: iptables (and ip6tables) in every node (``services``); NetworkPolicies: the
    CNI's enforcement in every node (``netpolicy``, an empty table without policies);
 7. dnsmasq in every node, an HTTP server in every pod; wait until they all listen.
If a stage fails, ``up`` removes what it built and re-raises.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from tencrypt.errors import SetupError, UsageError
from tencrypt.lab import cleanup, clusterdns, netpolicy, proxy, services, status
from tencrypt.lab.topology import Node, Pod, Service, Topology
from tencrypt.linux import netns, procs

STATE_ROOT = Path("/run/tencrypt-lab")
ETC_NETNS = Path("/etc/netns")
HTTP_PYTHON = "/usr/bin/python3"  # Debian's, as in a stock image: the pod's web server
WAIT = 20.0  # seconds for a daemon to start listening on a loaded machine


class Lab:
    def __init__(
        self, name: str = "tenc", topology: Topology | None = None, nodes: int = 1
    ) -> None:
        self.name = name
        self.topology = topology or Topology.default()
        self.nodes: dict[str, Node]
        self.pods: dict[str, Pod]
        self.nodes, self.pods = self.topology.plan(name, nodes)
        self.dns_ip: str = self.topology.dns_ips[0]  # the one resolv.conf names
        self.dns_ips: list[str] = self.topology.dns_ips
        self.service_cidr: str = self.topology.service_cidrs[0]
        self.families: tuple[int, ...] = self.topology.families
        self.state_dir = STATE_ROOT / name

    @classmethod
    def load(cls, name: str = "tenc") -> Lab:
        path = STATE_ROOT / name / "state.json"
        try:
            state = json.loads(path.read_text())
        except FileNotFoundError:
            raise UsageError(
                f"no lab named {name!r} (no {path}): start one with `tencrypt lab --name {name} up`"
            ) from None
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"unreadable lab state {path}: {exc}") from exc
        return cls(name, Topology.from_dict(state["topology"]), state["node_count"])

    # --- look-ups -------------------------------------------------------------------------

    @property
    def services(self) -> list[Service]:
        return self.topology.plan_services(self.pods)

    @property
    def services_by_name(self) -> dict[str, Service]:
        return {s.name: s for s in self.services}

    @property
    def projects(self) -> list[str]:
        return sorted({p.project for p in self.pods.values()})

    def pod(self, name: str) -> Pod:
        try:
            return self.pods[name]
        except KeyError:
            raise UsageError(
                f"lab {self.name} has no pod {name!r} (pods: {', '.join(self.pods)})"
            ) from None

    def netns_of(self, target: str) -> str:
        """The namespace of a pod or of a node (``node1``)."""
        if target in self.nodes:
            return self.nodes[target].netns
        return self.pod(target).netns

    def psk_file(self, project: str) -> Path:
        return self.state_dir / "keys" / f"{project}.psk"

    def log_file(self, what: str) -> Path:
        return self.state_dir / "logs" / f"{what}.log"

    def pid_file(self, what: str) -> Path:
        return self.state_dir / "pids" / f"{what}.pid"

    def www(self, pod: str) -> Path:
        return self.state_dir / "www" / pod

    # --- life cycle -----------------------------------------------------------------------

    def up(self) -> None:
        if self.state_dir.exists() or cleanup.lab_namespaces(self.name, self.state_dir):
            self.say("cleaning up the previous lab of this name")
            cleanup.sweep(self.name, self.state_dir, self.say)
        try:
            self.say(f"state in {self.state_dir}")
            self._write_state("building")
            self._make_keys()
            for node in self.nodes.values():
                self._build_node(node)
            if len(self.nodes) > 1:
                self._join_nodes(*self.nodes.values())
            for pod in self.pods.values():
                self._build_pod(pod)
            self._wait_addresses()
            self._program_services()
            netpolicy.program(self)
            self._start_daemons()
            self._write_state("up")
        except BaseException:
            self.say("up failed: removing what was built")
            cleanup.sweep(self.name, self.state_dir, lambda _: None)
            raise
        self.say(
            f"up: {len(self.nodes)} node(s), {len(self.pods)} pods "
            f"({', '.join(self.pods)}); try `tencrypt lab --name {self.name} status`"
        )

    def down(self) -> None:
        removed = cleanup.sweep(self.name, self.state_dir, self.say)
        self.say(
            f"down: removed {removed} things (processes, namespaces, files)"
            if removed
            else "down: nothing to remove"
        )

    def status(self) -> str:
        return status.render(self)

    def exec(
        self,
        pod: str,
        argv: list[str],
        check: bool = True,
        timeout: float = 60,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a pod's (or node's) namespace and capture its output."""
        return netns.run(self.netns_of(pod), argv, check=check, timeout=timeout, input=input)

    def patch(
        self,
        pod: str,
        strict: bool = True,
        run_args: tuple[str, ...] = (),
        members: bool = True,
        setup_args: tuple[str, ...] = (),
    ) -> None:
        proxy.patch(self, self.pod(pod), strict, run_args, members, setup_args)

    def unpatch(self, pod: str) -> None:
        proxy.unpatch(self, self.pod(pod))

    def make_blob(self, pod: str, size_mb: int) -> tuple[str, str]:
        """Put ``size_mb`` MiB of random data at ``/blob`` on ``pod``'s web server.
        Returns (URL path, sha256 hex digest)."""
        target, digest = self.www(self.pod(pod).name) / "blob", hashlib.sha256()
        tmp = target.with_name(".blob.tmp")
        with open(tmp, "wb") as out:
            for _ in range(size_mb):
                chunk = os.urandom(1 << 20)
                digest.update(chunk)
                out.write(chunk)
        tmp.replace(target)  # a download in progress keeps the old file, never half a new one
        return "/blob", digest.hexdigest()

    def say(self, text: str) -> None:
        print(f"lab {self.name}: {text}", file=sys.stderr, flush=True)

    # --- stages of up ---------------------------------------------------------------------

    def _write_state(self, phase: str) -> None:
        for sub in ("keys", "logs", "pids", "www", "dns", "netns"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        (self.state_dir / "keys").chmod(0o700)
        state = {
            "name": self.name,
            "phase": phase,
            "node_count": len(self.nodes),
            "topology": self.topology.to_dict(),
            "dns_ip": self.dns_ip,
            "nodes": {n: vars_of(v) for n, v in self.nodes.items()},
            "pods": {n: vars_of(v) for n, v in self.pods.items()},
        }
        tmp = self.state_dir / "state.json.tmp"
        tmp.write_text(json.dumps(state, indent=2) + "\n")
        tmp.replace(self.state_dir / "state.json")

    def _make_keys(self) -> None:
        for project in self.projects:
            key = base64.b64encode(os.urandom(32)) + b"\n"
            fd = os.open(self.psk_file(project), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as out:
                out.write(key)
        self.say(f"keys: one per project in {self.state_dir / 'keys'} ({', '.join(self.projects)})")

    def _netns(self, name: str) -> None:
        (self.state_dir / "netns" / name).touch()  # recorded before it exists: down finds it
        netns.create(name)
        if 6 in self.families:
            # before any link exists: links take the namespace's defaults when they appear
            sysctl(name, "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0")

    def _build_node(self, node: Node) -> None:
        self.say(
            f"{node.name}: namespace {node.netns}, bridge {node.bridge} "
            f"{node.bridge_ip}/{node.pod_cidr.split('/')[1]}, DNS {self.dns_ip}"
        )
        self._netns(node.netns)
        # No ICMP redirects: a pod reaching a VIP whose endpoint shares its bridge must keep
        # sending to the gateway, or later packets skip the node's DNAT.
        sysctl(
            node.netns,
            "net.ipv4.ip_forward=1",
            "net.ipv4.conf.all.send_redirects=0",
            "net.ipv4.conf.default.send_redirects=0",
        )
        if 6 in self.families:
            sysctl(
                node.netns,
                "net.ipv6.conf.all.forwarding=1",
                "net.ipv6.conf.all.accept_redirects=0",
                "net.ipv6.conf.default.accept_redirects=0",
            )
        if self.families == (4,):
            ip_batch(
                node.netns,
                [
                    f"link add {node.bridge} type bridge",
                    f"link set {node.bridge} up",
                    f"addr add {node.bridge_ip}/{node.pod_cidr.split('/')[1]} dev {node.bridge}",
                    # the node's own connections to a VIP need a route before nat OUTPUT
                    # rewrites them
                    f"route add {self.service_cidr} dev {node.bridge}",
                ],
            )
        else:
            ip_batch(
                node.netns,
                [
                    f"link add {node.bridge} type bridge mcast_snooping 0",
                    f"link set {node.bridge} up",
                    *(
                        f"addr add {ip}/{cidr.split('/')[1]} dev {node.bridge} nodad"
                        for ip, cidr in zip(node.bridge_ips, node.pod_cidrs, strict=True)
                    ),
                    *(f"route add {c} dev {node.bridge}" for c in self.topology.service_cidrs),
                ],
            )
        # bridged pod-to-pod frames must pass conntrack, or replies from a DNAT'ed VIP's pod
        # go straight back to the client with the pod's address and are refused
        sysctl(node.netns, "net.bridge.bridge-nf-call-iptables=1")
        if 6 in self.families:
            sysctl(node.netns, "net.bridge.bridge-nf-call-ip6tables=1")
        self._add_dns_address(node)

    def _add_dns_address(self, node: Node) -> None:
        addrs = [
            f"addr add {ip}/32 dev {{}}" if ":" not in ip else f"addr add {ip}/128 dev {{}} nodad"
            for ip in self.dns_ips
        ]
        try:
            ip_batch(
                node.netns,
                [
                    "link add dns0 type dummy",
                    "link set dns0 up",
                    *(a.format("dns0") for a in addrs),
                ],
            )
        except SetupError as exc:
            if "Unknown device type" not in str(exc):
                raise
            # kernel without the dummy driver: a /32 on lo is just as local to the node
            ip_batch(node.netns, [a.format("lo") for a in addrs])

    def _join_nodes(self, a: Node, b: Node) -> None:
        self.say(
            f"{a.name} <-> {b.name}: underlay {a.underlay_ip} - {b.underlay_ip}, vxlan0 "
            f"VNI {self.topology.vni} dstport {self.topology.vxlan_port}"
        )
        netns.sh(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                a.netns,
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                b.netns,
            ]
        )
        nodad = "" if self.families == (4,) else " nodad"
        for me, peer in ((a, b), (b, a)):
            assert me.underlay_ip and peer.underlay_ip and peer.overlay_ip and me.overlay_ip
            overlay = me.overlay_ips or [me.overlay_ip]
            ip_batch(
                me.netns,
                [
                    "link set eth0 up",
                    f"addr add {me.underlay_ip} dev eth0{nodad}",
                    # over an IPv6 underlay the kernel sizes vxlan0 for the 40-byte outer header
                    f"link add vxlan0 type vxlan id {self.topology.vni} dstport "
                    f"{self.topology.vxlan_port} local {me.underlay_ip.split('/')[0]} "
                    f"remote {peer.underlay_ip.split('/')[0]} dev eth0",
                    "link set vxlan0 up",
                    *(f"addr add {ip} dev vxlan0{nodad}" for ip in overlay),
                    *(
                        f"route add {cidr} via {via.split('/')[0]} dev vxlan0"
                        for cidr, via in zip(
                            peer.pod_cidrs or [peer.pod_cidr],
                            peer.overlay_ips or [peer.overlay_ip],
                            strict=True,
                        )
                    ),
                ],
            )

    def _build_pod(self, pod: Pod) -> None:
        node = self.nodes[pod.node]
        self.say(
            f"pod {pod.name} ({pod.project}) on {node.name}: {pod.netns} eth0 "
            f"{_addresses(pod.ips or [pod.ip], node.pod_cidrs or [node.pod_cidr])} mtu "
            f"{pod.mtu}, Service {pod.fqdn} -> {' '.join(pod.vips or [pod.vip])}"
        )
        self._netns(pod.netns)
        netns.sh(
            [
                "ip",
                "link",
                "add",
                "eth0",
                "netns",
                pod.netns,
                "type",
                "veth",
                "peer",
                "name",
                pod.host_if,
                "netns",
                node.netns,
            ]
        )
        # hairpin: a pod reaching its own Service comes back out of the port it entered by
        # (br_netfilter bridges a DNAT'ed frame whose new destination is on the same bridge)
        ip_batch(
            node.netns,
            [
                f"link set {pod.host_if} mtu {pod.mtu} master {node.bridge} up",
                f"link set {pod.host_if} type bridge_slave hairpin on",
            ],
        )
        if self.families == (4,):
            ip_batch(
                pod.netns,
                [
                    f"link set eth0 mtu {pod.mtu} up",
                    f"addr add {pod.ip}/{pod.prefixlen} dev eth0",
                    f"route add default via {pod.gateway} dev eth0",
                ],
            )
        else:
            commands = [f"link set eth0 mtu {pod.mtu} up"]
            for ip, cidr, gateway in zip(pod.ips, node.pod_cidrs, node.bridge_ips, strict=True):
                v6 = ":" in ip
                commands += [
                    f"addr add {ip}/{cidr.split('/')[1]} dev eth0{' nodad' if v6 else ''}",
                    f"route add {'::/0' if v6 else 'default'} via {gateway} dev eth0",
                ]
            ip_batch(pod.netns, commands)
        etc = ETC_NETNS / pod.netns
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text(clusterdns.build_resolv_conf(self.dns_ip, pod.project))
        www = self.www(pod.name)
        www.mkdir(parents=True, exist_ok=True)
        (www / "index.html").write_text(f"Hello from {pod.name} ({pod.project})\n")

    def _wait_addresses(self) -> None:
        """Every IPv6 address of every lab namespace usable (none tentative): with DAD off
        this holds at once; a condition, not a sleep, in case a kernel still runs DAD."""
        if 6 not in self.families:
            return
        spaces = [n.netns for n in self.nodes.values()] + [p.netns for p in self.pods.values()]

        def settled() -> bool:
            for ns in spaces:
                out = netns.run(ns, ["ip", "-6", "-o", "addr", "show", "tentative"]).stdout
                if out.strip():
                    return False
            return True

        netns.wait_for(settled, timeout=WAIT, interval=0.05, what="IPv6 addresses to be usable")

    def _program_services(self, first: bool = True) -> None:
        if first:
            self.say(
                f"Services: DNAT VIP:{self.topology.port}/tcp (KUBE-SERVICES"
                f"{', ip6tables too' if 6 in self.families else ''}) and "
                f"VIP:{services.TUNNEL_PORT} udp+tcp (TENCRYPT) on every node"
            )
        planned = self.services
        tunnel6 = services.unforwarded_vips(planned) if 6 in self.families else frozenset()
        for node in self.nodes.values():
            for family in self.families:
                services.program_kube_services(node.netns, planned, first, family, tunnel6)
            services.program_tencrypt_chain(node.netns, planned)

    def _start_daemons(self) -> None:
        self._write_hosts()
        self._extra_hosts.write_text("# records published at run time (add_dns_records)\n")
        started = [self._spawn_dnsmasq(node) for node in self.nodes.values()]
        python = HTTP_PYTHON if Path(HTTP_PYTHON).exists() else sys.executable
        servers = 0
        for pod in self.pods.values():
            by_port = {port: name for name, port in sorted(pod.ports.items(), reverse=True)}
            for port, name in sorted(by_port.items()):  # one server per port, however named
                argv = [
                    python,
                    "-I",
                    "-u",
                    "-m",
                    "http.server",
                    str(port),
                    "--bind",
                    # "::" is dual-stack: http.server clears IPV6_V6ONLY for it
                    "0.0.0.0" if self.families == (4,) else "::",
                    "--directory",
                    str(self.www(pod.name)),
                ]
                what = pod.name if port == pod.port else f"{pod.name}-{name}"
                log = self.log_file(f"{what}.http")
                proc = netns.spawn(pod.netns, argv, log=log)
                self.pid_file(f"{what}.http").write_text(f"{proc.pid}\n")
                started.append((pod.netns, "tcp", port, proc, log, f"{what} HTTP server :{port}"))
                servers += 1
        self.say(
            f"started dnsmasq on {len(self.nodes)} node(s) and {servers} HTTP "
            "servers; waiting until they listen"
        )
        for ns, proto, port, proc, log, what in started:
            wait_listening(ns, proto, port, proc, log, what)

    @property
    def _extra_hosts(self) -> Path:
        return self.state_dir / "dns" / "extra-hosts"

    def _write_hosts(self) -> None:
        hosts = self.state_dir / "dns" / "hosts"
        hosts.write_text(clusterdns.build_hosts(self.pods.values(), self.services))

    # --- what tests and the demo change in the cluster -------------------------------------

    def set_endpoints(self, service: str, pods: list[str], not_ready: Sequence[str] = ()) -> None:
        """The endpoints of ``service`` (one of the topology's ``services``) become ``pods``
        (``not_ready``: listed, not ready), as a rollout or a scale-down changes an
        EndpointSlice: every node's kube-proxy rules and tunnel forwarding, the cluster DNS
        and the membership file of every patched pod of its project follow, as kube-proxy,
        node-sync, CoreDNS and the agent would."""
        specs = self.topology.services
        index = next((i for i, s in enumerate(specs) if s.name == service), None)
        if index is None:
            raise UsageError(f"lab {self.name} has no Service {service!r} to change")
        specs[index] = dataclasses.replace(specs[index], pods=list(pods), not_ready=list(not_ready))
        self.topology.validate()
        self._program_services(first=False)
        self._write_hosts()
        self._reload_dns()
        project = specs[index].project
        for pod in self.pods.values():
            if pod.project == project and proxy.proxy_pid(self, pod):
                proxy.write_members_file(self, pod)
        self._write_state("up")
        self.say(f"Service {service}: endpoints {', '.join(pods) or 'none'}")

    def set_network_policies(self, policies: list[dict[str, object]]) -> None:
        """The project's NetworkPolicies become ``policies`` (Kubernetes objects), as
        ``kubectl apply`` and ``delete`` would: every node's CNI emulation and the
        membership file of every patched pod (its policy, as the agent reduces it) follow."""
        before = self.topology.network_policies
        self.topology.network_policies = list(policies)
        try:
            self.topology.validate()
            netpolicy.program(self)
        except BaseException:
            self.topology.network_policies = before
            raise
        for pod in self.pods.values():
            if proxy.proxy_pid(self, pod):
                proxy.write_members_file(self, pod)
        self._write_state("up")
        names = [str(p["metadata"]["name"]) for p in policies]  # type: ignore[index]
        self.say(f"NetworkPolicies: {', '.join(names) or 'none'}")

    def _spawn_dnsmasq(
        self, node: Node
    ) -> tuple[str, str, int, subprocess.Popen[bytes], Path, str]:
        cidrs = [
            *self.topology.service_cidrs,
            *(c for n in self.nodes.values() for c in n.pod_cidrs or [n.pod_cidr]),
        ]
        owners = [(ip, p.endpoint_fqdn) for p in self.pods.values() for ip in p.ips or [p.ip]]
        owners += [(ip, s.fqdn) for s in self.services if s.vip for ip in s.cluster_ips]
        argv = clusterdns.build_dnsmasq_argv(
            self.dns_ip if len(self.dns_ips) == 1 else self.dns_ips,
            [self.state_dir / "dns" / "hosts", self._extra_hosts],
            self.log_file(f"{node.name}.dnsmasq"),
            self.pid_file(f"{node.name}.dnsmasq"),
            cidrs,
            owners,
        )
        out = self.log_file(f"{node.name}.dnsmasq.out")  # its start-up errors land here
        proc = netns.spawn(node.netns, argv, log=out)
        return node.netns, "udp", 53, proc, out, f"{node.name} dnsmasq"

    # --- what tests and the demo do to the cluster's DNS ----------------------------------

    def add_dns_records(self, records: list[tuple[str, str]]) -> None:
        """Publish ``(address, name)`` records (A, or AAAA for an IPv6 address) in the cluster
        DNS, as any tenant can with a selector-less Service or an ExternalName; every node's
        dnsmasq re-reads its hosts files on SIGHUP."""
        with self._extra_hosts.open("a") as f:
            f.writelines(f"{ip} {name}\n" for ip, name in records)
        self._reload_dns()
        self.say(f"published DNS records: {', '.join(f'{n} -> {ip}' for ip, n in records)}")

    def _reload_dns(self) -> None:
        for node in self.nodes.values():
            pid = procs.read_pid(self.pid_file(f"{node.name}.dnsmasq"))
            if pid and procs.alive(pid):
                os.kill(pid, signal.SIGHUP)

    def stop_dns(self) -> None:
        """A cluster DNS outage: every node's dnsmasq stopped (``start_dns`` brings it back)."""
        for node in self.nodes.values():
            pid = procs.read_pid(self.pid_file(f"{node.name}.dnsmasq"))
            if pid:
                cleanup.stop(pid, timeout=5.0)
        self.say("cluster DNS stopped")

    def start_dns(self) -> None:
        for node in self.nodes.values():
            wait_listening(*self._spawn_dnsmasq(node))
        self.say("cluster DNS started")


def _addresses(ips: list[str], cidrs: list[str]) -> str:
    return " ".join(f"{ip}/{c.split('/')[1]}" for ip, c in zip(ips, cidrs, strict=True))


def vars_of(obj: object) -> dict[str, object]:
    return {f: getattr(obj, f) for f in obj.__dataclass_fields__}  # type: ignore[attr-defined]


def ip_batch(ns: str, commands: list[str]) -> None:
    """Run several ``ip`` commands in namespace ``ns`` with one process."""
    netns.sh(["ip", "-n", ns, "-batch", "-"], input="\n".join(commands) + "\n")


def sysctl(ns: str, *settings: str) -> None:
    netns.run(ns, ["sysctl", "-q", "-w", *settings])


def wait_listening(
    ns: str, proto: str, port: int, proc: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    """Poll until something listens on ``port`` in ``ns``; fail early if ``proc`` died."""
    flag = "-Hlnu" if proto == "udp" else "-Hlnt"

    def listening() -> bool:
        if proc.poll() is not None:
            raise SetupError(
                f"{what} exited with code {proc.returncode} before listening on "
                f"{proto} :{port}; its log ({log}):\n{cleanup.tail(log)}"
            )
        out = netns.run(ns, ["ss", flag, f"sport = :{port}"], check=False).stdout
        return bool(out.strip())

    netns.wait_for(listening, timeout=WAIT, interval=0.05, what=f"{what} on {proto} :{port}")
