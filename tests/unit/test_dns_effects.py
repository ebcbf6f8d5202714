"""linux/dns.py: no answer before its effects (DESIGN §1a, #22 item 3). An answer that makes an
address internal reaches the app only once the address has its route into tenc0 and its
firewall element, or after ANSWER_WAIT as SERVFAIL; an answer that needs nothing goes at once.

The DNS proxy runs for real on loopback sockets against a small upstream that answers every
A query with one address; the proxy's wanted effects are a set the test empties."""

from __future__ import annotations

import asyncio
import socket

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from tencrypt.core.stats import Stats
from tencrypt.linux import dns
from tencrypt.linux.dns import DnsConfig, DnsProxy

PROJECT = "shop.svc.cluster.local"
WEB, OTHER = "172.30.5.9", "172.30.9.9"


class Upstream(asyncio.DatagramProtocol):
    """Answers ``web.shop...`` with WEB and anything else with OTHER (another project)."""

    def connection_made(self, transport) -> None:  # type: ignore[no-untyped-def]
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:  # type: ignore[no-untyped-def]
        query = DNSRecord.parse(data)
        name = str(query.q.qname)
        reply = query.reply()
        ip = WEB if name.startswith("web.shop") else OTHER
        reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ip), ttl=60))
        self.transport.sendto(reply.pack(), addr)


async def ask(port: int, name: str, timeout: float = 5.0) -> DNSRecord:
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, DNSRecord.question(name).pack())
        return DNSRecord.parse(await asyncio.wait_for(loop.sock_recv(sock, 4096), timeout))
    finally:
        sock.close()


async def proxy_with(pending: set[str]) -> tuple[DnsProxy, int, asyncio.DatagramTransport]:
    loop = asyncio.get_running_loop()
    upstream, _ = await loop.create_datagram_endpoint(Upstream, local_addr=("127.0.0.1", 0))
    up_port = upstream.get_extra_info("sockname")[1]
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    config = DnsConfig(
        upstream=("127.0.0.1", up_port), domain=PROJECT, listen=("127.0.0.1", port), cache_entries=0
    )
    proxy = DnsProxy(config, Stats())
    proxy.pending_effects = pending.__contains__
    await proxy.start()
    return proxy, port, upstream


def test_an_internal_answer_waits_for_its_effects_and_another_does_not():
    async def main():
        pending = {WEB}
        proxy, port, upstream = await proxy_with(pending)
        try:
            answer = asyncio.ensure_future(ask(port, f"web.{PROJECT}"))
            other = await ask(port, "db.blog.svc.cluster.local")  # not internal: at once
            assert str(other.rr[0].rdata) == OTHER
            await asyncio.sleep(0.2)
            assert not answer.done()  # held: its route and element are not in place
            pending.clear()
            proxy.effects_applied()
            got = await asyncio.wait_for(answer, 5)
            assert got.header.rcode == RCODE.NOERROR and str(got.rr[0].rdata) == WEB
            assert proxy.stats.get("dns_answers_held") == 1
        finally:
            await proxy.close()
            upstream.close()

    asyncio.run(main())


def test_an_answer_whose_effects_never_come_is_servfail_not_a_leak(monkeypatch):
    monkeypatch.setattr(dns, "ANSWER_WAIT", 0.2)

    async def main():
        proxy, port, upstream = await proxy_with({WEB})
        try:
            got = await ask(port, f"web.{PROJECT}")
            assert got.header.rcode == RCODE.SERVFAIL and not got.rr
            assert proxy.stats.get("dns_answers_held_too_long") == 1
        finally:
            await proxy.close()
            upstream.close()

    asyncio.run(main())
