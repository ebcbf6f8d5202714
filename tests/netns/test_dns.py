"""The DNS proxy (`tencrypt dns`) in a lab pod, against the lab's real dnsmasq.

    <lab>-nginx1 (myproject)                      <lab>-node1
      tencrypt dns 127.0.0.1:53  --eth0--br0-->   dnsmasq 172.30.0.2:53 (lab hosts: A + PTR)
      clients: dig, getent, a python client

    <lab>-nginx2 (myproject), for the routes test: `tencrypt setup` (tenc0, routes, resolv.conf)
      then `tencrypt dns` from setup's state: it adds and removes /32 routes

Every process started here is stopped in a finaliser; dnsmasq, when a test stops it, is
started again in a ``finally`` (the Lab has no stop/start of it: we use its pid file and
``clusterdns.build_dnsmasq_argv``, as ``Lab.up`` does).
"""

from __future__ import annotations

import json
import os
import re
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from dnslib import RCODE, DNSQuestion, DNSRecord

from tencrypt.lab import clusterdns
from tencrypt.linux import netns

TENCRYPT = str(Path(sys.executable).parent / "tencrypt")
DOMAIN = "myproject.svc.cluster.local"
DNS_IP = "172.30.0.2"

# A small DNS client run inside a pod: {"server", "port", "queries": [hex], "tcp": bool,
# "wait": bool} on stdin; one socket per query (UDP, all sent at once) or one TCP connection
# for all; prints the replies as hex (null when none came within "timeout" seconds).
CLIENT = r"""
import asyncio, json, socket, struct, sys
req = json.load(sys.stdin)
server, port, timeout = req["server"], req["port"], req.get("timeout", 10)
queries = [bytes.fromhex(q) for q in req["queries"]]

async def udp_one(loop, data):
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_sendto(sock, data, (server, port))
        if not req.get("wait", True):
            return None
        return (await asyncio.wait_for(loop.sock_recv(sock, 65535), timeout)).hex()
    except (OSError, asyncio.TimeoutError):
        return None
    finally:
        sock.close()

async def tcp_all():
    r, w = await asyncio.open_connection(server, port)
    for q in queries:
        w.write(struct.pack("!H", len(q)) + q)
    await w.drain()
    out = []
    try:
        for _ in queries:
            n = struct.unpack("!H", await asyncio.wait_for(r.readexactly(2), timeout))[0]
            out.append((await asyncio.wait_for(r.readexactly(n), timeout)).hex())
    except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    w.close()
    return out + [None] * (len(queries) - len(out))

async def main():
    loop = asyncio.get_running_loop()
    if req.get("tcp"):
        return await tcp_all()
    return await asyncio.gather(*(udp_one(loop, q) for q in queries))

print(json.dumps(asyncio.run(main())))
"""


def ask(
    ns: str,
    queries: list[bytes],
    server: str = "127.0.0.1",
    *,
    port: int = 53,
    tcp: bool = False,
    wait: bool = True,
    timeout: float = 10,
) -> list[bytes | None]:
    req = {
        "server": server,
        "port": port,
        "queries": [q.hex() for q in queries],
        "tcp": tcp,
        "wait": wait,
        "timeout": timeout,
    }
    out = netns.run(ns, [sys.executable, "-c", CLIENT], input=json.dumps(req), timeout=120)
    return [bytes.fromhex(r) if r else None for r in json.loads(out.stdout)]


def query(name: str, qtype: str = "A", qid: int = 0x2A2A) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    return bytes(q.pack())


class DnsProcess:
    """`tencrypt dns` running in a namespace, with its log."""

    def __init__(self, ns: str, log: Path, *args: str) -> None:
        self.ns, self.log = ns, log
        self.listen = args[args.index("--listen") + 1] if "--listen" in args else "127.0.0.1:53"
        self.proc = netns.spawn(ns, [TENCRYPT, "dns", "--log-level", "debug", *args], log=log)
        netns.wait_for(self._listening, timeout=30, what=f"tencrypt dns in {ns}")

    def _listening(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(
                f"tencrypt dns exited {self.proc.returncode}:\n{self.log.read_text()}"
            )
        port = self.listen.rsplit(":", 1)[1]
        udp = netns.run(self.ns, ["ss", "-Hlnu", f"sport = :{port}"], check=False).stdout
        tcp = netns.run(self.ns, ["ss", "-Hlnt", f"sport = :{port}"], check=False).stdout
        return self.listen in udp and self.listen in tcp

    def stats(self) -> dict:
        """Ask for a stats line (SIGUSR1) and return the newest one."""
        before = self.log.read_text().count(" stats {")
        self.proc.send_signal(signal.SIGUSR1)
        netns.wait_for(
            lambda: self.log.read_text().count(" stats {") > before, timeout=10, what="a stats line"
        )
        return json.loads(self.log.read_text().rsplit(" stats ", 1)[1].splitlines()[0])

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


@pytest.fixture(scope="module")
def pod(lab):
    return lab.pods["nginx1"]


@pytest.fixture(scope="module")
def proxy(lab, pod, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dns")
    # No answer cache here: these tests compare the relay byte for byte with the upstream and
    # stop the upstream; test_repeated_queries_are_answered_from_the_cache runs its own.
    p = DnsProcess(
        pod.netns,
        tmp / "dns.log",
        "--listen",
        "127.0.0.1:53",
        "--upstream",
        DNS_IP,
        "--domain",
        DOMAIN,
        "--state-dir",
        str(tmp / "state"),
        "--cache-entries",
        "0",
    )
    try:
        yield p
    finally:
        log = p.stop()
        assert p.proc.returncode == 0, log
        assert "Traceback" not in log, log


# -- dnsmasq control (the Lab has none) ---------------------------------------------------


def dnsmasq_pid(lab) -> int | None:
    try:
        pid = int(lab.pid_file("node1.dnsmasq").read_text().strip())
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError):
        return None


def stop_dnsmasq(lab) -> None:
    pid = dnsmasq_pid(lab)
    assert pid, "the lab's dnsmasq is not running"
    os.kill(pid, signal.SIGTERM)
    node = lab.nodes["node1"].netns
    netns.wait_for(
        lambda: (
            not netns.run(node, ["ss", "-Hlnu", f"src {DNS_IP}:53"], check=False).stdout.strip()
        ),
        what="dnsmasq gone",
    )


def start_dnsmasq(lab) -> None:
    if dnsmasq_pid(lab):
        return
    node = lab.nodes["node1"]
    cidrs = [lab.service_cidr, *(n.pod_cidr for n in lab.nodes.values())]
    argv = clusterdns.build_dnsmasq_argv(
        lab.dns_ip,
        lab.state_dir / "dns" / "hosts",
        lab.log_file("node1.dnsmasq"),
        lab.pid_file("node1.dnsmasq"),
        cidrs,
    )
    netns.spawn(node.netns, argv, log=lab.log_file("node1.dnsmasq.out"))
    netns.wait_for(
        lambda: netns.run(
            node.netns, ["ss", "-Hlnu", f"src {DNS_IP}:53"], check=False
        ).stdout.strip(),
        timeout=20,
        what="dnsmasq",
    )


# -- the tests ----------------------------------------------------------------------------

NAMES = [
    ("nginx1.myproject.svc.cluster.local", "A"),
    ("cakephp.project2.svc.cluster.local", "A"),
    ("nginx2.nginx2.myproject.svc.cluster.local", "A"),  # a pod endpoint name
    ("13.0.30.172.in-addr.arpa", "PTR"),
    ("12.0.17.172.in-addr.arpa", "PTR"),
    ("nginx1.myproject.svc.cluster.local", "AAAA"),  # NOERROR, no data
    ("nosuch.myproject.svc.cluster.local", "A"),  # NXDOMAIN
]


def test_answers_are_the_upstreams_byte_for_byte(proxy, pod):
    queries = [query(name, qtype, qid=0x1000 + i) for i, (name, qtype) in enumerate(NAMES)]
    direct = ask(pod.netns, queries, DNS_IP)
    via = ask(pod.netns, queries)
    assert None not in direct
    assert via == direct
    rcodes = [DNSRecord.parse(r).header.rcode for r in via]
    assert rcodes == [RCODE.NOERROR] * 6 + [RCODE.NXDOMAIN]
    # ... and over TCP (served over TCP upstream), pipelined on one connection.
    assert ask(pod.netns, queries, tcp=True) == ask(pod.netns, queries, DNS_IP, tcp=True)


def test_dig_and_getent_through_the_proxy(proxy, pod):
    def dig(server, *args):
        return netns.run(
            pod.netns, ["dig", f"@{server}", "+noall", "+answer", "+tries=1", "+time=5", *args]
        ).stdout

    for args in (
        ["nginx2.myproject.svc.cluster.local"],
        ["-x", "172.30.0.13"],
        ["+tcp", "cakephp.project2.svc.cluster.local"],
    ):
        via = dig("127.0.0.1", *args)
        assert via and via == dig(DNS_IP, *args)
    resolv = Path("/etc/netns") / pod.netns / "resolv.conf"
    original = resolv.read_text()
    lookups = (["hosts", "nginx2"], ["hosts", "cakephp.project2"], ["hosts", "172.30.0.11"])
    direct = [netns.run(pod.netns, ["getent", *a]).stdout for a in lookups]
    try:
        resolv.write_text(original.replace(f"nameserver {DNS_IP}", "nameserver 127.0.0.1"))
        via = [netns.run(pod.netns, ["getent", *a]).stdout for a in lookups]
    finally:
        resolv.write_text(original)
    assert via == direct
    assert via[0].split() == ["172.30.0.12", "nginx2.myproject.svc.cluster.local"]


def test_500_concurrent_clients_get_their_own_answers(proxy, pod):
    # Every client uses the same query ID: only the proxy's re-mapping tells them apart.
    names = [
        ("nginx1.myproject.svc.cluster.local", "A"),
        ("cakephp.project2.svc.cluster.local", "A"),
        ("11.0.30.172.in-addr.arpa", "PTR"),
    ]
    names += [(f"c{i}.myproject.svc.cluster.local", "A") for i in range(497)]
    queries = [query(n, t, qid=7) for n, t in names]
    replies = ask(pod.netns, queries)
    direct = ask(pod.netns, queries[:3], DNS_IP)
    assert replies[:3] == direct
    for q, r in zip(queries, replies, strict=True):
        assert r is not None
        rec = DNSRecord.parse(r)
        assert rec.header.id == 7 and rec.header.qr == 1
        assert rec.q == DNSRecord.parse(q).q
        assert rec.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN)
    before_timeouts = proxy.stats()["drops"].get("dns_upstream_timeout", 0)
    assert before_timeouts == 0


def test_upstream_stopped_servfail_then_recovers(lab, proxy, pod):
    q = query("nginx1.myproject.svc.cluster.local", qid=0x5151)
    before = proxy.stats()["drops"].get("dns_upstream_timeout", 0)
    stop_dnsmasq(lab)
    try:
        [reply] = ask(pod.netns, [q])
        rec = DNSRecord.parse(reply)
        assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 0x5151
        assert rec.q == DNSQuestion("nginx1.myproject.svc.cluster.local")
        assert proxy.stats()["drops"].get("dns_upstream_timeout", 0) > before
        # TCP clients get SERVFAIL too (the upstream refuses the connection).
        [reply] = ask(pod.netns, [q], tcp=True)
        assert DNSRecord.parse(reply).header.rcode == RCODE.SERVFAIL
    finally:
        start_dnsmasq(lab)

    def answered():
        [r] = ask(pod.netns, [q])
        return r is not None and DNSRecord.parse(r).header.rcode == RCODE.NOERROR

    netns.wait_for(answered, timeout=30, what="answers after dnsmasq restarted")
    assert ask(pod.netns, [q]) == ask(pod.netns, [q], DNS_IP)


ROGUE = r"""
import socket, struct, sys
from dnslib import DNSRecord
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], 53))
print("ready", flush=True)
while True:
    data, addr = s.recvfrom(65535)
    q = DNSRecord.parse(data)
    a = q.reply()
    s.sendto(b"\x00" * 5, addr)                                  # garbage
    s.sendto(struct.pack("!H", (q.header.id + 1) & 0xFFFF) + bytes(a.pack())[2:], addr)  # wrong id
    a.q.qname = "evil.project2.svc.cluster.local"
    s.sendto(bytes(a.pack()), addr)                                # right id, wrong question
"""


def test_rogue_upstream_answers_never_reach_clients(lab, proxy, pod, tmp_path):
    q = query("nginx1.myproject.svc.cluster.local", qid=0x6161)
    node = lab.nodes["node1"].netns
    before = proxy.stats()["drops"]
    stop_dnsmasq(lab)
    rogue = None
    try:
        log = tmp_path / "rogue.log"
        rogue = netns.spawn(node, [sys.executable, "-u", "-c", ROGUE, DNS_IP], log=log)
        netns.wait_for(lambda: "ready" in log.read_text(), what="rogue upstream")
        [reply] = ask(pod.netns, [q])
        rec = DNSRecord.parse(reply)
        assert rec.header.rcode == RCODE.SERVFAIL and rec.header.id == 0x6161
    finally:
        if rogue is not None:
            rogue.kill()
            rogue.wait()
        start_dnsmasq(lab)
    after = proxy.stats()["drops"]
    for reason in ("dns_malformed_answer", "dns_unknown_id", "dns_wrong_question"):
        assert after.get(reason, 0) > before.get(reason, 0), reason


def test_malformed_spray_never_stops_it(proxy, pod):
    good = query("nginx1.myproject.svc.cluster.local", qid=0x4242)
    before = proxy.stats()["drops"]
    two_questions = DNSRecord.question("a.myproject.svc.cluster.local")
    two_questions.add_question(DNSQuestion("b.myproject.svc.cluster.local"))
    answerable = [good[:-3], bytes(two_questions.pack()), good[:12] + b"\xff" * 40]
    # Header readable: each gets a FORMERR with its own ID.
    for reply, sent in zip(ask(pod.netns, answerable), answerable, strict=True):
        rec = DNSRecord.parse(reply)
        assert (
            rec.header.rcode == RCODE.FORMERR and rec.header.id == struct.unpack("!H", sent[:2])[0]
        )
    rnd = __import__("random").Random(1)
    spray = [bytes(rnd.randrange(256) for _ in range(rnd.randrange(0, 300))) for _ in range(600)]
    spray += [b"\x01", good[:5], b"\x00" * 5000, bytes(DNSRecord.parse(good).reply().pack())]
    ask(pod.netns, spray, wait=False)
    # TCP: a garbage message, and an announced 60000-byte query.
    ask(pod.netns, [b"\xde\xad\xbe\xef" * 3], tcp=True, timeout=5)
    ask(pod.netns, [b"\x00" * 60000], tcp=True, timeout=5)
    [reply] = ask(pod.netns, [good])
    assert reply == ask(pod.netns, [good], DNS_IP)[0]
    after = proxy.stats()["drops"]
    assert after["dns_malformed_query"] >= before.get("dns_malformed_query", 0) + 3 + 2
    assert after["dns_too_big"] >= before.get("dns_too_big", 0) + 2
    assert proxy.proc.poll() is None


HOLD = r"""
import socket, sys, time
conns = [socket.create_connection(("127.0.0.1", 53)) for _ in range(int(sys.argv[1]))]
print("open", flush=True)
time.sleep(120)  # held until the test kills us
"""

IDLE = r"""
import socket
s = socket.create_connection(("127.0.0.1", 53))
s.settimeout(120)
print("eof" if s.recv(1) == b"" else "data", flush=True)
"""


def test_tcp_clients_are_bounded_and_idle_ones_closed(proxy, pod, tmp_path):
    good = query("cakephp.project2.svc.cluster.local", qid=0x7070)
    before = proxy.stats()["drops"].get("dns_tcp_too_many_clients", 0)
    log = tmp_path / "hold.log"
    holder = netns.spawn(pod.netns, [sys.executable, "-u", "-c", HOLD, "70"], log=log)
    try:
        netns.wait_for(lambda: "open" in log.read_text(), what="70 TCP connections")
        # 64 are served (and idle); the 6 beyond the bound are closed at once and counted.
        netns.wait_for(
            lambda: proxy.stats()["drops"].get("dns_tcp_too_many_clients", 0) >= before + 6,
            what="refused TCP clients counted",
        )
    finally:
        holder.kill()
        holder.wait()
    # Their slots free again once they are gone: TCP queries are served.
    netns.wait_for(
        lambda: ask(pod.netns, [good], tcp=True, timeout=5)[0] is not None, what="a TCP answer"
    )
    assert ask(pod.netns, [good], tcp=True) == ask(pod.netns, [good], DNS_IP, tcp=True)
    # A connection that sends nothing is closed by the proxy (after its idle timeout).
    assert netns.run(pod.netns, [sys.executable, "-c", IDLE], timeout=150).stdout == "eof\n"


def edit_hosts(lab, text: str) -> None:
    """Replace the lab's DNS records and make dnsmasq re-read them (SIGHUP)."""
    (lab.state_dir / "dns" / "hosts").write_text(text)
    os.kill(dnsmasq_pid(lab), signal.SIGHUP)


def test_truncated_answers_relayed_then_served_over_tcp(lab, proxy, pod):
    hosts = lab.state_dir / "dns" / "hosts"
    original = hosts.read_text()
    name = "big.project2.svc.cluster.local"
    q = query(name, qid=0x7C7C)  # no EDNS: a 512-byte UDP limit (RFC 1035 §4.2.1)
    try:
        edit_hosts(lab, original + "".join(f"172.30.9.{i} {name}\n" for i in range(1, 61)))
        netns.wait_for(
            lambda: DNSRecord.parse(ask(pod.netns, [q], DNS_IP)[0]).header.tc,
            what="a truncated answer from dnsmasq",
        )
        before = proxy.stats()["table"]
        want = {f"172.30.9.{i}" for i in range(1, 61)}
        # dnsmasq rotates the order of the records, so compare contents, not bytes, here.
        [via] = ask(pod.netns, [q])
        rec = DNSRecord.parse(via)
        assert rec.header.tc and rec.header.id == 0x7C7C and rec.q.qname == name  # relayed
        assert {str(rr.rdata) for rr in rec.rr} <= want
        # The client's retry over TCP goes through us and gets all 60 records, classified.
        [via_tcp] = ask(pod.netns, [q], tcp=True)
        rec = DNSRecord.parse(via_tcp)
        assert not rec.header.tc and {str(rr.rdata) for rr in rec.rr} == want
        assert proxy.stats()["table"] >= before + 60
        out = netns.run(
            pod.netns, ["dig", "@127.0.0.1", "+noall", "+answer", "+noedns", name]
        ).stdout
        assert {line.split()[-1] for line in out.splitlines()} == want
    finally:
        edit_hosts(lab, original)


REVERSE = r"""
import asyncio, json, sys
from tencrypt.core.stats import Stats
from tencrypt.linux.dns import DnsConfig, DnsProxy

async def main():
    changes, stats = [], Stats()
    config = DnsConfig(upstream=(sys.argv[1], 53), domain="myproject.svc.cluster.local",
                       listen=("127.0.0.1", 5354))
    proxy = DnsProxy(config, stats, changes.extend)
    await proxy.start()
    peer = await asyncio.gather(*(proxy.classify_address("172.17.0.12") for _ in range(20)))
    queries_for_20 = stats.get("dns_queries")
    other = await proxy.classify_address("172.17.0.13")
    vip = await proxy.classify_address("172.30.0.11")
    nobody = await proxy.classify_address("172.17.0.99")
    before_again = stats.get("dns_queries")
    again = [await proxy.classify_address(ip) for ip in ("172.17.0.99", "172.17.0.12")]
    out = {"peer": [c and c.value for c in peer], "queries_for_20": queries_for_20,
           "other": other and other.value, "vip": vip and vip.value, "nobody": nobody,
           "again": [c and c.value for c in again],
           "queries_again": stats.get("dns_queries") - before_again,
           "changes": [[c.ip, c.old, c.new and c.new.value] for c in changes],
           "size": proxy.table_size()}
    await proxy.close()
    print(json.dumps(out))

asyncio.run(main())
"""


def test_reverse_classification_is_coalesced_and_cached(pod):
    out = json.loads(netns.run(pod.netns, [sys.executable, "-c", REVERSE, DNS_IP]).stdout)
    assert out["peer"] == ["internal"] * 20
    assert out["queries_for_20"] == 1  # 20 concurrent callers, one PTR query
    assert out["other"] == "external" and out["vip"] == "internal"
    assert out["nobody"] is None  # NXDOMAIN: unknown, remembered as such
    assert out["again"] == [None, "internal"] and out["queries_again"] == 0  # both cached
    assert out["changes"] == [
        ["172.17.0.12", None, "internal"],
        ["172.17.0.13", None, "external"],
        ["172.30.0.11", None, "internal"],
    ]
    assert out["size"] == 3


def test_repeated_queries_are_answered_from_the_cache(lab, pod, tmp_path):
    """A second proxy with the answer cache (the default): a repeated query is answered while
    the upstream is stopped, with its TTL counted down, without a new upstream query or any
    new classification; once the records' TTL has passed it is not (SERVFAIL)."""
    p = DnsProcess(
        pod.netns,
        tmp_path / "dns.log",
        "--listen",
        "127.0.0.1:5355",
        "--upstream",
        DNS_IP,
        "--domain",
        DOMAIN,
        "--state-dir",
        str(tmp_path / "state"),
    )
    name = "nginx2.myproject.svc.cluster.local"
    try:
        [direct] = ask(pod.netns, [query(name, qid=0x0101)], DNS_IP)
        [first] = ask(pod.netns, [query(name, qid=0x0202)], port=5355)
        assert first[2:] == direct[2:]  # the first answer is the upstream's, byte for byte
        ttl = DNSRecord.parse(first).rr[0].ttl
        assert ttl == clusterdns.DNS_TTL
        before = p.stats()
        stop_dnsmasq(lab)
        try:
            [cached] = ask(pod.netns, [query(name.upper(), qid=0x0303)], port=5355)
            rec = DNSRecord.parse(cached)
            assert rec.header.id == 0x0303 and rec.header.rcode == RCODE.NOERROR
            assert [str(rr.rdata) for rr in rec.rr] == ["172.30.0.12"]
            assert 0 < rec.rr[0].ttl <= ttl
            after = p.stats()
            assert after["counters"]["dns_cache_hits"] == 1
            assert after["counters"]["dns_queries"] == before["counters"]["dns_queries"]
            assert after["table"] == before["table"]  # nothing learned again
            # never past the TTL: once it has run out the upstream is asked (and is silent)
            netns.wait_for(
                lambda: (
                    DNSRecord.parse(
                        ask(pod.netns, [query(name, qid=0x0404)], port=5355)[0]
                    ).header.rcode
                    == RCODE.SERVFAIL
                ),
                timeout=ttl + 10,
                what="the cached answer's expiry",
            )
            assert p.stats()["drops"].get("dns_upstream_timeout", 0) >= 1
        finally:
            start_dnsmasq(lab)
    finally:
        log = p.stop()
        assert p.proc.returncode == 0 and "Traceback" not in log, log


# -- routes (needs `tencrypt setup`) ------------------------------------------------------


def routes(ns: str) -> str:
    return netns.run(ns, ["ip", "route", "show", "table", "main"]).stdout


@pytest.fixture
def setup_pod(lab, tmp_path):
    """nginx2 with `tencrypt setup` done (and undone afterwards) and `tencrypt dns` running."""
    ns, state = lab.pods["nginx2"].netns, str(tmp_path / "state")
    netns.run(ns, [TENCRYPT, "setup", "--state-dir", state])
    p = None
    try:
        p = DnsProcess(ns, tmp_path / "dns.log", "--state-dir", state)
        yield ns, p
    finally:
        if p is not None:
            p.stop()
        netns.run(ns, [TENCRYPT, "setup", "--undo", "--state-dir", state])


def test_routes_follow_classification(lab, setup_pod):
    ns, proxy = setup_pod
    hosts = lab.state_dir / "dns" / "hosts"
    original = hosts.read_text()
    gw = lab.pods["nginx2"].gateway
    ext_vip = re.escape("172.30.0.13")
    via_uplink = re.compile(rf"^{ext_vip} via {re.escape(gw)} dev eth0 proto 137 ", re.M)
    peer = re.compile(r"^172\.17\.0\.11 dev tenc0 proto 137 .*src 172\.17\.0\.12", re.M)
    try:
        # resolv.conf now points at the proxy: plain tools go through it.
        assert "127.0.0.1" in netns.run(ns, ["cat", "/etc/resolv.conf"]).stdout
        netns.run(ns, ["getent", "hosts", "cakephp.project2"])  # EXTERNAL VIP: bypass /32
        netns.run(ns, ["getent", "hosts", "nginx1.myproject"])  # INTERNAL VIP: nothing
        netns.run(ns, ["getent", "hosts", "172.17.0.11"])  # PTR: INTERNAL peer pod: /32 tenc0
        netns.run(ns, ["getent", "hosts", "cakephp.cakephp.project2"])  # external pod: nothing
        netns.wait_for(
            lambda: via_uplink.search(routes(ns)) and peer.search(routes(ns)), what="the /32 routes"
        )
        table = routes(ns)
        assert "172.30.0.11 " not in table and "172.17.0.13 " not in table
        assert "172.30.0.2 via" in table  # setup's DNS route is untouched
        # The VIP changes owner (now a myproject Service): its bypass route goes.
        edit_hosts(lab, original.replace("cakephp.project2.svc", "moved.myproject.svc"))
        netns.wait_for(
            lambda: (
                "172.30.0.13"
                in netns.run(ns, ["getent", "hosts", "moved.myproject"], check=False).stdout
            ),
            what="new name",
        )
        netns.wait_for(lambda: not via_uplink.search(routes(ns)), what="bypass route removed")
        # Entries expire with the TTL (30 s in the lab): the peer's route goes too.
        netns.wait_for(lambda: not peer.search(routes(ns)), timeout=90, what="expiry")
    finally:
        edit_hosts(lab, original)
    # Back with project2: the bypass returns; a stopped proxy leaves none of its routes.
    netns.wait_for(
        lambda: (
            "172.30.0.13"
            in netns.run(ns, ["getent", "hosts", "cakephp.project2"], check=False).stdout
        ),
        what="old name",
    )
    netns.wait_for(lambda: via_uplink.search(routes(ns)), what="bypass route again")
    stats = proxy.stats()
    assert stats["counters"]["routes_added"] == 3
    assert stats["counters"]["routes_removed"] == 2
    proxy.stop()
    assert "proto 137" not in "".join(
        line
        for line in routes(ns).splitlines(keepends=True)
        if line.split()[0] not in ("172.30.0.0/16", "172.30.0.2")
    )
