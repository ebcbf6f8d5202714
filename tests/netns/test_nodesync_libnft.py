"""node-sync's nft backend writes through libnftables in its own process, or through
``nft -f`` where the library cannot be loaded: both give the same table on a real node (the
node of tests/netns/test_nodesync.py: a bridge, pods answering their names on :1337)."""

import subprocess

import pytest

from tencrypt.errors import SetupError
from tencrypt.nodesync.backends import program_objects
from tencrypt.nodesync.cluster import ServiceBackends
from tencrypt.nodesync.nft import NftApplier
from tests.netns import test_nodesync
from tests.netns.test_nodesync import CACHE, PODS, WEB

node = test_nodesync.node  # the same fixture: a node namespace, removed afterwards


def test_libnftables_and_nft_f_program_the_same_table_and_refusals_change_nothing(node):
    """The nft backend's in-process path (libnftables, one context per applier, the node's
    namespace entered per call) and its fallback (`nft -f`) write the same table; a
    transaction the kernel refuses is a SetupError and leaves the table as it was."""
    state = [
        ServiceBackends("shop", "web", WEB, (PODS["w1"], PODS["w2"])),
        ServiceBackends("shop", "cache", CACHE, (PODS["w3"],)),
    ]

    def root_tables():
        return subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout

    root = root_tables()
    listings = []
    for library in (True, False):
        applier = NftApplier(node.node, library=library)
        applier.apply(state, full=True)
        moved = [state[0], ServiceBackends("shop", "cache", CACHE, (PODS["w2"],))]
        applier.apply(moved, touched={CACHE})
        assert (applier._lib is not None) is library
        listings.append(node.listing())
        assert node.ask("udp", CACHE) == ["w2"] and set(node.ask("udp", WEB, count=30)) == {
            "w1",
            "w2",
        }
        applier.cleanup()
        assert node.listing() == ""
    assert listings[0] == listings[1] and "10.128.0.12" in listings[0]
    assert root_tables() == root  # nothing of it landed in this (the root) namespace
    applier = NftApplier(node.node)
    applier.apply(state, full=True)
    before = node.listing()
    with pytest.raises(SetupError, match="nft refused"):
        applier._transaction(
            "add element inet tencrypt vips4 { 172.30.1.1 . udp . 1337 : goto pick-9 }\n"
        )
    assert node.listing() == before
    program_objects([], netns=node.node)  # the lab's path, through the library too
    applier.cleanup()
