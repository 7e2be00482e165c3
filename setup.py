"""Builds lucid's native CPU kernel (the C++ sources in csrc/); everything else is in pyproject.toml.

The kernel is optional: without a C++17 compiler the install still succeeds
and lucid runs on XLA alone. It is compiled for the building machine's CPU
(``-march=native``); set ``LUCID_MARCH`` (e.g. ``x86-64-v3``) to build for
another target.
"""

import importlib.util
import os
import pathlib

from setuptools import Extension, setup

_SOURCES = ["csrc/ffi.cc", "csrc/forward.cc", "csrc/backward.cc"]
# Listed so that editing one rebuilds the kernel, and so that sdists carry them.
_HEADERS = [
    "csrc/simd.h", "csrc/reductions.h", "csrc/maps.h", "csrc/threading.h", "csrc/layout.h", "csrc/memory.h",
    "csrc/forward.h", "csrc/backward.h",
]


def _ffi_include_dir() -> str:
    """XLA's FFI headers ship with jaxlib (a build requirement); found without importing it."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("building lucid's native kernel needs jaxlib (listed in build-system.requires)")
    return str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "include")


setup(
    ext_modules=[
        Extension(
            "lucid._instance_norm_cpu",
            sources=_SOURCES,
            depends=_HEADERS,
            language="c++",
            extra_compile_args=[
                # XLA's headers as system headers: their warnings are not lucid's.
                "-isystem", _ffi_include_dir(),
                "-std=c++17", "-O3", f"-march={os.environ.get('LUCID_MARCH', 'native')}",
                "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
                # Only the two FFI handlers are exported (see csrc/ffi.cc).
                "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                "-Wall", "-Wextra",
            ],
            extra_link_args=["-pthread"],
            optional=True,
        )
    ]
)
