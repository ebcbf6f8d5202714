"""Pure code: bytes and ``now`` in, bytes and decisions out.

Modules here never import socket, os, select, asyncio, time, subprocess or pyroute2
(tests/unit/test_purity.py enforces it).
"""
