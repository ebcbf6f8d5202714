"""NFQUEUE (linux/nfqueue.py over core/nfqmsg.py) in real namespaces: the kernel holds each
new connection from the peer until this test's listener gives the verdict.

    [ qcNNN ]  qc-NNN 10.235.0.1/24 --veth-- qs-NNN 10.235.0.2/24  [ qsNNN ]
               clients: socat, curl, UDP          INPUT -i qs-NNN -> TENCRYPT-NFQ:
               sockets of this test                 udp dport 1337 -> RETURN
                                                    new tcp/udp from 10.235.0.0/24 -> NFQUEUE 7
                                                  servers: TCP :8080, UDP :5353 of this test
                                                  listener: NfQueue(7), a thread of this test

Sockets are opened with this thread inside a namespace (setns) and stay there. Outcomes are
asserted on the receiving sockets, on what the listener saw and on the kernel's counters; the
only waits are bounded polls and the clients' own connect timeouts.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
import threading
import time
from pathlib import Path

import pytest

from tencrypt.core import nfqmsg
from tencrypt.core.stats import Stats
from tencrypt.errors import SetupError
from tencrypt.linux import firewall, netns, nfqueue

QUEUE = 7
CLIENT, SERVER, NET = "10.235.0.1", "10.235.0.2", "10.235.0.0/24"
CLIENT6, SERVER6, NET6 = "fd00:235::1", "fd00:235::2", "fd00:235::/64"
TCP_PORT, UDP_PORT, TUNNEL_PORT = 8080, 5353, 1337
SAVE = os.environ.get("TENCRYPT_SAVE_NFQ_CAPTURE")  # a directory: rewrite the unit-test captures
SYN, ACK = 0x02, 0x10


class Pair:
    def __init__(self) -> None:
        sfx = netns.unique_suffix()
        self.client, self.server, self.sfx = f"qc{sfx}", f"qs{sfx}", sfx
        self.server_if = f"qs-{sfx}"

    def up(self) -> None:
        netns.create(self.client)
        netns.create(self.server)
        netns.sh(
            [
                "ip",
                "link",
                "add",
                f"qc-{self.sfx}",
                "netns",
                self.client,
                "type",
                "veth",
                "peer",
                "name",
                self.server_if,
                "netns",
                self.server,
            ]
        )
        for ns, dev, addr, addr6 in (
            (self.client, f"qc-{self.sfx}", CLIENT, CLIENT6),
            (self.server, self.server_if, SERVER, SERVER6),
        ):
            netns.run(ns, ["ip", "addr", "add", f"{addr}/24", "dev", dev])
            netns.run(ns, ["ip", "addr", "add", f"{addr6}/64", "dev", dev, "nodad"])
            netns.run(ns, ["ip", "link", "set", dev, "up"])
        with netns.entered(self.server):
            nfqueue.install_rules(QUEUE, self.server_if, [NET, NET6], TUNNEL_PORT)

    def down(self) -> None:
        netns.delete(self.client)
        netns.delete(self.server)

    def socket(self, ns: str, kind: int, port: int = 0, v6: bool = False) -> socket.socket:
        with netns.entered(ns):
            sock = socket.socket(socket.AF_INET6 if v6 else socket.AF_INET, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server, client = (SERVER6, CLIENT6) if v6 else (SERVER, CLIENT)
        sock.bind((server if ns == self.server else client, port))
        return sock

    def queue(self, **kwargs: object) -> nfqueue.NfQueue:
        with netns.entered(self.server):
            return nfqueue.NfQueue(QUEUE, Stats(), **kwargs)  # type: ignore[arg-type]

    def rule_packets(self, tool: str = "iptables") -> int:
        """Packets the NFQUEUE rules of TENCRYPT-NFQ matched (iptables' counters)."""
        out = netns.run(
            self.server, [tool, "-w", "5", "-L", nfqueue.CHAIN, "-n", "-v", "-x"]
        ).stdout
        return sum(int(line.split()[0]) for line in out.splitlines() if "NFQUEUE" in line)


@pytest.fixture
def pair():
    p = Pair()
    try:
        p.up()
        yield p
    finally:
        p.down()
        assert not netns.exists(p.client) and not netns.exists(p.server)


class Listener:
    """Pumps the queue in a thread: records each packet's flow, answers ``accept`` (or nothing
    when ``accept`` is None)."""

    def __init__(self, queue: nfqueue.NfQueue, accept: bool | None) -> None:
        self.queue, self.accept = queue, accept
        self.seen: list[tuple[nfqmsg.QueuedPacket, nfqmsg.Flow | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Listener:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()

    def _run(self) -> None:
        deadline = time.monotonic() + 120  # a hang guard
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not select.select([self.queue], [], [], 0.05)[0]:
                continue
            batch = self.queue.read_batch()
            self.seen += [(p, nfqmsg.parse_flow(p.payload)) for p in batch]
            if self.accept is not None:
                self.queue.verdicts((p.packet_id, self.accept) for p in batch)

    def flows(self, proto: int) -> list[nfqmsg.Flow]:
        return [f for _p, f in self.seen if f is not None and f.proto == proto]

    def tcp_flags(self) -> list[int]:
        return [
            p.payload[(p.payload[0] & 0x0F) * 4 + 13]
            for p, f in self.seen
            if f is not None and f.proto == nfqmsg.IPPROTO_TCP
        ]


def tcp_server(pair: Pair, v6: bool = False) -> tuple[socket.socket, list[bytes], threading.Thread]:
    """Accepts one connection at a time and keeps what each sent until it closed, or until the
    end of an HTTP request, which gets a two-byte answer."""
    srv = pair.socket(pair.server, socket.SOCK_STREAM, TCP_PORT, v6)
    srv.listen(8)
    srv.settimeout(0.2)
    got: list[bytes] = []

    def serve() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and srv.fileno() >= 0:
            try:
                conn, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            with conn:
                conn.settimeout(20)
                data = bytearray()
                while chunk := conn.recv(65536):
                    data += chunk
                    if data.startswith(b"GET ") and b"\r\n\r\n" in data:
                        conn.sendall(
                            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
                        )
                        break
                got.append(bytes(data))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return srv, got, thread


def socat_send(pair: Pair, data: bytes, timeout: int = 2, v6: bool = False) -> int:
    target = f"TCP6:[{SERVER6}]" if v6 else f"TCP:{SERVER}"
    proc = netns.run(
        pair.client,
        ["socat", "-u", "STDIN", f"{target}:{TCP_PORT},connect-timeout={timeout}"],
        check=False,
        input=data.decode(),
        timeout=30,
    )
    return proc.returncode


def udp_send(pair: Pair, marker: bytes) -> None:
    with pair.socket(pair.client, socket.SOCK_DGRAM) as sock:
        sock.sendto(marker, (SERVER, UDP_PORT))


def received(sock: socket.socket, wait: float = 0.5) -> list[bytes]:
    """Everything waiting on ``sock``, polling for at most ``wait`` seconds after the last."""
    out = []
    while select.select([sock], [], [], wait)[0]:
        out.append(sock.recv(65536))
    return out


def receive_one(sock: socket.socket, wait: float = 5.0) -> bytes | None:
    """The next datagram on ``sock``, waiting at most ``wait`` seconds for it."""
    return sock.recv(65536) if select.select([sock], [], [], wait)[0] else None


def test_accept_lets_new_connections_through_and_queues_only_their_first_packet(pair):
    srv, got, server = tcp_server(pair)
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    body = b"accepted-tcp " * 30000  # 390 kB: hundreds of segments after the SYN
    with pair.queue() as q, Listener(q, accept=True) as listener:
        assert socat_send(pair, body, timeout=10) == 0
        netns.wait_for(lambda: got, what="the TCP server to receive the stream")
        udp_send(pair, b"accepted-udp")
        assert received(udp) == [b"accepted-udp"]
        curl = netns.run(
            pair.client,
            ["curl", "-sS", "--max-time", "10", f"http://{SERVER}:{TCP_PORT}/marker"],
            check=False,
        )
        assert (curl.returncode, curl.stdout) == (0, "ok"), curl.stderr
    srv.close()
    server.join(10)
    assert got[0] == body
    assert got[1].startswith(b"GET /marker HTTP/1.1")
    # only the first packet of each connection was queued: a SYN, for socat and for curl
    assert listener.tcp_flags() == [SYN, SYN]
    assert [f.dport for f in listener.flows(nfqmsg.IPPROTO_TCP)] == [TCP_PORT, TCP_PORT]
    udp_flows = listener.flows(nfqmsg.IPPROTO_UDP)
    assert [(f.src, f.dport) for f in udp_flows] == [(socket.inet_aton(CLIENT), UDP_PORT)]
    assert all(
        p.hook == nfqmsg.NF_INET_LOCAL_IN and p.family == nfqmsg.AF_INET for p, _ in listener.seen
    )
    assert q.stats.get("nfqueue_accepted") == 3 == q.stats.get("nfqueue_packets")
    assert pair.rule_packets() == 3
    udp.close()


def test_drop_refuses_new_connections(pair):
    srv, got, server = tcp_server(pair)
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    with pair.queue() as q, Listener(q, accept=False) as listener:
        assert socat_send(pair, b"refused-tcp", timeout=2) != 0  # connect timed out
        udp_send(pair, b"refused-udp")
        netns.wait_for(lambda: listener.flows(nfqmsg.IPPROTO_UDP), what="the datagram queued")
        assert received(udp) == []
        status = q.status()
    srv.close()
    server.join(10)
    assert got == []
    flags = listener.tcp_flags()
    assert flags and all(f == SYN for f in flags)  # the SYN and its retransmissions, each refused
    assert [
        p.payload.endswith(b"refused-udp")
        for p, f in listener.seen
        if f and f.proto == nfqmsg.IPPROTO_UDP
    ] == [True]
    assert q.stats.get("nfqueue_refused") == len(listener.seen) == pair.rule_packets()
    assert status is not None and status.waiting == 0 and status.last_id == len(listener.seen)
    udp.close()


def test_no_listener_fails_closed(pair):
    srv, got, server = tcp_server(pair)
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    assert socat_send(pair, b"nobody-tcp", timeout=2) != 0
    udp_send(pair, b"nobody-udp")
    assert received(udp) == []
    srv.close()
    server.join(10)
    assert got == []
    assert pair.rule_packets() >= 2  # the rule took them; no queue was bound, so they dropped
    queues = netns.run(pair.server, ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
    assert nfqmsg.parse_queue_status(queues) == {}
    udp.close()


def test_close_drops_what_awaits_a_verdict(pair):
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    q = pair.queue()
    with Listener(q, accept=None) as listener:  # reads, never answers
        udp_send(pair, b"held-udp")
        netns.wait_for(lambda: listener.seen, what="the datagram queued")
    status = q.status()
    assert status is not None and status.waiting == 1
    q.close()
    q.close()  # idempotent
    assert received(udp) == []
    udp.close()


def test_a_full_queue_drops_the_rest(pair):
    """maxlen 4, nobody reading: 4 datagrams wait, 8 are dropped by the kernel; accepting
    the 4 delivers exactly them."""
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    with pair.queue(maxlen=4) as q:
        for i in range(12):
            udp_send(pair, b"burst-%02d" % i)  # a new socket each: a new flow, NEW
        netns.wait_for(lambda: q.status().dropped_full == 8, what="8 drops at maxlen")
        status = q.status()
        assert status.waiting == 4
        batch = q.read_batch()
        assert [p.payload[-8:] for p in batch] == [b"burst-%02d" % i for i in range(4)]
        q.verdicts((p.packet_id, True) for p in batch)
        assert sorted(received(udp)) == [b"burst-%02d" % i for i in range(4)]
        assert q.status().waiting == 0
    udp.close()


def test_a_full_socket_is_counted_not_raised(pair):
    """A receive buffer too small for the burst: the kernel cannot deliver some messages,
    drops their packets (dropped_user) and the next recv says ENOBUFS, which is counted."""
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    with pair.queue(rcvbuf=2048) as q:
        for i in range(60):
            udp_send(pair, b"flood-%02d" % i)
        netns.wait_for(lambda: q.status().last_id == 60, what="60 datagrams queued or dropped")
        status = q.status()
        assert status.dropped_user > 0
        packets: list[nfqmsg.QueuedPacket] = []
        while batch := q.read_batch(8):
            packets += batch
        assert q.stats.get("nfqueue_overflows") >= 1
        assert len(packets) + status.dropped_user == 60
        q.verdicts((p.packet_id, True) for p in packets)
        assert len(received(udp)) == len(packets)
        assert q.status().waiting == 0
    udp.close()


def test_a_second_listener_is_refused(pair):
    with pair.queue() as q:
        status = q.status()
        assert status is not None
        assert (status.copy_mode, status.copy_range) == (nfqmsg.CopyMode.PACKET, 128)
        with pytest.raises(SetupError, match="another socket has bound"):
            pair.queue()


def test_known_members_are_dropped_before_the_queue(pair):
    """The strict-mode table (inet tencrypt, input priority -10) drops a project member's
    plaintext before the filter table's INPUT (priority 0) could queue it: only unclassified
    sources cost a verdict."""
    srv, got, server = tcp_server(pair)
    with netns.entered(pair.server):
        firewall.install(pair.server_if, TUNNEL_PORT, 0x1337)
        firewall.change([CLIENT], [])
    with pair.queue() as q, Listener(q, accept=True) as listener:
        assert socat_send(pair, b"member-tcp", timeout=2) != 0
    srv.close()
    server.join(10)
    assert got == [] and listener.seen == [] and pair.rule_packets() == 0
    with netns.entered(pair.server):
        refused = firewall.counters()["refused_in_ipv4"]
    assert refused > 0  # the member's SYNs hit the strict-mode drop


def test_kernel_messages_parse(pair):
    """A real packet message and a real refusal, as the kernel sends them; with
    TENCRYPT_SAVE_NFQ_CAPTURE=DIR they are saved for tests/unit/test_nfqmsg.py."""
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    with pair.queue() as q:
        udp_send(pair, b"hello-udp\n")
        assert select.select([q], [], [], 5)[0]
        packet_msg = q.sock.recv(65536)
        (msg,), broken = nfqmsg.split_messages(packet_msg)
        packet = nfqmsg.parse_packet(msg)
        assert not broken and packet is not None and packet.payload.endswith(b"hello-udp\n")
        q.verdict(packet.packet_id, True)
        q.verdict(packet.packet_id, True)  # again: the kernel no longer holds it
        assert select.select([q], [], [], 5)[0]
        error_msg = q.sock.recv(65536)
        (msg,), _ = nfqmsg.split_messages(error_msg)
        assert nfqmsg.parse_ack(msg) == nfqmsg.NetlinkAck(2, 0)  # ENOENT
    assert received(udp) == [b"hello-udp\n"]
    udp.close()
    if SAVE:
        Path(SAVE, "nfq_packet_udp.bin").write_bytes(packet_msg)
        Path(SAVE, "nfq_error_enoent.bin").write_bytes(error_msg)


def test_udp_is_queued_until_the_first_reply(pair):
    """conntrack calls a UDP flow NEW until a reply was seen: a one-way flow costs a verdict
    per datagram, a flow that was answered costs none more."""
    udp = pair.socket(pair.server, socket.SOCK_DGRAM, UDP_PORT)
    with (
        pair.queue() as q,
        Listener(q, accept=True) as listener,
        pair.socket(pair.client, socket.SOCK_DGRAM) as client,
    ):
        for i in range(3):
            client.sendto(b"one-way-%d" % i, (SERVER, UDP_PORT))
            assert receive_one(udp) == b"one-way-%d" % i
        queued_one_way = len(listener.seen)
        udp.sendto(b"reply", client.getsockname())
        assert receive_one(client) == b"reply"
        for i in range(3):
            client.sendto(b"answered-%d" % i, (SERVER, UDP_PORT))
            assert receive_one(udp) == b"answered-%d" % i
    assert queued_one_way == 3
    assert len(listener.seen) == 3
    udp.close()


def test_ipv6_connections_are_queued_too(pair):
    """ip6tables carries the same rule: an IPv6 SYN is queued (family AF_INET6), refused,
    then accepted."""
    srv, got, server = tcp_server(pair, v6=True)
    with pair.queue() as q:
        with Listener(q, accept=False) as refusing:
            assert socat_send(pair, b"refused-v6", timeout=2, v6=True) != 0
        with Listener(q, accept=True) as accepting:
            assert socat_send(pair, b"accepted-v6", timeout=10, v6=True) == 0
            netns.wait_for(lambda: got, what="the IPv6 stream at the server")
    srv.close()
    server.join(10)
    assert got == [b"accepted-v6"]
    for listener in (refusing, accepting):
        assert listener.seen and all(
            (p.family, p.hw_protocol, f.version, f.src, f.dport)
            == (
                nfqmsg.AF_INET6,
                nfqmsg.ETH_P_IPV6,
                6,
                socket.inet_pton(socket.AF_INET6, CLIENT6),
                TCP_PORT,
            )
            for p, f in listener.seen
        )
    assert len(accepting.seen) == 1
    assert pair.rule_packets("ip6tables") == len(refusing.seen) + 1
    assert pair.rule_packets("iptables") == 0


def test_verdicts_after_an_async_lookup_under_uvloop(pair):
    """The daemon's shape: ``add_reader`` on the queue, packets held while a lookup runs in
    another task (here a 0.3 s stand-in: long enough that the SYN may be retransmitted), one
    verdict per held packet when it ends; curl sees a normal connection."""
    srv, got, server = tcp_server(pair)
    q = pair.queue()

    async def main() -> tuple[int, str, list[int]]:
        loop = asyncio.get_running_loop()
        held: dict[bytes, list[int]] = {}
        answered: list[int] = []

        async def lookup(source: bytes) -> None:
            await asyncio.sleep(0.3)
            ids = held.pop(source)
            q.verdicts((i, True) for i in ids)
            answered.extend(ids)

        def on_queue() -> None:
            for packet in q.read_batch():
                flow = nfqmsg.parse_flow(packet.payload)
                if flow is None:
                    q.verdict(packet.packet_id, False)
                    continue
                if flow.src not in held:
                    held[flow.src] = []
                    loop.create_task(lookup(flow.src))
                held[flow.src].append(packet.packet_id)

        loop.add_reader(q.fileno(), on_queue)
        try:
            curl = await asyncio.create_subprocess_exec(
                *netns.exec_argv(
                    pair.client,
                    ["curl", "-sS", "--max-time", "10", f"http://{SERVER}:{TCP_PORT}/async"],
                ),
                stdout=asyncio.subprocess.PIPE,
            )
            out, _ = await curl.communicate()
            return curl.returncode or 0, out.decode(), answered
        finally:
            loop.remove_reader(q.fileno())

    try:
        code, body, answered = asyncio.run(main())
    finally:
        q.close()
    srv.close()
    server.join(10)
    assert (code, body) == (0, "ok")
    assert got[0].startswith(b"GET /async")
    assert len(answered) >= 1 and q.stats.get("nfqueue_accepted") == len(answered)
