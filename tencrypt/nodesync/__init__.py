"""The node-side updater: Service VIPs forward the tunnel port (1337) to the pods behind them.

Stages, from the cluster to the kernel:

1. ``watch``: list, then watch, Namespaces, Services and EndpointSlices (Endpoints where the
   cluster has no EndpointSlice API) with the official ``kubernetes`` client; or, with
   ``--once --from-file``, read the JSON that ``kubectl get ... -o json`` prints.
2. ``cluster``: fold every object into ``ClusterState`` (pure) and derive the desired
   ``ServiceBackends``: each IPv4 ClusterIP of a Service in a namespace labelled
   ``tencrypt.io/enabled=true``, with its ready endpoints in a deterministic order.
3. ``rules``: turn them into one ``iptables-restore --noflush`` text for the nat table
   (pure): chain ``TENCRYPT`` → one ``TENC-SVC-*`` chain per VIP that balances like
   kube-proxy (``statistic --mode random --probability 1/n``) → one ``TENC-SEP-*`` chain per
   endpoint that DNATs udp and tcp. Chains no longer wanted are flushed and deleted in the
   same transaction.
4. ``iptables``: apply it atomically and delete the UDP conntrack entries that still point
   at endpoints the rules no longer hold (the tunnel is one long-lived UDP flow per peer
   pair: without this, a replaced pod would keep receiving it).
"""
