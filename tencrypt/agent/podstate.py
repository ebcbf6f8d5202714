"""What the agent knows of its node's pods, and which of them should run a proxy.

Rules:
- Input is Kubernetes JSON as the API server writes it: the Pods (of every node: the agent
  watches them all for the membership feed; a pod of another node is ignored here), every
  Namespace, and the Secrets named
  ``tencrypt`` (a watch with ``fieldSelector=metadata.name=tencrypt``, the only Secret
  requests the RBAC allows). Nothing here does I/O.
- A pod is *wanted* (it should run a proxy) while all of these hold:
  - it is scheduled on this node;
  - its namespace carries the label ``tencrypt.io/enabled=true``;
  - it does not use the host network: its network namespace would be the node's own, and
    Tencrypt must never rewrite the node's routes or resolv.conf;
  - it has a pod IP: the sandbox exists and CNI has configured eth0 (``tencrypt setup``
    needs both). ``PodInfo.ip`` is the tunnel's family's address, the one setup takes as
    primary: the IPv4 one when the pod has one (a dual-stack pod's IPv6 traffic is sealed
    inside the IPv4 tunnel), else its IPv6 one (an IPv6-only pod: the tunnel over UDP/IPv6);
  - its phase is neither ``Succeeded`` nor ``Failed`` (its sandbox is gone or going);
  - it is not opted out with the annotation ``tencrypt.io/agent: "false"`` (e.g. a pod built
    from the patched origin-pod image, which seals its own traffic).
- A pod being deleted (``deletionTimestamp`` set) stays wanted until its object is gone: its
  containers are still shutting down and talking to their peers, and that must stay sealed.
- The sandbox-PID annotation (``tencrypt.io/sandbox-pid``) is read here but trusted only when
  the agent runs with ``--sandbox annotation``: a test and lab aid, never a production path
  (anyone who may create pods could point it at the node's own PID 1).
- The project's keys are the Secret ``tencrypt``'s ``PROJECT_PSK`` (current) and the optional
  ``PROJECT_PSK_NEXT`` and ``PROJECT_PSK_PREVIOUS`` of a rotation (core/rotation.py): each the
  base64 (as every Secret value) of the 44-character base64 text ``openssl rand -base64 32``
  prints. ``parse_secret_key`` returns the ring (``KeySet``) or a ``BadKey`` whose reason
  never quotes a key.
- A malformed object is counted (``Stats.inc(Counter.AGENT_BAD_OBJECT)``) and ignored, never raised.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
from dataclasses import dataclass, field
from typing import Any

from tencrypt.core.psk import KeySet
from tencrypt.core.rotation import SECRET_KEYS, SECRET_NAME, secret_keys
from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import UsageError
from tencrypt.kube.objects import ENABLED_LABEL, EventType

SECRET_KEY = SECRET_KEYS["current"]
OPT_OUT_ANNOTATION = "tencrypt.io/agent"  # "false": the agent leaves this pod alone
SANDBOX_PID_ANNOTATION = "tencrypt.io/sandbox-pid"  # test/lab aid, see the rules above
FINISHED_PHASES = ("Succeeded", "Failed")


class AgentKind(enum.Enum):
    """What the agent's reflectors list and watch (labels for ``watch.Listed``/``Changed``)."""

    POD = "Pod"  # every Pod of the cluster: this node's for NodeView, all for membership
    NAMESPACE = "Namespace"
    SECRET = "Secret"
    SERVICE = "Service"  # membership only (agent/members.py)
    ENDPOINT_SLICE = "EndpointSlice"  # membership only: each Service's endpoints
    NETWORK_POLICY = "NetworkPolicy"  # the proxies' NetworkPolicy documents (agent/netpol.py)


@dataclass(slots=True, frozen=True)
class PodInfo:
    uid: str
    namespace: str
    name: str
    node: str
    ip: str | None
    phase: str
    host_network: bool
    opted_out: bool
    sandbox_pid: int | None  # from the annotation, if any (trusted only in annotation mode)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(slots=True, frozen=True)
class BadKey:
    reason: str  # says what is wrong, never what the key is


def parse_pod(obj: Any) -> PodInfo | None:
    """A Pod object → ``PodInfo``; None if the fields every pod has are missing."""
    if not isinstance(obj, dict):
        return None
    meta, spec, status = (obj.get(k) or {} for k in ("metadata", "spec", "status"))
    if not all(isinstance(d, dict) for d in (meta, spec, status)):
        return None
    uid, ns, name = (meta.get(k) for k in ("uid", "namespace", "name"))
    if not (
        isinstance(uid, str)
        and isinstance(ns, str)
        and isinstance(name, str)
        and uid
        and ns
        and name
    ):
        return None
    annotations = meta.get("annotations") or {}
    if not isinstance(annotations, dict):
        return None
    return PodInfo(
        uid=uid,
        namespace=ns,
        name=name,
        node=str(spec.get("nodeName") or ""),
        ip=_tunnel_pod_ip(status),
        phase=str(status.get("phase") or "Pending"),
        host_network=spec.get("hostNetwork") is True,
        opted_out=str(annotations.get(OPT_OUT_ANNOTATION, "")).lower() == "false",
        sandbox_pid=parse_pid(annotations.get(SANDBOX_PID_ANNOTATION)),
    )


def _tunnel_pod_ip(status: dict[str, Any]) -> str | None:
    """The first IPv4 address of ``podIPs`` (dual-stack pods list both) or ``podIP``, else
    the first IPv6 one (an IPv6-only pod); None when neither holds an address."""
    listed = status.get("podIPs")
    candidates = (
        [e.get("ip") for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
    )
    found: dict[int, str] = {}
    for ip in [*candidates, status.get("podIP")]:
        try:
            if isinstance(ip, str):
                found.setdefault(ipaddress.ip_address(ip).version, ip)
        except ValueError:
            continue
    return found.get(4) or found.get(6)


def parse_pid(value: Any) -> int | None:
    """A positive process id written as decimal text, else None (PID 1 is never a pod's)."""
    if not isinstance(value, str) or not value.strip().isdigit():
        return None
    pid = int(value)
    return pid if pid > 1 else None


def parse_namespace(obj: Any) -> tuple[str, bool] | None:
    """A Namespace object → (name, enabled); None if it has no name."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    if not isinstance(meta, dict):
        return None
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        return None
    labels = meta.get("labels") or {}
    return name, isinstance(labels, dict) and labels.get(ENABLED_LABEL) == "true"


def parse_secret_key(obj: Any) -> KeySet | BadKey:
    """The key ring held by Secret ``tencrypt`` (``data.PROJECT_PSK[_NEXT|_PREVIOUS]``)."""
    data = obj.get("data") if isinstance(obj, dict) else None
    try:
        return secret_keys(data if isinstance(data, dict) else None)
    except UsageError as exc:  # its message never repeats key material (core/rotation.py)
        return BadKey(str(exc))


def key_id(keys: KeySet) -> str:
    """A short name of a ring, to tell rings apart in records without storing them."""
    digest = hashlib.sha256(b"tencrypt-agent key id\0")
    for role, key in keys.roles():
        digest.update(role.encode() + b"\0" + key)
    return digest.hexdigest()[:16]


@dataclass(slots=True)
class NodeView:
    """The pods of one node and the namespaces' labels. One owner: the agent's loop."""

    node: str
    stats: Stats = field(default_factory=Stats)
    namespaces: dict[str, bool] = field(default_factory=dict)  # name -> enabled
    pods: dict[str, PodInfo] = field(default_factory=dict)  # uid -> pod
    keys: dict[str, KeySet | BadKey] = field(default_factory=dict)  # namespace -> its Secret's

    def replace(self, kind: AgentKind, items: list[Any]) -> None:
        """A fresh list of ``kind``: forget what was known of it, then add every item."""
        known: dict[AgentKind, dict[str, Any]] = {
            AgentKind.POD: self.pods,
            AgentKind.NAMESPACE: self.namespaces,
            AgentKind.SECRET: self.keys,
        }
        known[kind].clear()
        for obj in items:
            self.on_event(kind, EventType.ADDED, obj)

    def key(self, namespace: str) -> KeySet | BadKey:
        """The project key of ``namespace``'s Secret, or why there is none."""
        key = self.keys.get(namespace)
        return BadKey(f"no Secret {SECRET_NAME} in the namespace") if key is None else key

    def on_event(self, kind: AgentKind, event: EventType, obj: Any) -> None:
        if kind is AgentKind.SECRET:
            meta = obj.get("metadata") if isinstance(obj, dict) else None
            ns = meta.get("namespace") if isinstance(meta, dict) else None
            if (
                not isinstance(meta, dict)
                or not isinstance(ns, str)
                or meta.get("name") != SECRET_NAME
            ):
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            elif event is EventType.DELETED:
                self.keys.pop(ns, None)
            else:
                self.keys[ns] = parse_secret_key(obj)
            return
        if kind is AgentKind.NAMESPACE:
            parsed = parse_namespace(obj)
            if parsed is None:
                self.stats.inc(Counter.AGENT_BAD_OBJECT)
            elif event is EventType.DELETED:
                self.namespaces.pop(parsed[0], None)
            else:
                self.namespaces[parsed[0]] = parsed[1]
            return
        pod = parse_pod(obj)
        if pod is None:
            self.stats.inc(Counter.AGENT_BAD_OBJECT)
        elif event is EventType.DELETED or pod.node != self.node:
            self.pods.pop(pod.uid, None)
        else:
            self.pods[pod.uid] = pod

    def wanted(self) -> list[PodInfo]:
        """The pods that should run a proxy now, ordered by namespace and name."""
        return sorted(
            (p for p in self.pods.values() if self.is_wanted(p)),
            key=lambda p: (p.namespace, p.name, p.uid),
        )

    def is_wanted(self, pod: PodInfo) -> bool:
        return (
            pod.node == self.node
            and self.namespaces.get(pod.namespace, False)
            and not pod.host_network
            and pod.ip is not None
            and pod.phase not in FINISHED_PHASES
            and not pod.opted_out
        )
