"""``tencrypt agent``: the node daemon that runs the proxy in every enabled pod of its node.

Stages, from the cluster to the pods (pure modules marked *):

1. ``agent`` — list+watch every Pod, Namespace and Service and the Secrets named
   ``tencrypt`` (``tencrypt.kube``'s reflectors); the loop that owns everything below;
2. ``podstate`` * — which pods are wanted (enabled namespace, pod network, running) and the
   project key out of its Secret;
3. ``sandbox`` * / ``resolver`` — each pod's sandbox: a PID in its network namespace, from
   the CRI (crictl), a /proc cgroup scan, or (lab and tests only) an annotation;
4. ``reconcile`` * — wanted vs. running proxies → START / KILL / STOP, restarts with backoff;
5. ``supervisor`` — ``tencrypt-nsenter.sh`` launched detached per pod, logs, records and key
   files (0600 in 0700) under the state directory; SIGTERM and ``--undo`` to stop.
6. ``members`` * / ``feed`` — each project's members (pod IPs cluster-wide, Service IPs) and
   the ``members.json`` each patched pod's proxy reads (in the agent's directory for the pod's
   UID, handed to setup and run as ``--members-file``), written before it starts and on
   every change of its project.

``cli`` holds the flags and the entry point (``tencrypt.agent.cli:main``).
"""
