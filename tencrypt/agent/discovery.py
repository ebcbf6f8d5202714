"""Where the agent reads the cluster's ranges (agent/cidrs.py, the pure half): ServiceCIDR
objects, OpenShift's cluster network configuration and the Nodes, through the official client.

Rules:
- A source the API does not serve (404: no ServiceCIDR API before Kubernetes 1.31, no
  config.openshift.io outside OpenShift) is skipped, and said once at INFO; one the agent may
  not read (403) or that fails otherwise is skipped for this round, said once per kind of
  failure at WARNING (RBAC, scripts/k8s/rbac.yaml, grants list on nodes and servicecidrs and
  get on the Network named ``cluster``).
- Nothing here raises: a discovery with every source skipped gives the flags alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from tencrypt.agent.cidrs import ClusterRanges, discover
from tencrypt.kube.client import CONNECT_TIMEOUT, LIST_TIMEOUT, NOT_FOUND, brief, list_all

log = logging.getLogger("tencrypt.agent")
TIMEOUT = (CONNECT_TIMEOUT, LIST_TIMEOUT)


class RangeSources:
    def __init__(self, api: Any) -> None:
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.said: set[str] = set()

    def discover(
        self, node: str, flag_services: Sequence[str] = (), flag_pods: Sequence[str] = ()
    ) -> ClusterRanges:
        return discover(
            node,
            flag_services,
            flag_pods,
            self._service_cidrs(),
            self._read(
                "OpenShift's Network config",
                lambda: self.custom.get_cluster_custom_object(
                    "config.openshift.io", "v1", "networks", "cluster", _request_timeout=TIMEOUT
                ),
            ),
            self._read("Nodes", lambda: list_all(self.core.list_node)[0]),
        )

    def _service_cidrs(self) -> list[Any] | None:
        for version in ("v1", "v1beta1"):
            got = self._read(
                f"ServiceCIDRs ({version})",
                self._lister("networking.k8s.io", version, "servicecidrs"),
                quiet_404=version == "v1",
            )
            if got is not None:
                return list(got.get("items") or [])
        return None

    def _lister(self, group: str, version: str, plural: str) -> Callable[[], Any]:
        def read() -> Any:
            return self.custom.list_cluster_custom_object(
                group, version, plural, _request_timeout=TIMEOUT
            )

        return read

    def _read(self, what: str, read: Callable[[], Any], quiet_404: bool = False) -> Any:
        try:
            return read()
        except ApiException as exc:
            if exc.status == NOT_FOUND:
                if not quiet_404:
                    self._once(f"{what}:404", logging.INFO, "%s: not served by this cluster", what)
                return None
            self._once(f"{what}:{exc.status}", logging.WARNING, "%s: %s", what, brief(exc))
        except Exception as exc:  # noqa: BLE001 - a discovery must never stop the agent
            self._once(f"{what}:{type(exc).__name__}", logging.WARNING, "%s: %s", what, brief(exc))
        return None

    def _once(self, key: str, level: int, fmt: str, *args: object) -> None:
        if key not in self.said:
            self.said.add(key)
            log.log(level, fmt, *args)
