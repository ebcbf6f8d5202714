"""The userspace tunnels a user would pick instead of Tencrypt, between two lab pods.

Each ``*_up`` builds one tunnel from pod A (client) to pod B (server) and returns a ``Tunnel``;
``Tunnel.stop`` takes it down again (processes, control sockets, the temporary key directory).
Stages of ``wireguard_up`` and ``openvpn_up`` alike:
 1. keys (WireGuard: X25519; OpenVPN: a self-signed ECDSA P-256 certificate per side, pinned by
    its SHA-256 fingerprint) generated locally into the tunnel's own temporary directory;
 2. one daemon per pod namespace, in the foreground, its output in that directory;
 3. addresses of the tunnel's own (``10.201.0.0/30`` WireGuard, ``10.202.0.0/30`` OpenVPN),
    MTU the pod's minus 80 (wireguard-go's own default rule: 1420 on a 1500 link); with
    ``ipv6`` (a dual-stack run) WireGuard's tunnel also carries inner IPv6 between
    ``fd00:201::1/126`` and ``::2`` (each peer's AllowedIPs gain the other's /128, the addresses
    are added ``nodad``: usable at once), its outer packets staying IPv4 between the pod IPs as
    Tencrypt's do; OpenVPN stays IPv4-only;
 4. wait until the tunnel is up (WireGuard: both control sockets; OpenVPN: "Initialization
    Sequence Completed" on both sides and the negotiated data cipher is CHACHA20-POLY1305);
 5. the daemons' UDP sockets get the buffers Tencrypt gives its own (8 MiB,
    ``SO_RCVBUFFORCE``/``SO_SNDBUFFORCE``). Neither daemon can be told to force them (the Debian
    wireguard-go sets none; OpenVPN's ``--rcvbuf`` stops at ``net.core.rmem_max``) and the
    machine-wide defaults must not be touched on a shared host, so the harness takes a copy of
    each socket with ``pidfd_getfd(2)`` and sets the option on that: same socket, same effect.

Missing Debian packages are installed by ``install_packages`` (``apt-get install -y``, with one
``apt-get update`` first when the package lists are stale), and it says so; what a plan needs,
and what it does without a system that cannot be had, is bench/plan.py's ``peer_tools`` and
``skip_system``.
"""

from __future__ import annotations

import base64
import ctypes
import datetime
import functools
import hashlib
import os
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.x509.oid import NameOID

from tencrypt.errors import SetupError
from tencrypt.lab.topology import Pod
from tencrypt.linux import netns

WIREGUARD, OPENVPN = "wireguard-go", "openvpn"
# system -> {binary: Debian package}
TOOLS: dict[str, dict[str, str]] = {
    WIREGUARD: {"wireguard-go": "wireguard-go", "wg": "wireguard-tools"},
    OPENVPN: {"openvpn": "openvpn"},
}
BUFFER_BYTES = 8 * 1024 * 1024  # as tencrypt/linux/sockets.py gives the proxy's socket
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32  # asm-generic/socket.h
SYS_PIDFD_GETFD = 438  # asm-generic/unistd.h (the same number on every architecture)
BINARY_SYSTEMS = (WIREGUARD, OPENVPN)  # what --peer-binary SYSTEM=PATH may name
WG_PORT, OVPN_PORT = 51820, 1194
WG_RUN = Path("/var/run/wireguard")  # shared by all namespaces: interface names must differ
MTU_OVERHEAD = 80
UP_TIMEOUT = 30.0
# a machine that cannot reach its mirror says so in seconds, not after apt's default retries
APT_NETWORK = ["-o", "Acquire::Retries=1", "-o", "Acquire::http::Timeout=20"]
APT_TIMEOUT = 300.0  # seconds per apt-get run


@dataclass(slots=True)
class Tunnel:
    system: str
    client_ns: str
    server_ns: str
    client_if: str
    server_addr: str  # the address the client reaches the server pod at, through the tunnel
    workdir: Path
    server_addr6: str | None = None  # the same over inner IPv6 (None: IPv4 only)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    rcvbuf: list[int] = field(default_factory=list)  # SO_RCVBUF read back (kernel doubles it)
    note: str = ""
    cleanup_paths: list[Path] = field(default_factory=list)

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for path in self.cleanup_paths:
            path.unlink(missing_ok=True)
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- packages ------------------------------------------------------------------------------


def absent(tools: dict[str, str]) -> dict[str, str]:
    """The ``{binary: package}`` of ``tools`` whose binary is not on PATH."""
    return {binary: pkg for binary, pkg in tools.items() if not shutil.which(binary)}


def missing_packages(systems: list[str]) -> list[str]:
    return sorted({pkg for system in systems for pkg in absent(TOOLS.get(system, {})).values()})


def install_packages(packages: list[str], say: Callable[[str], None]) -> None:
    """``apt-get install -y`` the Debian ``packages`` (one ``apt-get update`` first when the
    package lists do not know one); a ``SetupError`` saying why when that fails."""
    if not packages:
        return
    say(f"installing missing Debian packages: {' '.join(packages)} (apt-get install -y)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", *APT_NETWORK, "install", "-y", "-q", "--no-install-recommends", *packages]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
    if proc.returncode != 0 and (
        "Unable to locate" in proc.stderr or "no installation candidate" in proc.stderr
    ):
        say("package not in the local lists: apt-get update first")
        update = ["apt-get", *APT_NETWORK, "update", "-q"]
        subprocess.run(update, capture_output=True, env=env, timeout=APT_TIMEOUT)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=APT_TIMEOUT)
    if proc.returncode != 0:
        raise SetupError(
            f"apt-get install {' '.join(packages)} failed ({proc.returncode}):\n"
            f"{proc.stderr.strip()[-500:]}"
        )


def ensure_tools(systems: list[str], say: Callable[[str], None]) -> None:
    """Install the Debian packages the peer tunnels in ``systems`` need, if any is missing."""
    install_packages(missing_packages(systems), say)
    still = missing_packages(systems)
    if still:
        raise SetupError(f"installed, but still missing: {' '.join(still)}")


def version(system: str) -> str:
    """The installed version of a peer tunnel (for the report), or ``""``."""
    package = {WIREGUARD: "wireguard-go", OPENVPN: "openvpn"}.get(system)
    if not package:
        return ""
    proc = subprocess.run(
        ["dpkg-query", "-W", "-f", "${Version}", package],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.stdout.strip() if proc.returncode == 0 else ""


def binary_version(path: str) -> str:
    """The first line of ``PATH --version`` minus the program's name ("v0.0.20250522" for
    wireguard-go, "2.6.3" for OpenVPN), or ``""``; the label of a --peer-binary."""
    try:
        proc = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    words = (proc.stdout or proc.stderr).strip().split("\n", 1)[0].split()
    return " ".join(words[1:2]) if len(words) > 1 else " ".join(words)


# --- socket buffers ------------------------------------------------------------------------


def _udp_inodes(pid: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        inodes.update(line.split()[9] for line in lines if len(line.split()) > 9)
    return inodes


def force_socket_buffers(pid: int, size: int = BUFFER_BYTES) -> list[int]:
    """Give every UDP socket of process ``pid`` ``size``-byte buffers, as its owner would with
    SO_RCVBUFFORCE/SO_SNDBUFFORCE. Returns each socket's SO_RCVBUF read back."""
    libc = ctypes.CDLL(None, use_errno=True)
    inodes, results = _udp_inodes(pid), []
    pidfd = os.pidfd_open(pid)
    try:
        for entry in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(entry)
            except OSError:
                continue
            if not (target.startswith("socket:[") and target[8:-1] in inodes):
                continue
            copy = libc.syscall(SYS_PIDFD_GETFD, pidfd, int(entry.name), 0)
            if copy < 0:
                raise SetupError(
                    f"pidfd_getfd({pid}, {entry.name}): {os.strerror(ctypes.get_errno())}"
                )
            with socket.socket(fileno=copy) as sock:  # closing the copy leaves theirs open
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
                sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, size)
                results.append(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))
    finally:
        os.close(pidfd)
    if not results:
        raise SetupError(f"process {pid} has no UDP socket to give buffers to")
    return results


# --- WireGuard (wireguard-go) --------------------------------------------------------------


def _wg_key() -> tuple[str, str]:
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode(), base64.b64encode(pub).decode()


def _secret(path: Path, text: str | bytes) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(text.encode() if isinstance(text, str) else text)
    return path


def _tunnel(system: str, a: Pod, b: Pod, client_if: str, server_addr: str) -> Tunnel:
    workdir = Path(tempfile.mkdtemp(prefix=f"tencrypt-bench-{system}-"))
    workdir.chmod(0o700)
    return Tunnel(system, a.netns, b.netns, client_if, server_addr, workdir)


def wireguard_up(
    a: Pod, b: Pod, suffix: str, binary: str = "wireguard-go", ipv6: bool = False
) -> Tunnel:
    """wireguard-go (``binary``: the Debian one, or any other build) from ``a`` to ``b``: ``a``
    is 10.201.0.1, ``b`` 10.201.0.2; with ``ipv6`` also fd00:201::1 and fd00:201::2 inside."""
    names = {a.name: f"wg{suffix}a", b.name: f"wg{suffix}b"}
    addrs = {a.name: "10.201.0.1", b.name: "10.201.0.2"}
    addrs6 = {a.name: "fd00:201::1", b.name: "fd00:201::2"}
    tun = _tunnel(WIREGUARD, a, b, names[a.name], addrs[b.name])
    if ipv6:
        tun.server_addr6 = addrs6[b.name]
    try:
        keys = {pod.name: _wg_key() for pod in (a, b)}
        mtu = a.mtu - MTU_OVERHEAD
        for pod, peer in ((a, b), (b, a)):
            ifname = names[pod.name]
            sock = WG_RUN / f"{ifname}.sock"
            tun.cleanup_paths.append(sock)
            log = tun.workdir / f"{ifname}.log"
            proc = netns.spawn(
                pod.netns, [binary, "-f", ifname], log=log, env={"WG_PROCESS_FOREGROUND": "1"}
            )
            tun.procs.append(proc)
            _wait(functools.partial(_wg_started, proc, log, sock), f"wireguard-go {ifname}")
            key = _secret(tun.workdir / f"{pod.name}.key", keys[pod.name][0] + "\n")
            netns.run(
                pod.netns,
                [
                    "wg",
                    "set",
                    ifname,
                    "private-key",
                    str(key),
                    "listen-port",
                    str(WG_PORT),
                    "peer",
                    keys[peer.name][1],
                    "allowed-ips",
                    f"{addrs[peer.name]}/32" + (f",{addrs6[peer.name]}/128" if ipv6 else ""),
                    "endpoint",
                    f"{peer.ip}:{WG_PORT}",
                ],
            )
            if ipv6:  # before the link is up: no duplicate address detection to wait for
                netns.run(
                    pod.netns,
                    ["ip", "-6", "addr", "add", f"{addrs6[pod.name]}/126", "dev", ifname, "nodad"],
                )
            _address(pod.netns, ifname, f"{addrs[pod.name]}/30", mtu)
        tun.rcvbuf = [n for p in tun.procs for n in force_socket_buffers(p.pid)]
        tun.note = f"MTU {mtu}" + (", inner IPv6 fd00:201::/126 too" if ipv6 else "")
    except BaseException:
        tun.stop()
        raise
    return tun


def _wg_started(proc: subprocess.Popen[bytes], log: Path, sock: Path) -> bool:
    return _alive(proc, log) and sock.exists()


# --- OpenVPN -------------------------------------------------------------------------------


def _certificate(name: str, workdir: Path) -> tuple[Path, Path, str]:
    """A self-signed ECDSA P-256 certificate: (cert file, key file, SHA-256 fingerprint)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    der = cert.public_bytes(serialization.Encoding.DER)
    fingerprint = ":".join(f"{byte:02x}" for byte in hashlib.sha256(der).digest())
    cert_file = workdir / f"{name}.crt"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file = _secret(
        workdir / f"{name}.key",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert_file, key_file, fingerprint


def openvpn_up(a: Pod, b: Pod, suffix: str, binary: str = "openvpn") -> Tunnel:
    """OpenVPN 2.6 peer-to-peer over UDP with TLS, CHACHA20-POLY1305; ``b`` is the TLS server.
    ``a`` is 10.202.0.1, ``b`` 10.202.0.2."""
    names = {a.name: f"ovpn{suffix}a", b.name: f"ovpn{suffix}b"}
    addrs = {a.name: "10.202.0.1", b.name: "10.202.0.2"}
    tun = _tunnel(OPENVPN, a, b, names[a.name], addrs[b.name])
    try:
        certs = {pod.name: _certificate(pod.name, tun.workdir) for pod in (a, b)}
        mtu = a.mtu - MTU_OVERHEAD
        logs = []
        for pod, peer in ((b, a), (a, b)):  # the TLS server first
            cert, key, _ = certs[pod.name]
            role = ["--tls-server", "--dh", "none"] if pod is b else ["--tls-client"]
            argv = [
                binary,
                "--dev",
                names[pod.name],
                "--dev-type",
                "tun",
                "--proto",
                "udp",
                "--port",
                str(OVPN_PORT),
                "--remote",
                peer.ip,
                "--ifconfig",
                addrs[pod.name],
                addrs[peer.name],
                "--tun-mtu",
                str(mtu),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--peer-fingerprint",
                certs[peer.name][2],
                "--data-ciphers",
                "CHACHA20-POLY1305",
                "--disable-dco",
                "--sndbuf",
                str(BUFFER_BYTES),
                "--rcvbuf",
                str(BUFFER_BYTES),
                "--verb",
                "3",
                *role,
            ]
            log = tun.workdir / f"{names[pod.name]}.log"
            tun.procs.append(netns.spawn(pod.netns, argv, log=log))
            logs.append(log)
        for proc, log in zip(tun.procs, logs, strict=True):
            _wait(functools.partial(_openvpn_started, proc, log), f"OpenVPN ({log.name})")
        tun.note = f"MTU {mtu}, " + _negotiated_cipher(logs[1])
        tun.rcvbuf = [n for p in tun.procs for n in force_socket_buffers(p.pid)]
    except BaseException:
        tun.stop()
        raise
    return tun


def _openvpn_started(proc: subprocess.Popen[bytes], log: Path) -> bool:
    return _alive(proc, log) and "Initialization Sequence Completed" in log.read_text(
        errors="replace"
    )


def _negotiated_cipher(log: Path) -> str:
    for line in log.read_text(errors="replace").splitlines():
        if "NCP negotiation result" in line:
            if "CHACHA20-POLY1305" not in line:
                raise SetupError(f"OpenVPN negotiated another cipher: {line.strip()}")
            return "data cipher CHACHA20-POLY1305 (P2P NCP)"
    raise SetupError(f"OpenVPN did not log its cipher negotiation ({log})")


# --- shared --------------------------------------------------------------------------------


def _alive(proc: subprocess.Popen[bytes], log: Path) -> bool:
    """True while ``proc`` runs; a SetupError quoting its log once it has exited."""
    if proc.poll() is not None:
        tail = log.read_text(errors="replace")[-500:] if log.exists() else "(no output)"
        raise SetupError(f"exited with code {proc.returncode}: {tail}")
    return True


def _wait(predicate: Callable[[], bool], what: str) -> None:
    netns.wait_for(predicate, timeout=UP_TIMEOUT, interval=0.05, what=what)


def _address(ns: str, ifname: str, cidr: str, mtu: int) -> None:
    netns.run(ns, ["ip", "addr", "add", cidr, "dev", ifname])
    netns.run(ns, ["ip", "link", "set", ifname, "mtu", str(mtu), "up"])
