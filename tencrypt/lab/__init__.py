"""A namespace cluster on one machine, used by the demo, the benchmarks and the tests.

``Lab`` (tencrypt.lab.cluster) builds and removes it; ``Topology``/``Pod``/``Node``/``Service``
(tencrypt.lab.topology) describe it. Import those modules directly; this package imports nothing
so that ``tencrypt lab`` and ``tencrypt demo`` pay only for what they use.
"""
