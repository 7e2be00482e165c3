"""lucid's native CPU kernels (``csrc/``), called through XLA's FFI: loading, choice, calls.

The kernels read every instance from memory once and revisit it from cache,
which XLA's CPU code generator does not do; see ``csrc/`` for the math. They
compute the forward pass and the transpose of its tangent map (the backward
pass) through the primitives of :mod:`lucid.nn._primitives`, and are used only
where they compute exactly what the pure-XLA path does (:func:`applies`):

* on CPU: the primitives lower to the kernels on CPU only, so programs
  lowered for GPU or TPU (``jax.export`` included) carry the XLA path;
* float32 or bfloat16 input, float32 statistics, no mask, no
  ``spatial_axis_name`` (under sharding, :mod:`lucid.nn._partitioning` runs
  the kernel on every device's block);
* when the compiled kernel is present and loads (``pip install`` builds it,
  or a wheel carries it; without a C++ compiler the install still succeeds and
  lucid uses XLA everywhere).

One build carries the kernel compiled for several instruction sets (see
setup.py): a baseline x86-64 path, AVX2 (with FMA, F16C, BMI), AVX-512 and
AVX-512 with BF16 (one path on other machines: generic, NEON on aarch64). At
import, the baseline library reports the CPU's features and the best path the
CPU runs is loaded (``LUCID_NATIVE_ISA=avx2``, say, forces a lower one: for
tests, and to compare). Loading never breaks ``import lucid``: a library that
will not load is a warning, and the XLA path. :func:`status` reports all of it.

Set the environment variable ``LUCID_NATIVE=0`` (before import: the kernel is
then not loaded at all), trace inside
``with lucid.nn.functional.pure_xla():``, or pass ``implementation="xla"``, to
use the pure-XLA path on CPU too. ``jax.export`` needs that: a serialized
program may only hold custom calls with a compatibility guarantee, and the
kernel is local to this install.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.machinery
import json
import math
import os
import pathlib
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_LIBRARY_STEM = "_instance_norm_cpu"
_RECORD = _LIBRARY_STEM + ".json"  # written by setup.py next to the libraries
_FORWARD = "lucid_instance_norm_forward"
_BACKWARD = "lucid_instance_norm_backward"
IMPLEMENTATIONS = (None, "xla", "native")


def _library_dir() -> pathlib.Path:
    """Where the libraries and their build record are: the package, or ``LUCID_NATIVE_DIR``
    (a test hook: sanitizer builds, and libraries that fail to load)."""
    override = os.environ.get("LUCID_NATIVE_DIR")
    return pathlib.Path(override) if override else pathlib.Path(__file__).resolve().parent.parent


def _read_record(directory: pathlib.Path) -> tuple[list[dict], str | None]:
    """The build record's paths (lowest instruction set first), or why there are none."""
    try:
        record = json.loads((directory / _RECORD).read_text())
        paths = record["paths"]
        if not all(isinstance(e["isa"], str) and isinstance(e["built"], bool) for e in paths):
            raise ValueError("malformed path entry")
        return paths, None
    except FileNotFoundError:
        return [], f"no build record ({_RECORD}) in {directory}: the kernel was not built"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [], f"unreadable build record {directory / _RECORD}: {e}"


def _library_path(directory: pathlib.Path, entry: dict) -> pathlib.Path:
    # The record names the file; a record from another interpreter's build names no file of ours.
    name = entry.get("file", "")
    if any(name == f"{_LIBRARY_STEM}_{entry['isa']}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES):
        return directory / name
    raise OSError(f"the record's {entry['isa']} library {name!r} is not for this Python")


class _Loaded(NamedTuple):
    paths: tuple[dict, ...]  # the build record's entries
    isa: str | None  # the path registered with XLA, None if none
    cpu_isas: tuple[str, ...]  # the built paths this CPU runs
    problem: str | None  # why no path (or not the requested one) was loaded
    # Whether the problem is a fault worth a warning (not: turned off, or no compiler at install).
    warn: bool = False


def _supported(baseline: ctypes.CDLL, entry: dict) -> bool:
    features = entry.get("features", [])
    if not features:
        return True
    query = baseline.LucidCpuSupports
    query.argtypes, query.restype = [ctypes.c_char_p], ctypes.c_int
    return all(query(feature.encode()) == 1 for feature in features)


# Read once, at import: the kernel is loaded (or not) then.
_TURNED_OFF = os.environ.get("LUCID_NATIVE", "1") == "0"


def _load() -> _Loaded:
    directory = _library_dir()
    paths, error = _read_record(directory)
    if _TURNED_OFF:
        return _Loaded(tuple(paths), None, (), "not loaded: LUCID_NATIVE=0")
    built = [e for e in paths if e["built"]]
    if not built:
        return _Loaded(tuple(paths), None, (), error or "not built: " + _build_failures(paths))
    names = [e["isa"] for e in paths]
    try:
        if built[0]["isa"] != "baseline":
            raise OSError("the baseline library, which detects the CPU's features, was not built")
        baseline = ctypes.CDLL(str(_library_path(directory, built[0])), mode=ctypes.RTLD_LOCAL)
        runnable = [e for e in built if _supported(baseline, e)]
        cpu_isas = tuple(e["isa"] for e in runnable)
        notes = []
        requested = os.environ.get("LUCID_NATIVE_ISA", "")
        if requested in cpu_isas:
            runnable = runnable[:cpu_isas.index(requested) + 1]
        elif requested:
            why = ("not built" if requested in names else
                   f"not an instruction-set path of this machine's build {tuple(names)}")
            if requested in {e["isa"] for e in built}:
                why = "not supported by this CPU"
            notes.append(f"LUCID_NATIVE_ISA={requested}: {why}; using the best path available instead")
        for entry in reversed(runnable):
            try:
                library = ctypes.CDLL(str(_library_path(directory, entry)), mode=ctypes.RTLD_LOCAL)
                forward, backward = library.LucidInstanceNormForward, library.LucidInstanceNormBackward
            except (OSError, AttributeError) as e:
                notes.append(f"the {entry['isa']} path failed to load: {e}")
                continue
            jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(forward), platform="cpu")
            jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(backward), platform="cpu")
            return _Loaded(tuple(paths), entry["isa"], cpu_isas, "; ".join(notes) or None, bool(notes))
        raise OSError("; ".join(notes) or "no path this CPU supports was built")
    # Whatever goes wrong (a corrupt or foreign library, one needing a newer libstdc++ or glibc, a
    # missing symbol), lucid must still import and run: on the XLA path.
    except Exception as e:
        return _Loaded(tuple(paths), None, (), f"failed to load: {type(e).__name__}: {e}", True)


def _build_failures(paths: list[dict]) -> str:
    return "; ".join(f"{e['isa']}: {e.get('skipped') or e.get('error') or 'failed'}" for e in paths) or "no paths"


_LOADED = _load()
AVAILABLE: bool = _LOADED.isa is not None
if _LOADED.warn:
    # Once, at import: the kernel was built (or forced to a path) but the request could not be met.
    warnings.warn(f"lucid's native CPU kernel: {_LOADED.problem}. "
                  + ("Running the XLA path." if not AVAILABLE else f"Running the {_LOADED.isa} path."),
                  RuntimeWarning, stacklevel=2)

# The implementation used where the call does not name one: a JAX user
# context, so JAX keys its caches of traced and compiled programs on it, and a
# program traced with the kernel is never reused inside ``pure_xla()`` (e.g.
# by ``jax.export``), or the other way round.
_default_implementation = jax.make_user_context(default_value="xla" if _TURNED_OFF else "native")


def enabled() -> bool:
    """Whether calls traced now without an explicit ``implementation`` use the kernel on CPU."""
    return AVAILABLE and _default_implementation.value == "native"


@dataclasses.dataclass(frozen=True)
class NativeKernelStatus:
    """What :func:`lucid.nn.functional.native_kernel_status` reports.

    Attributes:
        enabled: calls traced now (without ``implementation=``) run the kernel on CPU.
        isa: the instruction-set path running (``"avx512bf16"``, ``"avx2"``, ...), ``None`` if none.
        loaded: a kernel library is loaded and registered with XLA.
        built: the install compiled the kernel (at least one path).
        isas: the paths this build carries, lowest first.
        cpu_isas: those this CPU runs (known once the baseline library loaded).
        disabled_by: ``"LUCID_NATIVE=0"`` or ``"pure_xla()"`` when either turns the kernel off.
        problem: why the kernel is not loaded, or why not the path asked for; ``None`` if all is well.
        build_messages: the compiler's errors and warnings at build time, per path ('' if none).
    """

    enabled: bool
    isa: str | None
    loaded: bool
    built: bool
    isas: tuple[str, ...]
    cpu_isas: tuple[str, ...]
    disabled_by: str | None
    problem: str | None
    build_messages: str

    def __repr__(self) -> str:
        fields = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self) if f.name != "build_messages"]
        lines = self.build_messages.splitlines()
        shown = "\n".join(lines[:8]) + (f"\n... ({len(lines) - 8} more lines)" if len(lines) > 8 else "")
        fields.append(f"build_messages={shown!r}")
        return "NativeKernelStatus(\n    " + ",\n    ".join(fields) + ",\n)"


def status() -> NativeKernelStatus:
    """The kernel's state now (see :class:`NativeKernelStatus`)."""
    disabled_by = ("LUCID_NATIVE=0" if _TURNED_OFF
                   else "pure_xla()" if _default_implementation.value != "native" else None)
    messages = "".join(f"[{e['isa']}] {e.get('skipped', '')}\n{e.get('messages', '')}".rstrip() + "\n"
                       for e in _LOADED.paths if e.get("messages") or e.get("skipped") or e.get("error"))
    return NativeKernelStatus(
        enabled=enabled(),
        isa=_LOADED.isa,
        loaded=AVAILABLE,
        built=any(e["built"] for e in _LOADED.paths),
        isas=tuple(e["isa"] for e in _LOADED.paths if e["built"]),
        cpu_isas=_LOADED.cpu_isas,
        disabled_by=disabled_by,
        problem=_LOADED.problem,
        build_messages=messages,
    )


def pure_xla():
    """Within this block, calls traced use XLA operations only, on CPU too.

    For ``jax.export`` (a serialized program cannot hold lucid's native
    kernel, a custom call local to this install) and for comparisons::

        with lucid.nn.functional.pure_xla():
            exported = jax.export.export(jax.jit(step), platforms=("cpu", "cuda"))(*args)
    """
    return _default_implementation("xla")


def channel_order(ndim: int, reduce_axes: tuple[int, ...]) -> int | None:
    """0 for ``(N, C, *spatial)``, 1 for ``(N, *spatial, C)``, ``None`` otherwise."""
    if reduce_axes == tuple(range(2, ndim)):
        return 0
    if reduce_axes == tuple(range(1, ndim - 1)):
        return 1
    return None


def _why_not(x, weight, bias, mask, reduce_axes, spatial_axis_name) -> str | None:
    """Why the kernel cannot compute this call, or ``None`` if it can."""
    if not AVAILABLE:
        return f"the native kernel is not available ({_LOADED.problem}; see README: the native CPU kernels)"
    if mask is not None:
        return "masks run on the XLA path"
    if spatial_axis_name is not None:
        return "spatial_axis_name (split spatial axes) runs on the XLA path"
    if x.dtype not in (jnp.float32, jnp.bfloat16):
        return f"the kernel takes float32 or bfloat16 input, got {x.dtype}"
    if channel_order(x.ndim, reduce_axes) is None:
        return "the kernel takes channels-first or channels-last input only"
    for v in (weight, bias):
        if v is not None and jnp.promote_types(v.dtype, jnp.float32) != jnp.float32:
            return f"the kernel takes float32 weight and bias, got {v.dtype}"
    return None


def check_implementation(implementation: object) -> None:
    """``implementation`` is one of :data:`IMPLEMENTATIONS`, else a ``ValueError``."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")


def applies(x, weight, bias, mask, reduce_axes, spatial_axis_name, implementation) -> bool:
    """Whether the kernel computes this call (static: decided once, at trace time).

    ``implementation`` is the caller's choice: ``None`` takes the kernel where
    it applies (unless ``pure_xla()`` or ``LUCID_NATIVE=0``), ``"xla"``
    never, ``"native"`` always, raising ``ValueError`` where it cannot.
    """
    check_implementation(implementation)
    if implementation == "xla" or (implementation is None and not enabled()):
        return False
    reason = _why_not(x, weight, bias, mask, reduce_axes, spatial_axis_name)
    if reason is not None and implementation == "native":
        raise ValueError(f"implementation='native' cannot compute this call: {reason}.")
    return reason is None


class KernelView(NamedTuple):
    """An operand of the kernels as ``(P, N, C, M)`` (or ``(P, N, M, C)`` channels-last)."""

    p: int  # the product of the leading (vmap) axes
    n: int
    c: int
    m: int  # the spatial size of one instance
    channels_last: int

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.p, self.n, self.m, self.c) if self.channels_last else (self.p, self.n, self.c, self.m)


def kernel_view(shape: tuple[int, ...], channels_last: int, leading: int) -> KernelView:
    """The kernels' view of an input of ``shape`` with ``leading`` vmap axes in front."""
    n = shape[leading]
    if channels_last:
        c, spatial = shape[-1], shape[leading + 1:-1]
    else:
        c, spatial = shape[leading + 1], shape[leading + 2:]
    return KernelView(math.prod(shape[:leading]), n, c, math.prod(spatial), channels_last)


def channel_vector(v, c: int, fill: float):
    """``v`` as the kernels take weight, bias and their tangents: ``(C,)`` float32, ``fill`` for ``None``."""
    return jnp.full((c,), fill, jnp.float32) if v is None else v.astype(jnp.float32).reshape(c)


def vary_like(x, *values):
    """``values`` marked to vary over (at least) the manual mesh axes ``x`` varies over.

    Inside ``shard_map``, a replicated weight meets a sharded ``x`` in the
    kernels' calls, which require operands that vary alike. A standard binary
    operation with a zero that varies like ``x`` inserts JAX's implicit
    broadcast to varying, whose transpose is the ``psum`` that the weight's
    gradient needs (outside ``shard_map`` it is a plain ``+ 0`` on small arrays).
    """
    zero = jnp.zeros_like(x, shape=(), dtype=jnp.float32)
    return [v + zero for v in values]


def forward_call(x, weight, bias, *, eps: float, channels_last: int):
    """``(y, mean, residual, var)`` from the forward kernel, on its 4-d layout (see ``KernelView``).

    ``mean`` is the float32-rounded mean and ``residual`` its rounding error
    (``mean + residual`` is the mean to about double precision).
    """
    stat = jax.ShapeDtypeStruct(x.shape[:3] if not channels_last else (*x.shape[:2], x.shape[3]), jnp.float32)
    call = jax.ffi.ffi_call(_FORWARD, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat, stat))
    return call(x, *vary_like(x, weight, bias), eps=np.float32(eps), channels_last=np.int64(channels_last))


def backward_call(x, gy, mean, residual, rstd, weight, gmean, gvar, *, channels_last: int):
    """``(gx, g1, g2)``: the input's cotangent and the per-instance sums
    ``g1 = sum(gy)``, ``g2 = sum(gy * xhat)``, on the kernels' 4-d layout.
    """
    stat = jax.ShapeDtypeStruct(mean.shape, jnp.float32)
    call = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat))
    small = vary_like(x, mean, residual, rstd, weight, gmean, gvar)
    return call(x, gy, *small, channels_last=np.int64(channels_last))
