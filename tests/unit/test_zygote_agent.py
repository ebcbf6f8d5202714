"""The agent with ``--fork-proxies``: ``Supervisor.launch`` asks the zygote for the proxy
instead of exec'ing the launcher, and keeps the same record (the proxy's own PID and start
time), which ``alive`` then follows through /proc as it does an adopted proxy's."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tencrypt.agent.reconcile import Sandbox, Want
from tencrypt.agent.supervisor import Supervisor
from tencrypt.linux.zygote import ZygoteError


class FakeZygote:
    """Records each request; the "proxy" is a sleep this test starts."""

    def __init__(self, refuse: bool = False) -> None:
        self.requests: list[dict[str, object]] = []
        self.procs: list[subprocess.Popen[bytes]] = []
        self.refuse = refuse

    def spawn(self, netns, argv, log, env=None, timeout=30.0, before=None):  # type: ignore[no-untyped-def]
        self.requests.append(
            {"netns": str(netns), "argv": list(argv), "log": log, "env": env, "before": before}
        )
        if self.refuse:
            raise ZygoteError("the zygote is gone")
        self.procs.append(subprocess.Popen(["sleep", "60"]))
        return self.procs[-1].pid


def supervisor(tmp_path: Path, zygote: FakeZygote) -> Supervisor:
    sup = Supervisor(
        tmp_path / "state",
        Path("/opt/tencrypt-nsenter.sh"),
        Path("/opt/tencrypt"),
        ["--no-strict"],
        setup_state_dir=tmp_path / "setup",
        zygote=zygote,  # type: ignore[arg-type]
    )
    sup.prepare()
    return sup


WANT = Want("uid-1", "shop", "web-0", Sandbox(4242, 4026532999), "k1")


def test_launch_forks_the_proxy_after_the_launchers_setup(tmp_path):
    zygote = FakeZygote()
    sup = supervisor(tmp_path, zygote)
    try:
        rec = sup.launch(WANT)
        assert rec is not None and rec.proxy_pid == zygote.procs[0].pid and rec.proxy_start > 0
        (req,) = zygote.requests
        assert req["netns"] == "/proc/4242/ns/net"
        assert req["before"] == ["bash", "/opt/tencrypt-nsenter.sh", "4242", "--setup-only"]
        members = str(sup.feed.path("uid-1"))
        key = str(sup.key_file("shop"))
        assert req["argv"] == [
            "--psk-file",
            key,
            "--members-file",
            members,
            "--no-strict",
            "--state-dir",
            str(tmp_path / "setup"),
        ]
        env = req["env"]
        assert isinstance(env, dict) and f"--members-file {members}" in env["TENCRYPT_SETUP_ARGS"]
        assert env["TENCRYPT_BIN"] == "/opt/tencrypt" and "TENCRYPT_PROJECT_PSK" not in env
        assert req["log"] == sup.pod_dir("uid-1") / "proxy.log"
        assert (sup.pod_dir("uid-1") / "record.json").exists()
        assert "uid-1" not in sup.children  # not our child: followed by PID and start time
        assert sup.alive("uid-1")
        zygote.procs[0].kill()
        zygote.procs[0].wait()
        assert not sup.alive("uid-1")
    finally:
        for p in zygote.procs:
            p.kill()
            p.wait()


def test_a_zygote_that_cannot_fork_means_no_record(tmp_path):
    sup = supervisor(tmp_path, FakeZygote(refuse=True))
    assert sup.launch(WANT) is None
    assert "uid-1" not in sup.records
