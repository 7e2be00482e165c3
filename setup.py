"""Builds lucid's native CPU kernel (the C++ sources in csrc/); everything else is in pyproject.toml.

The kernel is optional: without a C++17 compiler the install still succeeds
and lucid runs on XLA alone. The build is portable: the same sources are
compiled once per instruction-set level (one shared library each, see
``_PATHS``), and lucid loads the best one the running CPU supports. Levels the
compiler cannot target are skipped. What was built, and every compiler message
(errors and warnings), is recorded in ``lucid/_instance_norm_cpu.json``, shipped
with the libraries, which ``lucid.nn.functional.native_kernel_status()`` reports.

``LUCID_SANITIZE=1`` builds with AddressSanitizer and UBSan instead (see
tools/sanitize.sh).
"""

import datetime
import importlib.util
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import threading

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError, CompileError, ExecError

_HERE = pathlib.Path(__file__).resolve().parent
STEM = "_instance_norm_cpu"
RECORD = STEM + ".json"  # the build record, next to the libraries
_SOURCES = ["csrc/ffi.cc", "csrc/forward.cc", "csrc/backward.cc"]
# The baseline library also reports the CPU's features, so Python can choose among the others.
_CPU_FEATURES_SOURCE = "csrc/cpu_features.cc"
# Listed so that editing one rebuilds the kernel; MANIFEST.in puts all of csrc/ in the sdist.
_HEADERS = [
    "csrc/simd.h", "csrc/reductions.h", "csrc/maps.h", "csrc/threading.h", "csrc/layout.h", "csrc/memory.h",
    "csrc/forward.h", "csrc/backward.h", "csrc/exports.map",
]

# The instruction-set paths, lowest first: (name, CPU features). A feature's name is both GCC/Clang's
# -m flag (without the -m) and its name for __builtin_cpu_supports (csrc/cpu_features.cc), so the
# flags a library is compiled with are exactly the features checked before it is loaded.
_X86_V3 = ("avx", "avx2", "fma", "f16c", "bmi", "bmi2")  # x86-64-v3 (less MOVBE/LZCNT, unused here)
_X86_V4 = _X86_V3 + ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")  # x86-64-v4
_PATHS = {
    "x86_64": [("baseline", ()), ("avx2", _X86_V3), ("avx512", _X86_V4), ("avx512bf16", _X86_V4 + ("avx512bf16",))],
    # NEON is part of ARMv8-A: the generic build vectorizes with it.
    "aarch64": [("baseline", ())],
}
_GENERIC = [("baseline", ())]  # any other machine: the compiler's default target
_BASE_MARCH = {"x86_64": ["-march=x86-64", "-mtune=generic"], "aarch64": ["-march=armv8-a"]}


def _machine() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


def _ffi_include_dir() -> str | None:
    """XLA's FFI headers ship with jaxlib (a build requirement); found without importing it. None
    without jaxlib (a build without isolation): the kernel is then skipped, and the record says why."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(pathlib.Path(next(iter(spec.submodule_search_locations))) / "include")


def _sanitizing() -> bool:
    """``LUCID_SANITIZE=1``: an AddressSanitizer and UBSan build (see tools/sanitize.sh)."""
    return os.environ.get("LUCID_SANITIZE", "0") != "0"


def _optimization_flags() -> list[str]:
    if _sanitizing():
        return ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]
    # No debug information (Python's own CFLAGS ask for it): four copies of it would triple the wheel.
    return ["-O3", "-g0"]


class IsaExtension(Extension):
    """One instruction-set path of the kernel: the same sources, compiled for ``features``."""

    def __init__(self, isa: str, features: tuple[str, ...], machine: str):
        sources = _SOURCES + ([_CPU_FEATURES_SOURCE] if isa == "baseline" else [])
        self.isa, self.features = isa, features
        isa_flags = _BASE_MARCH.get(machine, []) + [f"-m{f}" for f in features]
        if isa == "baseline" and machine == "x86_64":
            # Without AVX, GCC notes that returning 32- and 64-byte vectors changes the ABI
            # (-Wpsabi). Harmless: those functions are internal to this one library.
            isa_flags.append("-Wno-psabi")
        sanitize = _sanitizing()
        link = ["-pthread"] + (["-fsanitize=address,undefined"] if sanitize else [])
        if sys.platform.startswith("linux"):
            # Export the handlers (and the CPU query) only: no std:: template instantiation of one ISA
            # copy can then stand in for another's. libstdc++ linked in statically (private, like the
            # rest), so the library loads on systems with an older libstdc++ than the builder's.
            link += [f"-Wl,--version-script={_HERE / 'csrc' / 'exports.map'}"]
            if not sanitize:
                link += ["-static-libstdc++", "-static-libgcc"]
        super().__init__(
            f"lucid.{STEM}_{isa}",
            sources=sources,
            depends=_HEADERS,
            language="c++",
            extra_compile_args=[
                # XLA's headers as system headers: their warnings are not lucid's.
                "-isystem", _ffi_include_dir() or "jaxlib-not-found",
                "-std=c++17", *_optimization_flags(), *isa_flags,
                "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math",
                "-fvisibility=hidden", "-fvisibility-inlines-hidden",
                "-Wall", "-Wextra",
            ],
            extra_link_args=link,
            optional=True,
        )


class BuildIsaPaths(build_ext):
    """Builds every instruction-set path it can, each in its own temporary directory (the objects of
    two paths share source names), and records the outcome and the compiler's output.

    The paths build side by side, one thread each (up to the CPU count; ``--parallel`` sets another
    number): a thread sees its own temporary directory (``build_temp``) and keeps its own commands and
    messages (``_thread``), so a path's record holds its own compiler output only.
    """

    _thread = threading.local()

    @property
    def build_temp(self):
        return getattr(self._thread, "build_temp", None) or self._build_temp

    @build_temp.setter
    def build_temp(self, value):
        self._build_temp = value

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:
            self.parallel = True  # os.cpu_count() threads

    def build_extensions(self):
        self._entries = {}
        # The compiler runs its commands through `call` (setuptools >= 80; errors as
        # CalledProcessError) or `spawn` (before; ExecError): both kept for the record.
        method = "call" if hasattr(self.compiler, "call") else "spawn"
        original = getattr(self.compiler, method)

        def capturing(cmd, **kwargs):
            self._thread.commands.append(shlex.join(str(c) for c in cmd))
            try:
                done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            except OSError as e:
                self._thread.messages.append(f"{e}\n")
                raise (e if method == "call" else ExecError(f"command {cmd[0]!r} failed: {e}")) from None
            if done.stdout:
                self._thread.messages.append(done.stdout)
                sys.stderr.write(done.stdout)  # still shown, as distutils would
            if done.returncode != 0:
                if method == "call":
                    raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout)
                raise ExecError(f"command {cmd[0]!r} failed with exit code {done.returncode}")

        setattr(self.compiler, method, capturing)
        try:
            super().build_extensions()
        finally:
            setattr(self.compiler, method, original)
        self._write_record()

    def _record_path(self) -> pathlib.Path:
        return pathlib.Path(self.build_lib) / "lucid" / RECORD

    def _previous_entry(self, isa: str) -> dict | None:
        try:
            record = json.loads(self._record_path().read_text())
            return next(e for e in record["paths"] if e["isa"] == isa)
        except (OSError, ValueError, KeyError, StopIteration):
            return None

    def build_extension(self, ext):
        if not isinstance(ext, IsaExtension):
            return super().build_extension(ext)
        target = pathlib.Path(self.get_ext_fullpath(ext.name))
        entry = {"isa": ext.isa, "features": list(ext.features), "file": target.name, "built": False}
        self._thread.build_temp = os.path.join(self._build_temp, ext.isa)
        self._thread.commands, self._thread.messages = [], []
        try:
            if _ffi_include_dir() is None:
                entry["skipped"] = "jaxlib, whose XLA FFI headers the kernel compiles against, is not installed"
                return
            if not self._compiler_targets(ext):
                entry["skipped"] = "the compiler cannot target this instruction set"
                return
            self._thread.commands, self._thread.messages = [], []
            super().build_extension(ext)
            if not self._thread.commands and target.exists():  # up to date: keep what its build recorded
                entry = self._previous_entry(ext.isa) or dict(entry, built=True)
                return
            entry["built"] = target.exists()
        except (CCompilerError, BaseError, CompileError) as e:
            entry["error"] = str(e)
            raise  # distutils reports it (an optional extension: a warning, the install goes on)
        finally:
            self._thread.build_temp = None
            # The compiler's errors and warnings (what native_kernel_status() shows), and its commands.
            entry.setdefault("messages", "".join(self._thread.messages))
            entry.setdefault("commands", self._thread.commands)
            self._entries[ext.isa] = entry

    def _compiler_targets(self, ext: IsaExtension) -> bool:
        """Whether the compiler accepts the path's flags, on an empty translation unit."""
        probe = pathlib.Path(self.build_temp) / "probe.cc"
        probe.parent.mkdir(parents=True, exist_ok=True)
        probe.write_text("int lucid_probe;\n")
        try:
            self.compiler.compile([str(probe)], output_dir=self.build_temp, extra_postargs=ext.extra_compile_args)
        except (CCompilerError, BaseError, CompileError):
            return False
        return True

    def _write_record(self):
        record = {
            "format": 1,
            "machine": _machine(),
            "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "sanitized": _sanitizing(),
            "paths": [self._entries[e.isa] for e in self.extensions if e.isa in self._entries],
        }
        path = self._record_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")

    # The record is an output like the libraries: copied next to them for in-place and editable builds.
    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        self.copy_file(str(self._record_path()), os.path.join(build_py.get_package_dir("lucid"), RECORD))

    def get_output_mapping(self):
        mapping = super().get_output_mapping()
        if self.inplace:
            build_py = self.get_finalized_command("build_py")
            mapping[str(self._record_path())] = os.path.join(build_py.get_package_dir("lucid"), RECORD)
        return mapping

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs if self.inplace else [*outputs, str(self._record_path())]


setup(
    ext_modules=[IsaExtension(isa, features, _machine()) for isa, features in _PATHS.get(_machine(), _GENERIC)],
    cmdclass={"build_ext": BuildIsaPaths},
)
