"""NFQUEUE: hold each new plaintext connection from an unclassified source until we say.

Standalone mode (no membership feed from the node agent, DESIGN §1a) classifies a source
that opens a plaintext connection by a reverse lookup before the connection is accepted.
The kernel holds the first packet; this module hands it to the proxy and carries the
verdict back. The message formats are ``core/nfqmsg.py``.

What is queued
    Only packets that open a connection: an iptables rule in the pod's namespace,
    ``-m conntrack --ctstate NEW``, in the filter table's INPUT chain (priority 0, after the
    strict-mode table ``ip tencrypt`` at -10 has dropped known project members), for TCP and
    UDP arriving on the uplink from the pod network, except the tunnel's own UDP port;
    IPv4 sources through iptables, IPv6 sources through ip6tables (the same rule).
    ``rule_specs`` writes it. The native nftables ``queue`` statement is not used: kernels
    built without CONFIG_NFT_QUEUE (this one) refuse it with ENOENT, while iptables-nft's
    ``-j NFQUEUE`` (xt_NFQUEUE through nft_compat) works on both kinds of kernel.
    The rule has no ``--queue-bypass``.

Cost per connection
    TCP: one verdict per connection; the SYN is NEW, every later packet is ESTABLISHED and
    never leaves the kernel. A SYN retransmitted while the verdict is pending, or after a
    drop, is NEW again and queued again (answer it from the same classification).
    UDP: conntrack calls a flow NEW until the first reply, so a one-way flow queues every
    datagram until the pod answers; a request/response protocol costs one verdict.
    Each queued packet is one netlink message of at most ``copy_range`` (128) bytes of
    headers, one ``recv`` and one ``send``; ``verdicts`` answers many in one ``send``.

No listener: fail closed
    A packet queued to a number no socket has bound is dropped by the kernel (no bypass
    flag). The same when the proxy exits or calls ``close``: every packet still awaiting a
    verdict is dropped with the queue (nfqnl_rcv_nl_event destroys the instance).

Queue overflow: fail closed
    At most ``maxlen`` packets await a verdict; the kernel drops the next ones and counts them
    (``queue_dropped``). A message the kernel cannot deliver because our socket's receive
    buffer is full is dropped too (``queue_user_dropped``), and the next ``recv`` fails with
    ENOBUFS: ``read_batch`` counts it (``nfqueue_overflows``) and goes on. Fail-open is
    explicitly off in the bind message. The kernel's own counts are in ``status()``.
    A dropped SYN is retransmitted by the client (1 s, 2 s, ...), so overflow costs latency.

Sockets are per network namespace: create the ``NfQueue`` with the thread inside the pod's
namespace (``netns.entered``); it stays bound there. Counters go to the ``Stats`` given.
"""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import time
from collections.abc import Iterable, Sequence

from tencrypt.core import nfqmsg
from tencrypt.core.nfqmsg import QueuedPacket, QueueStatus
from tencrypt.core.stats import Counter, Stats
from tencrypt.errors import SetupError
from tencrypt.linux.kernel import SO_RCVBUFFORCE

NETLINK_NETFILTER = 12  # linux/netlink.h
SOL_NETLINK = 270  # linux/socket.h
NETLINK_CAP_ACK = 10  # linux/netlink.h: errors do not echo our whole request
RECV_BUFFER_BYTES = 4 * 1024 * 1024  # >= maxlen (1024) messages of ~2 KiB truesize each
RECV_CHUNK = 65536  # one datagram: a packet message is under 400 bytes, an error under 100
SEND_CHUNK = 32 * 1024  # verdict messages per send: 32 bytes each, so ~1000
PROC_STATUS = "/proc/thread-self/net/netfilter/nfnetlink_queue"  # this thread's namespace
CHAIN = "TENCRYPT-NFQ"
QUEUE_NUM = 42  # the inbound gate's; queues are per network namespace: any number will do
OUT_QUEUE_NUM = 43  # the outbound gate's (linux/inbound.py)
CHAIN_OUT = "TENCRYPT-NFQ-OUT"  # the outbound gate's (linux/inbound.py OutboundGate)
TOOLS = ("iptables", "ip6tables")  # iptables-nft: nft has no queue statement here (docstring)


class NfQueue:
    """One bound queue: ``fileno`` for a reader, ``read_batch``, ``verdict``, ``close``."""

    def __init__(
        self,
        queue_num: int,
        stats: Stats | None = None,
        *,
        copy_range: int = nfqmsg.DEFAULT_COPY_RANGE,
        maxlen: int = nfqmsg.DEFAULT_MAXLEN,
        rcvbuf: int = RECV_BUFFER_BYTES,
        timeout: float = 2.0,
    ) -> None:
        """Open the socket and bind ``queue_num`` (one config message, acknowledged).
        SetupError if the kernel refuses: EBUSY when another socket holds the queue."""
        self.queue_num = queue_num
        self.closed = False
        self.stats = stats if stats is not None else Stats()
        self._seq = 0
        self._pending: list[QueuedPacket] = []
        self._buf = bytearray(RECV_CHUNK)
        try:
            self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        except OSError as exc:
            raise SetupError(f"cannot open a netfilter netlink socket: {exc.strerror}") from exc
        try:
            self.sock.bind((0, 0))
            _receive_buffer(self.sock, rcvbuf)
            try:
                self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            except OSError:
                pass  # only shortens error messages
            self._request(
                nfqmsg.build_bind(queue_num, self._next_seq(), copy_range, maxlen),
                timeout,
                f"bind NFQUEUE {queue_num}",
            )
            self.sock.setblocking(False)
            self._proc = _open_status()
        except OSError as exc:
            self.sock.close()
            raise SetupError(f"bind NFQUEUE {queue_num}: {exc.strerror or exc}") from exc
        except BaseException:
            self.sock.close()
            raise

    def fileno(self) -> int:
        return self.sock.fileno()

    def read_batch(self, max_packets: int = 64) -> list[QueuedPacket]:
        """The packets waiting on the socket, at most ``max_packets``; never blocks or raises.
        Anything else the kernel sent (a refused verdict, garbage) is counted and skipped."""
        out, self._pending = self._pending[:max_packets], self._pending[max_packets:]
        while len(out) < max_packets:
            try:
                n = self.sock.recv_into(self._buf)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self.stats.inc(Counter.NFQUEUE_OVERFLOWS)  # the kernel dropped what did not fit
                    continue
                self.stats.inc(Counter.NFQUEUE_RECV_ERRORS)
                break
            self._sort(bytes(self._buf[:n]), out)
        return out

    def _sort(self, datagram: bytes, out: list[QueuedPacket]) -> None:
        messages, broken = nfqmsg.split_messages(datagram)
        if broken:
            self.stats.inc(Counter.NFQUEUE_MALFORMED)
        for msg in messages:
            packet = nfqmsg.parse_packet(msg)
            if packet is not None:
                self.stats.inc(Counter.NFQUEUE_PACKETS)
                out.append(packet)
                continue
            ack = nfqmsg.parse_ack(msg)
            if ack is not None and ack.errno:
                self.stats.inc(
                    Counter.NFQUEUE_KERNEL_ERRORS
                )  # e.g. ENOENT: a verdict for no packet
            elif ack is None:
                self.stats.inc(Counter.NFQUEUE_MALFORMED)

    def verdict(self, packet_id: int, accept: bool) -> None:
        """Release (``accept``) or drop one packet. A failed send is counted: the packet then
        stays held until ``close``, which drops it."""
        self.verdicts(((packet_id, accept),))

    def verdicts(self, decisions: Iterable[tuple[int, bool]]) -> None:
        """Several verdicts, as few sends as possible (one for up to ~1000)."""
        chunk = bytearray()
        for packet_id, accept in decisions:
            chunk += nfqmsg.build_verdict(self.queue_num, packet_id, accept)
            self.stats.inc(Counter.NFQUEUE_ACCEPTED if accept else Counter.NFQUEUE_REFUSED)
            if len(chunk) >= SEND_CHUNK:
                self._send(chunk)
                chunk = bytearray()
        if chunk:
            self._send(chunk)

    def _send(self, data: bytes | bytearray) -> None:
        try:
            self.sock.send(data)
        except OSError:
            self.stats.inc(Counter.NFQUEUE_VERDICT_ERRORS)

    def status(self) -> QueueStatus | None:
        """The kernel's view of this queue (waiting, dropped when full, dropped for our full
        buffer), from the /proc file of the queue's namespace (opened with the socket, so any
        thread may ask); None if the queue is not listed or the file could not be read."""
        if self._proc is None:
            return None
        try:
            os.lseek(self._proc, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(self._proc, 65536):
                chunks.append(chunk)
        except OSError:
            return None
        return nfqmsg.parse_queue_status(b"".join(chunks).decode()).get(self.queue_num)

    def close(self) -> None:
        """Unbind and close; every packet still awaiting a verdict is dropped by the kernel.
        Idempotent."""
        if self.closed:
            return
        self.closed = True
        try:
            self.sock.send(nfqmsg.build_unbind(self.queue_num, self._next_seq()))
        except OSError:
            pass  # closing the socket unbinds as well
        self.sock.close()
        if self._proc is not None:
            os.close(self._proc)

    def __enter__(self) -> NfQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        return self._seq

    def _request(self, message: bytes, timeout: float, what: str) -> None:
        """Send ``message`` (with NLM_F_ACK) and wait for its ack; packets that arrive first
        are kept for ``read_batch``."""
        seq = nfqmsg.split_messages(message)[0][0].seq
        self.sock.send(message)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SetupError(f"{what}: no answer from the kernel in {timeout}s")
            self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(self._buf)
            except TimeoutError:
                continue
            for msg in nfqmsg.split_messages(bytes(self._buf[:n]))[0]:
                ack = nfqmsg.parse_ack(msg)
                if ack is not None and ack.seq == seq:
                    if ack.errno:
                        raise SetupError(f"{what}: {_why(ack.errno)}")
                    return
                packet = nfqmsg.parse_packet(msg)
                if packet is not None:
                    self.stats.inc(Counter.NFQUEUE_PACKETS)
                    self._pending.append(packet)


def _open_status() -> int | None:
    try:
        return os.open(PROC_STATUS, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # no /proc: status() answers None


def _why(code: int) -> str:
    reason = errno.errorcode.get(code, str(code))
    if code == errno.EPERM:  # nfqnl_recv_config: the queue exists with another portid
        return (
            f"{reason}: another socket has bound this queue number (another proxy?), "
            "or CAP_NET_ADMIN is missing"
        )
    return f"{reason} ({os.strerror(code)})"


def _receive_buffer(sock: socket.socket, size: int) -> None:
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)  # root: beats rmem_max
    except PermissionError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)


# ---- the rule ------------------------------------------------------------------------------------


def rule_specs(
    queue_num: int, uplink: str, sources: Sequence[str], tunnel_port: int
) -> list[list[str]]:
    """iptables (or ip6tables) arguments of the queue rules for ``sources`` of one family:
    chain TENCRYPT-NFQ holds them, INPUT jumps to it for packets from the uplink. First the
    tunnel's port returns (sealed traffic is never queued), then new TCP and UDP connections
    from each source CIDR go to queue ``queue_num``, without bypass (fail closed)."""
    specs = [["-N", CHAIN], ["-A", CHAIN, "-p", "udp", "--dport", str(tunnel_port), "-j", "RETURN"]]
    for source in sources:
        for proto in ("tcp", "udp"):
            specs.append(
                [
                    "-A",
                    CHAIN,
                    "-s",
                    source,
                    "-p",
                    proto,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "NFQUEUE",
                    "--queue-num",
                    str(queue_num),
                ]
            )
    specs.append(["-I", "INPUT", "-i", uplink, "-j", CHAIN])
    return specs


def rule_specs_out(
    queue_num: int, uplink: str, dests: Sequence[str], mark: int, exempt: Sequence[str]
) -> list[list[str]]:
    """The outbound gate's rules (linux/inbound.py OutboundGate): chain TENCRYPT-NFQ-OUT, which
    OUTPUT jumps to for packets leaving by the uplink. The proxy's own packets (its tunnel, its
    clear, its DNS: marks whose low 16 bits are ``mark``) return, so do the ``exempt``
    addresses (the gateway, the DNS server: the pod's boundary), then new TCP and UDP
    connections to each destination CIDR go to ``queue_num``, without bypass (fail closed)."""
    specs = [
        ["-N", CHAIN_OUT],
        ["-A", CHAIN_OUT, "-m", "mark", "--mark", f"{mark:#x}/0xffff", "-j", "RETURN"],
        *(["-A", CHAIN_OUT, "-d", ip, "-j", "RETURN"] for ip in exempt),
    ]
    for dest in dests:
        for proto in ("tcp", "udp"):
            specs.append(
                ["-A", CHAIN_OUT, "-d", dest, "-p", proto, "-m", "conntrack", "--ctstate", "NEW"]
                + ["-j", "NFQUEUE", "--queue-num", str(queue_num)]
            )
    specs.append(["-I", "OUTPUT", "-o", uplink, "-j", CHAIN_OUT])
    return specs


def install_rules_out(
    queue_num: int, uplink: str, dests: Sequence[str], mark: int, exempt: Sequence[str]
) -> None:
    """Add the outbound gate's rules (IPv4 destinations; earlier ones removed first)."""
    _remove_out(uplink)
    v4 = [d for d in dests if ":" not in d]
    if v4:
        for spec in rule_specs_out(
            queue_num, uplink, v4, mark, [e for e in exempt if ":" not in e]
        ):
            _run("iptables", spec, check=True)


def _remove_out(uplink: str) -> None:
    while _run("iptables", ["-D", "OUTPUT", "-o", uplink, "-j", CHAIN_OUT], check=False) == 0:
        pass
    _run("iptables", ["-F", CHAIN_OUT], check=False)
    _run("iptables", ["-X", CHAIN_OUT], check=False)


def install_rules(queue_num: int, uplink: str, sources: Sequence[str], tunnel_port: int) -> None:
    """Add the queue rules in the current namespace (removing earlier ones first): IPv4
    sources with iptables, IPv6 sources (those with a colon) with ip6tables."""
    _remove_in(uplink)
    for tool in TOOLS:
        family = [s for s in sources if (":" in s) == (tool == "ip6tables")]
        if family:
            for spec in rule_specs(queue_num, uplink, family, tunnel_port):
                _run(tool, spec, check=True)


def remove_rules(uplink: str) -> None:
    """Remove the queue rules of both families and both directions if they are there; never
    fails because they are not."""
    _remove_out(uplink)
    _remove_in(uplink)


def _remove_in(uplink: str) -> None:
    for tool in TOOLS:
        while _run(tool, ["-D", "INPUT", "-i", uplink, "-j", CHAIN], check=False) == 0:
            pass
        _run(tool, ["-F", CHAIN], check=False)
        _run(tool, ["-X", CHAIN], check=False)


def _run(tool: str, args: list[str], check: bool) -> int:
    try:
        proc = subprocess.run([tool, "-w", "5", *args], capture_output=True, text=True, timeout=15)
    except FileNotFoundError as exc:
        raise SetupError(f"{tool} not found: standalone strict mode needs iptables-nft") from exc
    if check and proc.returncode != 0:
        raise SetupError(f"{tool} {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.returncode
