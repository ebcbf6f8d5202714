"""Kubernetes plumbing shared by ``tencrypt node-sync`` and ``tencrypt agent``.

- ``objects`` * — what both read of an object: the watch event types and the label that
  enables a project (pure: no client import);
- ``client`` — the official client configured (in-cluster, else a kubeconfig), paged lists,
  one-line error summaries;
- ``reflector`` — list, then watch, one kind into a queue, as client-go's reflector does.

The kinds, what is folded from them and what is done with it belong to each user: the
reflector labels what it queues with the caller's own enum member.
"""
