"""Kubernetes objects as JSON, built from plain facts: the lab's Services as a cluster holds them.

The lab's Services are written as the Namespaces, Services and EndpointSlices a real cluster
would hold, and go through exactly the code a real node runs (``ClusterState`` → rules →
the node's backend). The shapes follow what ``kubectl get ... -o json`` prints for core/v1
and discovery.k8s.io/v1; only the fields node-sync and a reader need are filled in. The
builders only tests need (Pods, Secrets, legacy Endpoints) live in
``tests/kubefakes/builders.py``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

from tencrypt.kube.objects import ENABLED_LABEL
from tencrypt.nodesync.cluster import SERVICE_NAME_LABEL

Obj = dict[str, Any]


class LabPort(Protocol):
    """A Service port as the lab knows it (``tencrypt.lab.topology.ServicePort``)."""

    @property
    def name(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def target(self) -> int | str: ...
    @property
    def protocol(self) -> str: ...


class LabEndpoint(Protocol):
    """An endpoint: the pod's IP and its named container ports (``topology.Endpoint``)."""

    @property
    def ip(self) -> str: ...
    @property
    def ports(self) -> Mapping[str, int]: ...
    @property
    def ready(self) -> bool: ...


class LabService(Protocol):
    """What the lab knows of a Service (``tencrypt.lab.topology.Service`` fits; read-only, so
    a frozen dataclass does too). ``vip`` None: headless."""

    @property
    def name(self) -> str: ...
    @property
    def project(self) -> str: ...
    @property
    def vip(self) -> str | None: ...
    @property
    def ports(self) -> Sequence[LabPort]: ...
    @property
    def endpoints(self) -> Sequence[LabEndpoint]: ...
    @property
    def affinity(self) -> int: ...


def build_namespace(name: str, enabled: bool = True) -> Obj:
    labels = {"kubernetes.io/metadata.name": name}
    if enabled:
        labels[ENABLED_LABEL] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels, "uid": stable_uid("ns", name)},
        "spec": {"finalizers": ["kubernetes"]},
        "status": {"phase": "Active"},
    }


def build_service(
    namespace: str,
    name: str,
    vip: str | None,
    port: int = 8080,
    ports: Sequence[Obj] | None = None,
    affinity: int = 0,
) -> Obj:
    """A Service; ``vip`` None is a headless one. ``ports``: its ``spec.ports`` (default one
    TCP port ``http`` with ``targetPort`` = ``port``); ``affinity``: sessionAffinity ClientIP
    with that timeout (0: none)."""
    spec: Obj = {
        "clusterIP": vip or "None",
        "clusterIPs": [vip or "None"],
        "internalTrafficPolicy": "Cluster",
        "ipFamilies": ["IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "ports": list(ports)
        if ports is not None
        else [{"name": "http", "port": port, "protocol": "TCP", "targetPort": port}],
        "selector": {"app": name},
        "sessionAffinity": "ClientIP" if affinity else "None",
        "type": "ClusterIP",
    }
    if affinity:
        spec["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "uid": stable_uid(namespace, name)},
        "spec": spec,
        "status": {"loadBalancer": {}},
    }


def build_endpoint_slice(
    namespace: str,
    service: str,
    ips: Sequence[str],
    port: int = 8080,
    suffix: str = "",
    not_ready: Sequence[str] = (),
    ports: Sequence[Obj] | None = None,
) -> Obj:
    """An IPv4 EndpointSlice of ``service``; ``suffix`` names it (``<service>-<suffix>``).
    ``ports``: the slice's ports, as the controller resolved them for its pods (default one
    TCP port ``http`` = ``port``)."""

    def endpoint(ip: str, ready: bool) -> Obj:
        return {
            "addresses": [ip],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
            "targetRef": {
                "kind": "Pod",
                "name": f"{service}-{stable_uid('pod', ip)[:5]}",
                "namespace": namespace,
            },
        }

    name = f"{service}-{suffix or stable_uid(namespace, service)[:5]}"
    return {
        "addressType": "IPv4",
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "endpoints": [endpoint(ip, True) for ip in ips] + [endpoint(ip, False) for ip in not_ready],
        "metadata": {
            "name": name,
            "namespace": namespace,
            "generateName": f"{service}-",
            "labels": {
                SERVICE_NAME_LABEL: service,
                "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io",
            },
            "uid": stable_uid(namespace, name),
        },
        "ports": list(ports)
        if ports is not None
        else [{"name": "http", "port": port, "protocol": "TCP"}],
    }


def build_list(items: Iterable[Obj]) -> Obj:
    """The document ``kubectl get namespaces,services,endpointslices -A -o json`` prints."""
    return {
        "apiVersion": "v1",
        "items": list(items),
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def lab_objects(services: Iterable[LabService]) -> list[Obj]:
    """A labelled namespace per project, and per lab Service the Service and its
    EndpointSlices, as the EndpointSlice controller writes them: one slice per distinct set of
    resolved ports (a named ``targetPort`` may resolve differently per pod)."""
    services = list(services)
    objs = [build_namespace(p) for p in sorted({s.project for s in services})]
    for s in services:
        spec_ports = [
            {"name": p.name, "port": p.port, "protocol": p.protocol, "targetPort": p.target}
            for p in s.ports
        ]
        objs.append(build_service(s.project, s.name, s.vip, ports=spec_ports, affinity=s.affinity))
        groups: dict[tuple[tuple[str, int, str], ...], tuple[list[str], list[str]]] = {}
        for e in s.endpoints:
            resolved = tuple(
                (p.name, p.target if isinstance(p.target, int) else e.ports[p.target], p.protocol)
                for p in s.ports
                if isinstance(p.target, int) or p.target in e.ports
            )
            ready, not_ready = groups.setdefault(resolved, ([], []))
            (ready if e.ready else not_ready).append(e.ip)
        for i, (resolved, (ready, not_ready)) in enumerate(sorted(groups.items())):
            objs.append(
                build_endpoint_slice(
                    s.project,
                    s.name,
                    ready,
                    suffix=stable_uid(s.project, s.name)[:5] + (str(i) if i else ""),
                    not_ready=not_ready,
                    ports=[{"name": n, "port": t, "protocol": pr} for n, t, pr in resolved],
                )
            )
    return objs


def stable_uid(*parts: str) -> str:
    """A stable UUID-shaped id, so that built objects (and fixtures) do not change per run."""
    h = hashlib.sha256("/".join(parts).encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"
