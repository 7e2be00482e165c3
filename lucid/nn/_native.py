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
* when the compiled library is present (``pip install`` builds it; without a
  C++ compiler the install still succeeds and lucid uses XLA everywhere).

Set the environment variable ``LUCID_NATIVE=0`` (before import), trace inside
``with lucid.nn.functional.pure_xla():``, or pass ``implementation="xla"``, to
use the pure-XLA path on CPU too. ``jax.export`` needs that: a serialized
program may only hold custom calls with a compatibility guarantee, and the
kernel is local to this install.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_LIBRARY_STEM = "_instance_norm_cpu"
_FORWARD = "lucid_instance_norm_forward"
_BACKWARD = "lucid_instance_norm_backward"
IMPLEMENTATIONS = (None, "xla", "native")


def _load() -> bool:
    package = pathlib.Path(__file__).resolve().parent.parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = package / (_LIBRARY_STEM + suffix)
        if path.exists():
            library = ctypes.cdll.LoadLibrary(str(path))
            jax.ffi.register_ffi_target(_FORWARD, jax.ffi.pycapsule(library.LucidInstanceNormForward), platform="cpu")
            jax.ffi.register_ffi_target(_BACKWARD, jax.ffi.pycapsule(library.LucidInstanceNormBackward), platform="cpu")
            return True
    return False


AVAILABLE: bool = _load()

# The implementation used where the call does not name one: a JAX user
# context, so JAX keys its caches of traced and compiled programs on it, and a
# program traced with the kernel is never reused inside ``pure_xla()`` (e.g.
# by ``jax.export``), or the other way round.
_default_implementation = jax.make_user_context(
    default_value="xla" if os.environ.get("LUCID_NATIVE", "1") == "0" else "native"
)


def enabled() -> bool:
    """Whether calls traced now without an explicit ``implementation`` use the kernel on CPU."""
    return AVAILABLE and _default_implementation.value == "native"


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
        return "the native kernel is not built (see README: the native CPU kernels)"
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


def applies(x, weight, bias, mask, reduce_axes, spatial_axis_name, implementation) -> bool:
    """Whether the kernel computes this call (static: decided once, at trace time).

    ``implementation`` is the caller's choice: ``None`` takes the kernel where
    it applies (unless ``pure_xla()`` or ``LUCID_NATIVE=0``), ``"xla"``
    never, ``"native"`` always, raising ``ValueError`` where it cannot.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}.")
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
