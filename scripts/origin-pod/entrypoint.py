"""Entry point of the patched origin-pod (pod infrastructure) image.

The infrastructure container holds the pod's network namespace. This entry point decides,
once, at start:

1. **No NET_ADMIN or no NET_RAW** in the effective capability set (the normal case: the
   runtime did not grant them; the proxy needs both: tenc0 and routes, raw-socket injection), or ``TENCRYPT_DISABLE=1``, or no project key: become the original pod binary
   (``exec`` of ``TENCRYPT_ORIGINAL_ENTRYPOINT``, default ``/usr/bin/pod``, with this
   process's arguments). From then on it *is* the original: it sleeps until signalled. If the
   original binary is missing, sleep until SIGTERM/SIGINT here, and exit 0, as it would.
2. **NET_ADMIN, NET_RAW and a key**: create ``/dev/net/tun`` if the runtime left it out, then
   ``tencrypt setup`` in this namespace, then supervise
   ``tencrypt run --psk-file FILE``. If it dies, the setup is undone at once (Service traffic
   must not stay routed into a tenc0 nobody reads) and redone before a restart with a capped
   backoff. On SIGTERM or
   SIGINT: stop the proxy, ``tencrypt setup --undo``, exit 0. If setup fails the pod keeps
   working unencrypted (the failure is logged) unless ``TENCRYPT_REQUIRED=1``, which makes it
   exit 1 so the runtime restarts the sandbox instead.

As PID 1 it also reaps orphans (``os.wait``), which the original pause binary does too.

Environment:
  TENCRYPT_PSK_FILE            project key file (default /etc/tencrypt/PROJECT_PSK), else
  TENCRYPT_PROJECT_PSK         the key itself (32 random bytes, base64)
  TENCRYPT_ORIGINAL_ENTRYPOINT the original image's entry point (default /usr/bin/pod)
  TENCRYPT_SETUP_ARGS          extra words for `tencrypt setup` (e.g. --service-cidr ...)
  TENCRYPT_RUN_ARGS            extra words for `tencrypt run` (e.g. --metrics 127.0.0.1:9137)
  TENCRYPT_BIN                 tencrypt command (default: this Python with -m tencrypt)
  TENCRYPT_DISABLE=1, TENCRYPT_REQUIRED=1  see above
"""

from __future__ import annotations

import os
import shlex
import signal
import stat
import subprocess
import sys
import time

CAP_NET_ADMIN = 12  # linux/capability.h
CAP_NET_RAW = 13  # linux/capability.h
NEEDED_CAPS = {"NET_ADMIN": CAP_NET_ADMIN, "NET_RAW": CAP_NET_RAW}  # tenc0 + routes; raw inject
DEFAULT_PSK_FILE = "/etc/tencrypt/PROJECT_PSK"
MAX_BACKOFF = 30.0
TUN_DEVICE = "/dev/net/tun"


class Stop(Exception):
    """Raised by the signal handler to leave a blocking wait."""


def say(msg: str) -> None:
    print(f"tencrypt-pod: {msg}", file=sys.stderr, flush=True)


def has_cap(cap: int) -> bool:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> cap & 1)
    return False


def tencrypt_cmd() -> list[str]:
    custom = os.environ.get("TENCRYPT_BIN")
    return shlex.split(custom) if custom else [sys.executable, "-m", "tencrypt"]


def key_file() -> str | None:
    """The key as a file path (an env key is written to a private file under /run: the
    proxy reads files or env, and a file keeps it out of /proc/PID/environ of the proxy)."""
    path = os.environ.get("TENCRYPT_PSK_FILE", DEFAULT_PSK_FILE)
    if os.path.isfile(path):
        return path
    key = os.environ.get("TENCRYPT_PROJECT_PSK")
    if not key:
        return None
    os.makedirs("/run/tencrypt", mode=0o700, exist_ok=True)
    target = "/run/tencrypt/PROJECT_PSK"
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(key.strip() + "\n")
    return target


def ensure_tun_device() -> None:
    """Container runtimes do not put /dev/net/tun in a container unless asked (``--device``),
    but their default device cgroup allows it (runc's and crun's default rules include
    c 10:200): make the node if it is missing. That needs CAP_MKNOD, a default capability of
    Docker but not of podman 4 or CRI-O: there, give the device (``--device /dev/net/tun``)."""
    if os.path.exists(TUN_DEVICE):
        return
    try:
        os.makedirs(os.path.dirname(TUN_DEVICE), exist_ok=True)
        os.mknod(TUN_DEVICE, 0o600 | stat.S_IFCHR, os.makedev(10, 200))  # linux/miscdevice.h
        say(f"created {TUN_DEVICE}")
    except OSError as exc:
        say(f"cannot create {TUN_DEVICE} ({exc.strerror}): give the container the device")


def be_original(argv: list[str]) -> None:
    """Become the original pod binary; without one, sleep until signalled and exit 0."""
    original = os.environ.get("TENCRYPT_ORIGINAL_ENTRYPOINT", "/usr/bin/pod")
    if os.access(original, os.X_OK):
        os.execv(original, [original, *argv])
    say(f"{original} not found: sleeping until signalled")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    sys.exit(0)


def on_signal(signum: int, frame: object) -> None:
    raise Stop


def run_proxy(cmd: list[str], psk: str) -> int:
    """Run the proxy until it exits (its exit code) or a signal comes (Stop, proxy stopped);
    reap every child meanwhile, as PID 1 must."""
    run = [*cmd, "run", "--psk-file", psk, *shlex.split(os.environ.get("TENCRYPT_RUN_ARGS", ""))]
    proxy = subprocess.Popen(run)
    say(f"proxy started (pid {proxy.pid})")
    try:
        while True:
            pid, status = os.wait()
            if pid == proxy.pid:
                proxy.returncode = os.waitstatus_to_exitcode(status)
                return proxy.returncode
    except Stop:
        stop_proxy(proxy)
        raise


def stop_proxy(proxy: subprocess.Popen[bytes]) -> None:
    if proxy.poll() is None:
        proxy.terminate()
        try:
            proxy.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()


def main(argv: list[str]) -> int:
    if os.environ.get("TENCRYPT_DISABLE") == "1":
        be_original(argv)
    missing = [name for name, cap in NEEDED_CAPS.items() if not has_cap(cap)]
    if missing:
        say(f"no {' or '.join(missing)}: not patching this pod")
        be_original(argv)
    psk = key_file()
    if psk is None:
        say("no project key (TENCRYPT_PSK_FILE / TENCRYPT_PROJECT_PSK): not patching this pod")
        be_original(argv)
    cmd = tencrypt_cmd()
    ensure_tun_device()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return patch(cmd, psk, argv)
    except Stop:
        say("stopping: undoing setup")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        undo(cmd)
        return 0


def patch(cmd: list[str], psk: str, argv: list[str]) -> int:
    """setup → proxy; when the proxy dies, undo first (the pod's Service traffic must not
    stay routed into a tenc0 nobody reads), then set up and start it again after a backoff."""
    setup = [*cmd, "setup", *shlex.split(os.environ.get("TENCRYPT_SETUP_ARGS", ""))]
    required = os.environ.get("TENCRYPT_REQUIRED") == "1"
    backoff = 1.0
    while True:
        if subprocess.run(setup).returncode != 0:
            undo(cmd)
            if required:
                say("tencrypt setup failed and TENCRYPT_REQUIRED=1: exiting")
                return 1
            say("tencrypt setup failed: this pod stays UNENCRYPTED")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            be_original(argv)
        started = time.monotonic()
        code = run_proxy(cmd, psk)
        undo(cmd)
        if required:
            say(f"proxy exited ({code}) and TENCRYPT_REQUIRED=1: exiting")
            return 1
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF)
        say(f"proxy exited ({code}): pod UNENCRYPTED until the restart in {backoff:.0f}s")
        time.sleep(backoff)  # a signal here raises Stop: the undo is already done


def undo(cmd: list[str]) -> None:
    subprocess.run([*cmd, "setup", "--undo"], stdout=subprocess.DEVNULL)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
