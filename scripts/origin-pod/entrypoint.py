"""Entry point of the patched origin-pod (pod infrastructure) image.

The infrastructure container holds the pod's network namespace. This entry point decides,
once, at start:

1. **No NET_ADMIN** in the effective capability set (the normal case: the runtime did not
   grant it), or ``TENCRYPT_DISABLE=1``, or no project key: become the original pod binary
   (``exec`` of ``TENCRYPT_ORIGINAL_ENTRYPOINT``, default ``/usr/bin/pod``, with this
   process's arguments). From then on it *is* the original: it sleeps until signalled. If the
   original binary is missing, sleep until SIGTERM/SIGINT here, and exit 0, as it would.
2. **NET_ADMIN and a key**: ``tencrypt setup`` in this namespace, then supervise
   ``tencrypt run --psk-file FILE`` (restarted with a capped backoff if it dies). On SIGTERM or
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
import subprocess
import sys
import time

CAP_NET_ADMIN = 12  # linux/capability.h
DEFAULT_PSK_FILE = "/etc/tencrypt/PROJECT_PSK"
MAX_BACKOFF = 30.0


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


def supervise(cmd: list[str], psk: str) -> None:
    """Run the proxy until told to stop; restart it if it dies; reap every child."""
    run = [*cmd, "run", "--psk-file", psk, *shlex.split(os.environ.get("TENCRYPT_RUN_ARGS", ""))]
    backoff = 1.0
    while True:
        started = time.monotonic()
        proxy = subprocess.Popen(run)
        say(f"proxy started (pid {proxy.pid})")
        try:
            while True:
                pid, status = os.wait()  # reaps orphans too, as PID 1 must
                if pid == proxy.pid:
                    proxy.returncode = os.waitstatus_to_exitcode(status)
                    break
        except Stop:
            stop_proxy(proxy)
            raise
        say(f"proxy exited ({proxy.returncode}); restarting in {backoff:.0f}s")
        backoff = 1.0 if time.monotonic() - started > 60 else min(backoff * 2, MAX_BACKOFF)
        time.sleep(backoff)  # a signal here raises Stop: nothing to stop, undo follows


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
    if not has_cap(CAP_NET_ADMIN):
        say("no NET_ADMIN: not patching this pod")
        be_original(argv)
    psk = key_file()
    if psk is None:
        say("NET_ADMIN but no project key (TENCRYPT_PSK_FILE / TENCRYPT_PROJECT_PSK): "
            "not patching this pod")
        be_original(argv)
    cmd = tencrypt_cmd()
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    setup = [*cmd, "setup", *shlex.split(os.environ.get("TENCRYPT_SETUP_ARGS", ""))]
    try:
        if subprocess.run(setup).returncode != 0:
            if os.environ.get("TENCRYPT_REQUIRED") == "1":
                say("tencrypt setup failed and TENCRYPT_REQUIRED=1: exiting")
                return 1
            say("tencrypt setup failed: this pod stays UNENCRYPTED")
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            be_original(argv)
        supervise(cmd, psk)
    except Stop:
        say("stopping: undoing setup")
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        subprocess.run([*cmd, "setup", "--undo"])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
