"""The proxy's key file at run time (daemon.Proxy.reload_keys, through in-memory ports): a new
ring is applied without a restart and shown in /status and /metrics, the ring loaded is
recorded for the agent, a malformed file changes nothing."""

from __future__ import annotations

import asyncio
import os

from tencrypt.core.classify import AddrClass
from tencrypt.core.psk import KeySet, fingerprint
from tencrypt.core.session import Limits
from tencrypt.linux.keyfile import KeyFile, read_loaded, write_key_file
from tests.unit.fakes import PSK, Pod, Wire, udp_packet

A, B, VIP_B = "10.128.0.11", "10.128.0.12", "172.30.0.12"
K2 = os.urandom(32)
LIMITS = Limits(rekey_after_time=10.0, reject_after_time=15.0)


def with_keyfile(pod: Pod, directory) -> None:
    directory.mkdir()
    pod.proxy.keyfile = KeyFile(write_key_file(directory / "ring", KeySet(PSK)), pod.stats)
    pod.proxy.keyfile.load()
    pod.proxy.loaded_dir = directory


def rotate(pods: list[Pod], keys: KeySet, tmp_path) -> None:
    for pod in pods:
        write_key_file(pod.proxy.keyfile.path, keys)
        pod.proxy.reload_keys(force=False)


def test_a_new_ring_is_applied_without_a_restart_and_the_next_rekey_uses_it(tmp_path):
    async def main():
        a, b = Pod(A, ptr={VIP_B: AddrClass.INTERNAL}, limits=LIMITS), Pod(B, limits=LIMITS)
        for pod, name in ((a, "a"), (b, "b")):
            with_keyfile(pod, tmp_path / name)
            await pod.proxy.prepare()
        wire = Wire(a, b, vips={VIP_B: B})
        a.app_sends(udp_packet(A, VIP_B, b"first"))
        for _ in range(5):
            await asyncio.sleep(0)
        wire.pump()
        await b.proxy.effects.round()
        tunnel = a.proxy.tunnel
        assert len(b.inject.sent) == 1 and tunnel.handshakes_by_key == {fingerprint(PSK): 1}
        rotate([a, b], KeySet(PSK, next=K2), tmp_path)
        rotate([b, a], KeySet(K2, previous=PSK), tmp_path)
        assert a.stats.get("key_reloads") == 2 and read_loaded(tmp_path / "a") == (
            f"current={fingerprint(K2)},previous={fingerprint(PSK)}"
        )
        doc = a.proxy.status()
        assert doc["keys"] == [
            {"role": "current", "fingerprint": fingerprint(K2), "sessions": 0, "handshakes": 0},
            {"role": "previous", "fingerprint": fingerprint(PSK), "sessions": 1, "handshakes": 1},
        ]
        for pod in (a, b):
            pod.clock.now += LIMITS.rekey_after_time + 1
        a.app_sends(udp_packet(A, VIP_B, b"second"))  # sealed on the old session, and re-keyed
        wire.pump()
        a.app_sends(udp_packet(A, VIP_B, b"third"))
        wire.pump()
        assert [p[-5:] for p in b.inject.sent] == [b"first", b"econd", b"third"]
        assert tunnel.table.by_addr[VIP_B].current.key == fingerprint(K2)
        metrics = a.proxy.render_metrics()
        fp2 = fingerprint(K2)
        assert f'tencrypt_key_sessions{{fingerprint="{fp2}",role="current"}} 1' in metrics
        assert f'tencrypt_key_handshakes_total{{fingerprint="{fingerprint(K2)}"}} 1' in metrics
        assert "tencrypt_key_reloads_total 2" in metrics

    asyncio.run(main())


def test_a_malformed_file_keeps_the_ring_and_is_counted(tmp_path):
    async def main():
        a = Pod(A)
        with_keyfile(a, tmp_path / "a")
        await a.proxy.prepare()
        ring = a.proxy.tunnel.ring
        a.proxy.keyfile.path.write_text("current !!\n")
        a.proxy.reload_keys(force=False)
        assert a.proxy.tunnel.ring is ring and a.stats.get("key_reload_refusals") == 1
        assert "tencrypt_key_reload_refusals_total 1" in a.proxy.render_metrics()
        a.proxy.reload_keys()  # SIGHUP: re-read though unchanged, refused again
        assert a.stats.get("key_reload_refusals") == 2

    asyncio.run(main())
