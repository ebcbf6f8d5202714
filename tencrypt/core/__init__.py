"""Pure code: bytes and ``now`` in, bytes and decisions out.

Modules here import only ``tencrypt.core``, ``tencrypt.errors``, cryptography, dnslib, numpy and
an allow-list of standard-library modules that compute on values: never I/O, processes, the
clock, randomness (``secrets``, ``random``: injected as parameters), ``tencrypt.linux``, the
daemon or the lab (tests/unit/test_purity.py enforces it and names the exceptions left).

``TUNNEL_PORT`` is defined here, once: the proxies' UDP port (core/wire.py's datagrams), which
Services also forward on TCP (node-sync, the lab). ``tencrypt run --port`` overrides it.
"""

from typing import Final

TUNNEL_PORT: Final = 1337
