"""Kubernetes objects for tests: the product's builders (``tencrypt.nodesync.kubeobjects``)
and those only tests need — Pods, Secrets and legacy Endpoints — in the same shapes
``kubectl get ... -o json`` prints."""

from __future__ import annotations

import base64
from collections.abc import Sequence

from tencrypt.nodesync.kubeobjects import (  # noqa: F401 - re-exported for the tests
    Obj,
    build_endpoint_slice,
    build_list,
    build_namespace,
    build_service,
    lab_objects,
    stable_uid,
)


def build_endpoints(namespace: str, service: str, ips: Sequence[str], port: int = 8080) -> Obj:
    """Legacy core/v1 Endpoints (clusters without the EndpointSlice API)."""
    return {
        "apiVersion": "v1",
        "kind": "Endpoints",
        "metadata": {
            "name": service,
            "namespace": namespace,
            "uid": stable_uid("ep", namespace, service),
        },
        "subsets": [
            {
                "addresses": [{"ip": ip} for ip in ips],
                "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
            }
        ]
        if ips
        else [],
    }


def build_pod(
    namespace: str,
    name: str,
    node: str,
    ip: str | None,
    *,
    phase: str = "Running",
    host_network: bool = False,
    annotations: dict[str, str] | None = None,
    uid: str | None = None,
) -> Obj:
    """A Pod scheduled on ``node`` (``ip`` None: its sandbox has no address yet)."""
    status: Obj = {
        "phase": phase,
        "hostIP": "192.168.200.1",
        "qosClass": "BestEffort",
        "conditions": [{"type": "Ready", "status": "True" if ip else "False"}],
    }
    if ip:
        status.update(podIP=ip, podIPs=[{"ip": ip}])
    spec: Obj = {
        "nodeName": node,
        "restartPolicy": "Always",
        "schedulerName": "default-scheduler",
        "serviceAccountName": "default",
        "containers": [
            {
                "name": "web",
                "image": "registry.example.com/web:1",
                "ports": [{"containerPort": 8080, "protocol": "TCP"}],
            }
        ],
    }
    if host_network:
        spec["hostNetwork"] = True
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app": name},
            "annotations": dict(annotations or {}),
            "uid": uid or stable_uid("pod", namespace, name),
        },
        "spec": spec,
        "status": status,
    }


def build_secret(namespace: str, values: dict[str, str], name: str = "tencrypt") -> Obj:
    """An Opaque Secret; ``values`` as ``--from-literal`` gives them (stored base64, as the
    API server returns ``data``)."""
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": stable_uid("secret", namespace, name),
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }
