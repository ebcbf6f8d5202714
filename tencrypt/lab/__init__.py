"""A namespace cluster on one machine, used by the demo, the benchmarks and the tests."""
