"""Kubernetes test doubles shared by unit and namespace tests (never shipped in the wheel or
the node image): ``fakeapi.FakeApiServer``, an API server double the real client talks to,
and ``builders``, the objects it serves."""
