"""The flags of `tencrypt setup`, declared once: for the command line (cli.py) and for the
node agent, which checks its --setup-args with them before it sets up any pod."""

from __future__ import annotations

import argparse

from tencrypt import argtypes
from tencrypt.core.podconfig import MIN_MTU, MIN_MTU6, OVERHEAD, OVERHEAD6


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--undo",
        action="store_true",
        help="restore the namespace exactly as it was before `setup` (routes, rules, "
        "resolv.conf, also routes setup replaced) and remove tenc0",
    )
    p.add_argument(
        "--pod-ip",
        help="this pod's IPv4 address (default: eth0's); on an IPv6-only pod its IPv6 one "
        "(default when eth0 has no IPv4: its global IPv6 address; the tunnel then runs over "
        "UDP/IPv6 and --gateway, --dns and --service-cidr are IPv6)",
    )
    p.add_argument("--dev", default="eth0", help="the pod's uplink interface (default: eth0)")
    p.add_argument(
        "--gateway", help="next hop on the uplink (default: the main table's default route)"
    )
    p.add_argument(
        "--dns", help="the cluster DNS server (default: first nameserver of resolv.conf)"
    )
    p.add_argument("--domain", help="the project's DNS domain (default: first `search` entry)")
    p.add_argument(
        "--service-cidr",
        metavar="CIDR[,CIDR6]",
        help="the cluster's Service CIDR, routed into tenc0, and on a dual-stack cluster its "
        "IPv6 one after a comma (as kube-apiserver's --service-cluster-ip-range): the IPv6 "
        "range is routed into tenc0 when eth0 has a global IPv6 address, and the pod's IPv6 "
        "packets are sealed inside the same IPv4 tunnel; neither may overlap eth0's subnet or "
        "the pod network, nor contain the pod IP or the gateway (default: those of the "
        "agent's membership file, --members-file, else 172.30.0.0/16, OpenShift's, and no "
        "IPv6 one; an IPv6-only pod needs its IPv6 range given or in that file)",
    )
    p.add_argument(
        "--pod-cidr",
        action="append",
        metavar="CIDR",
        help="the cluster's pod network: claims from outside it are refused, and an "
        "unclassified address in it may be the project's (strict mode refuses it rather "
        "than send it in the clear); repeat for several ranges (default: those of the "
        "agent's membership file, --members-file; else not known: claims are not checked "
        "against a guess, and "
        "only eth0's subnet is guarded)",
    )
    p.add_argument(
        "--members-file",
        metavar="FILE",
        help="the project's membership file its writer (the node agent, the lab) keeps for "
        "this pod: its cluster ranges are the defaults of --service-cidr and --pod-cidr, and "
        "`tencrypt run` reads it unless given another (default: none; setup never reads one "
        "from its state directory, which a dead namespace with the same inode may have left)",
    )
    p.add_argument(
        "--mtu",
        type=int,
        help=f"tenc0 MTU, from {MIN_MTU} to the uplink MTU minus {OVERHEAD} (default: the latter; "
        f"IPv6-only: from {MIN_MTU6} to the uplink MTU minus {OVERHEAD6})",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument(
        "--resolv-conf",
        metavar="FILE",
        help="resolv.conf to point at the embedded DNS proxy, rewritten in place "
        "(default: /etc/resolv.conf)",
    )
    where.add_argument(
        "--resolv-conf-of",
        metavar="PID",
        type=argtypes.positive_int,
        help="rewrite the resolv.conf that process PID sees (from outside its mount "
        "namespace); where that is a read-only bind mount, as in containerd's "
        "and CRI-O's pause container, the node's file behind it",
    )
    p.add_argument(
        "--state-dir",
        default="/run/tencrypt",
        help="where setup keeps what --undo needs (default: /run/tencrypt; per namespace, "
        "tied to the namespace's life: a dead namespace's state found under a reused inode "
        "number is removed, never used)",
    )
