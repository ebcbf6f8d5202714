"""`tencrypt demo`: the original demo of the 2018 report, redone end to end on a fresh lab.

Stages (each prints one line; the verdict lists every check):
 1. build a fresh one-node lab (pods nginx1, nginx2, nginx3 of myproject; cakephp of
    project2), dual-stack unless ``--ip-family`` says ipv4 (with IPv6, every check that looks
    at the bridge covers the pods' and Services' IPv6 addresses too; curl by name prefers the
    AAAA answer, as most applications do);
 2. clear: curl nginx1 -> http://nginx2:8080/ by name with a marker header, capturing on the node's
    bridge: it works and the capture shows the marker (this is what an eavesdropper gets today);
 3. patch nginx1 and nginx2 (the nsenter launcher: setup + proxy, strict mode);
 4. sealed: the same curl works; the capture holds no trace of the marker and nothing but UDP
    :1337 between the two pods;
 4b. (dual stack) the same curl forced over IPv6 (-6) and over IPv4 (-4): both sealed;
 5. cross-project: cakephp -> nginx2.myproject still works, in the clear (marker visible);
 6. a tenant's alias: project2 publishes a name for nginx2's VIP (as any tenant can, with a
    selector-less Service) and nginx1 resolves it; the same curl still works and the capture
    still shows only UDP :1337 between the pods (fail closed, DESIGN §1a);
 7. two replicas: nginx3 patched too; ten curls to Service ``web`` (nginx2 and nginx3, port
    80 -> targetPort http), each connection resolved to one replica by nginx1's proxy: both
    answer, and the bridge carries only UDP :1337 between the pods;
 8. clean up (unless --keep) and print the verdict; exit 0 only if every check passed.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from dataclasses import dataclass

from tencrypt.core import TUNNEL_PORT
from tencrypt.lab.capture import Capture, Frame
from tencrypt.lab.cluster import Lab
from tencrypt.lab.topology import Topology


@dataclass(slots=True)
class Check:
    what: str
    ok: bool
    detail: str


def say(text: str) -> None:
    print(f"demo: {text}", file=sys.stderr, flush=True)


def curl(lab: Lab, pod: str, url: str, marker: str, *flags: str) -> tuple[bool, str]:
    proc = lab.exec(
        pod,
        ["curl", "-sS", "--max-time", "15", *flags, "-H", f"X-Demo-Marker: {marker}", url],
        check=False,
        timeout=30,
    )
    return proc.returncode == 0, (proc.stdout.strip() or proc.stderr.strip())[:80]


def between(frames: list[Frame], a: set[str], b: set[str]) -> list[Frame]:
    return [f for f in frames if (f.src in a and f.dst in b) or (f.src in b and f.dst in a)]


def observe(lab: Lab, client: str, url: str, *flags: str) -> tuple[bool, str, list[Frame], str]:
    marker = f"tencrypt-demo-{secrets.token_hex(6)}"
    node = lab.nodes[lab.pod(client).node]
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        ok, body = curl(lab, client, url, marker, *flags)
        frames = cap.stop()
    return ok, body, frames, marker


def seen(frames: list[Frame], marker: str) -> bool:
    return any(marker.encode() in f.raw for f in frames)


def run_demo(lab: Lab) -> list[Check]:
    checks: list[Check] = []
    n1, n2 = lab.pod("nginx1"), lab.pod("nginx2")
    pair = ({n1.ip, n1.vip, *n1.ips, *n1.vips}, {n2.ip, n2.vip, *n2.ips, *n2.vips})

    say("stage 2: nginx1 -> http://nginx2:8080/ in the clear, capturing on the bridge")
    ok, body, frames, marker = observe(lab, "nginx1", "http://nginx2:8080/")
    checks.append(Check("unpatched: curl nginx1 -> nginx2 works", ok, body))
    checks.append(
        Check(
            "unpatched: an eavesdropper on the bridge reads the HTTP request",
            seen(frames, marker),
            f"{len(frames)} frames captured",
        )
    )

    say("stage 3: patching nginx1 and nginx2 (tencrypt setup + tencrypt run, strict)")
    lab.patch("nginx1")
    lab.patch("nginx2")

    say("stage 4: the same curl, sealed")
    ok, body, frames, marker = observe(lab, "nginx1", "http://nginx2:8080/")
    talk = between(frames, *pair)
    plain = [f for f in talk if not (f.proto == 17 and TUNNEL_PORT in (f.sport, f.dport))]
    checks.append(Check("patched: curl nginx1 -> nginx2 still works", ok, body))
    checks.append(
        Check(
            "patched: no trace of the HTTP request on the bridge",
            not seen(frames, marker) and len(talk) > 0,
            f"{len(talk)} frames between the pods",
        )
    )
    checks.append(
        Check(
            f"patched: nothing but UDP :{TUNNEL_PORT} between the pods",
            not plain and len(talk) > 0,
            f"{len(plain)} other frames",
        )
    )
    if 6 in lab.topology.families and 4 in lab.topology.families:
        checks += both_families(lab, pair)

    say("stage 5: cakephp (project2) -> nginx2.myproject, cross-project")
    ok, body, frames, marker = observe(lab, "cakephp", "http://nginx2.myproject:8080/")
    checks.append(Check("cross-project: cakephp -> nginx2 works", ok, body))
    checks.append(
        Check(
            "cross-project: stays plaintext (untouched)",
            seen(frames, marker),
            f"{len(frames)} frames captured",
        )
    )

    say("stage 6: project2 publishes an alias for nginx2's VIP; nginx1 resolves it")
    alias = "nginx2-alias.project2.svc.cluster.local"
    lab.add_dns_records([(n2.vip, alias)])
    resolved = lab.exec("nginx1", ["getent", "hosts", alias], check=False).stdout.split()
    ok, body, frames, marker = observe(lab, "nginx1", "http://nginx2:8080/")
    talk = between(frames, *pair)
    plain = [f for f in talk if not (f.proto == 17 and TUNNEL_PORT in (f.sport, f.dport))]
    checks.append(
        Check(
            "tenant alias: resolved to our VIP through the proxy",
            n2.vip in resolved,
            " ".join(resolved) or "no answer",
        )
    )
    checks.append(
        Check(
            "tenant alias: curl nginx1 -> nginx2 still sealed, only UDP :"
            f"{TUNNEL_PORT} on the bridge",
            ok and not seen(frames, marker) and not plain and len(talk) > 0,
            f"{len(talk)} frames between the pods, {len(plain)} other",
        )
    )
    checks += two_replicas(lab)
    return checks


def both_families(lab: Lab, pair: tuple[set[str], set[str]]) -> list[Check]:
    """Stage 4b, dual-stack: the same curl forced over each family (curl -4, curl -6), each
    sealed: the request never on the bridge, only UDP :1337 between the pods (the tunnel
    carries both families inside one IPv4 session)."""
    checks = []
    for flag, family in (("-6", "IPv6"), ("-4", "IPv4")):
        say(f"stage 4b: the same curl over {family} only ({flag})")
        ok, body, frames, marker = observe(
            lab, "nginx1", "http://nginx2:8080/", flag, "-w", " via %{remote_ip}"
        )
        talk = between(frames, *pair)
        plain = [f for f in talk if not (f.proto == 17 and TUNNEL_PORT in (f.sport, f.dport))]
        checks.append(
            Check(
                f"dual stack: curl {flag} nginx1 -> nginx2 sealed, only UDP :{TUNNEL_PORT}",
                ok and not seen(frames, marker) and not plain and len(talk) > 0,
                body.rpartition("via ")[2] if ok else body,
            )
        )
    return checks


def two_replicas(lab: Lab) -> list[Check]:
    """Stage 7: Service ``web`` (nginx2 and nginx3, port 80 -> targetPort http): ten new
    connections from nginx1, each resolved to one replica by nginx1's proxy, as kube-proxy
    would; both replicas answer, and the bridge carries nothing but UDP :1337 between them."""
    say("stage 7: patching nginx3; ten curls nginx1 -> http://web/ (two replicas, port 80)")
    lab.patch("nginx3")
    web = lab.services_by_name["web"]
    project = {ip for p in lab.pods.values() if p.project == "myproject" for ip in p.ips or [p.ip]}
    project |= {web.vip or "", *web.cluster_ips}
    marker = f"tencrypt-demo-{secrets.token_hex(6)}"
    node = lab.nodes[lab.pod("nginx1").node]
    answered: list[str] = []
    with Capture(node.netns, node.bridge, "not port 53") as cap:
        for _ in range(10):
            ok, body = curl(lab, "nginx1", "http://web/", marker)
            answered.append(body.split()[2] if ok and body.startswith("Hello from") else "-")
        frames = cap.stop()
    talk = [f for f in frames if f.src in project and f.dst in project]
    plain = [f for f in talk if not (f.proto == 17 and TUNNEL_PORT in (f.sport, f.dport))]
    counts = {name: answered.count(name) for name in sorted(set(answered))}
    return [
        Check(
            "two replicas: ten curls nginx1 -> web answered by both",
            "-" not in counts and {"nginx2", "nginx3"} <= set(counts),
            ", ".join(f"{k} {v}" for k, v in counts.items()),
        ),
        Check(
            f"two replicas: no trace of the requests, only UDP :{TUNNEL_PORT} on the bridge",
            not seen(frames, marker) and not plain and len(talk) > 0,
            f"{len(talk)} frames between the pods, {len(plain)} other",
        ),
    ]


def main(args: argparse.Namespace) -> int:
    topology = Topology.default()
    topology.ip_family = getattr(args, "ip_family", None) or "dual"
    lab = Lab(args.name, topology)
    say(f"stage 1: building a fresh lab '{args.name}' ({topology.ip_family})")
    try:
        lab.up()
        checks = run_demo(lab)
    finally:
        if not args.keep:
            say("stage 8: removing the lab")
            lab.down()
    width = max(len(c.what) for c in checks)
    print("\nTencrypt demo — verdict")
    for c in checks:
        print(f"  {'PASS' if c.ok else 'FAIL'}  {c.what:<{width}}  ({c.detail})")
    passed = all(c.ok for c in checks)
    print(
        f"\n{'PASS' if passed else 'FAIL'}: {sum(c.ok for c in checks)} of {len(checks)} checks passed"
    )
    return 0 if passed else 1
