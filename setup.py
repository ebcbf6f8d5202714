"""The one thing pyproject.toml cannot say: the optional C extension ``tencrypt._fastpath``.

It links the system's libcrypto (Debian: ``gcc``, ``python3-dev`` and ``libssl-dev`` to build)
and uses Python's limited API (abi3, 3.11+). ``optional=True``: a machine without a compiler
or the headers still installs Tencrypt and runs the pure-Python path (core/fastpath.py);
the daemon logs which one it runs, and ``TENCRYPT_REQUIRE_FASTPATH=1`` makes the absence of
the extension an error (CI sets it).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "tencrypt._fastpath",
            sources=["tencrypt/_fastpath.c", "tencrypt/_fastpath_tcp.c", "tencrypt/_lane.c"],
            depends=["tencrypt/_fastpath.h"],
            libraries=["crypto"],
            define_macros=[("Py_LIMITED_API", "0x030B0000")],
            extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra"],
            py_limited_api=True,
            optional=True,
        )
    ],
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
