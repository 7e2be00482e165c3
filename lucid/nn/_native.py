"""lucid's native CPU kernels (``csrc/instance_norm_cpu.cc``), called through XLA's FFI.

The kernels read every instance from memory once and revisit it from cache,
which XLA's CPU code generator does not do; see the C++ file for the math.
They are an implementation detail of :func:`lucid.nn._instance_norm.normalize_with_instance_stats`
(the forward pass, and the transpose of its tangent map, i.e. the backward
pass) and are used only where they compute exactly what the pure-XLA path does:

* on CPU: the call is wrapped in ``lax.platform_dependent``, so programs
  lowered for GPU or TPU (``jax.export`` included) carry the XLA path;
* float32 or bfloat16 input, float32 statistics, no mask, spatial axes not
  split across devices (no ``spatial_axis_name``, no mesh in context);
* when the compiled library is present (``pip install`` builds it; without a
  C++ compiler the install still succeeds and lucid uses XLA everywhere).

Set the environment variable ``LUCID_NATIVE=0`` (before import), or trace
inside ``with lucid.nn.functional.pure_xla():``, to use the pure-XLA path on
CPU too. ``jax.export`` needs that: a serialized program may only hold custom
calls with a compatibility guarantee, and the kernel is local to this install.
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

_LIBRARY_STEM = "_instance_norm_cpu"
_FORWARD = "lucid_instance_norm_forward"
_BACKWARD = "lucid_instance_norm_backward"


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

# A JAX configuration state rather than a module global: JAX keys its caches
# of traced and compiled programs on it, so a program traced with the kernel
# is never reused inside ``pure_xla()`` (e.g. by ``jax.export``), or the
# other way round. (Configuration states are how JAX itself scopes such
# switches; jax is pinned below 0.11, where this constructor is stable.)
from jax._src import config as _jax_config  # noqa: E402

_kernel_state = _jax_config.bool_state(
    "lucid_native_kernel",
    AVAILABLE and os.environ.get("LUCID_NATIVE", "1") != "0",
    "Use lucid's native CPU kernel for instance norm where it applies.",
    include_in_jit_key=True,
    include_in_trace_context=True,
)


def enabled() -> bool:
    """Whether calls traced now use the native kernel on CPU."""
    return bool(_kernel_state.value) and AVAILABLE


def pure_xla():
    """Within this block, calls traced use XLA operations only, on CPU too.

    For ``jax.export`` (a serialized program cannot hold lucid's native
    kernel, a custom call local to this install) and for comparisons::

        with lucid.nn.functional.pure_xla():
            exported = jax.export.export(jax.jit(step), platforms=("cpu", "cuda"))(*args)
    """
    return _kernel_state(False)


def _mesh_is_local() -> bool:
    """True unless a mesh with automatically partitioned axes is in context.

    Inside ``shard_map`` every axis is manual and each device sees its own
    block, which the kernel handles; under ``jax.jit`` with a mesh, XLA would
    have to gather a split input for an opaque call, so the XLA path is used.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return True
    manual = jax.sharding.AxisType.Manual
    return all(t == manual for t in mesh.axis_types)


def channel_order(ndim: int, reduce_axes: tuple[int, ...]) -> int | None:
    """0 for ``(N, C, *spatial)``, 1 for ``(N, *spatial, C)``, ``None`` otherwise."""
    if reduce_axes == tuple(range(2, ndim)):
        return 0
    if reduce_axes == tuple(range(1, ndim - 1)):
        return 1
    return None


def eligible(x, weight, bias, mask, reduce_axes, spatial_axis_name) -> bool:
    """Whether the kernel computes this call (static: decided at trace time)."""
    if mask is not None or spatial_axis_name is not None:
        return False
    if x.dtype not in (jnp.float32, jnp.bfloat16) or channel_order(x.ndim, reduce_axes) is None:
        return False
    for v in (weight, bias):
        if v is not None and jnp.promote_types(v.dtype, jnp.float32) != jnp.float32:
            return False
    spec = getattr(jax.typeof(x).sharding, "spec", ())
    if any(s is not None for s in spec):
        return False
    return _mesh_is_local()


def _as_3d(x, order: int):
    """``(N, C, M)`` or ``(N, M, C)``: a free reshape of a contiguous array."""
    n = x.shape[0]
    c = x.shape[1] if order == 0 else x.shape[-1]
    m = x.size // (n * c) if x.size else 0
    return x.reshape((n, c, m) if order == 0 else (n, m, c)), n, c


def _varying_axes(value) -> frozenset:
    """The manual mesh axes a value varies over inside ``shard_map``."""
    aval = jax.typeof(value)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def match_varying(*values):
    """Inside ``shard_map``, mark every value as varying over the union of the
    mesh axes that any of them varies over (outside, returns them unchanged).

    The FFI call does not infer how its outputs vary, and lucid's linear
    primitives (see ``_instance_norm``) require operands that agree; marking
    a replicated operand as varying transposes to the ``psum`` its gradient needs.
    """
    varying = frozenset().union(*(_varying_axes(v) for v in values))
    marked = []
    for v in values:
        missing = tuple(sorted(varying - _varying_axes(v)))
        marked.append(jax.lax.pcast(v, missing, to="varying") if missing else v)
    return marked


def channel_vector(v, c: int, fill: float):
    """``v`` as the kernels take weight, bias and their tangents: ``(C,)`` float32, ``fill`` for ``None``."""
    return jnp.full((c,), fill, jnp.float32) if v is None else v.astype(jnp.float32).reshape(c)


def forward(x, weight, bias, eps: float, reduce_axes: tuple[int, ...]):
    """``(y, mean, residual, var)``, the statistics shaped like ``x`` with the spatial axes set to 1.

    ``mean`` is the float32-rounded mean and ``residual`` its rounding error
    (``mean + residual`` is the mean to about double precision).
    """
    order = channel_order(x.ndim, reduce_axes)
    x3, n, c = _as_3d(x, order)
    stat = jax.ShapeDtypeStruct((n, c), jnp.float32)
    call = jax.ffi.ffi_call(
        _FORWARD, (jax.ShapeDtypeStruct(x3.shape, x3.dtype), stat, stat, stat), vmap_method="broadcast_all"
    )
    y, mean, residual, var = match_varying(x, *call(
        x3, channel_vector(weight, c, 1.0), channel_vector(bias, c, 0.0), eps=np.float32(eps), channels_last=np.int64(order)
    ))[1:]
    stats_shape = tuple(1 if a in reduce_axes else d for a, d in enumerate(x.shape))
    return (y.reshape(x.shape), *(s.reshape(stats_shape) for s in (mean, residual, var)))


def backward(x, gy, mean, residual, rstd, weight, gmean, gvar, channels_last: int):
    """``(gx, g1, g2)``: the input's cotangent and the per-instance sums
    ``g1 = sum(gy)``, ``g2 = sum(gy * xhat)``.

    Takes the kernels' own layout: ``x`` and ``gy`` of shape ``(..., N, C, M)``
    (``channels_last=0``) or ``(..., N, M, C)``; the statistics and the
    cotangents of the mean and variance ``(..., N, C)``; ``weight`` ``(..., C)``.
    """
    stat = jax.ShapeDtypeStruct(mean.shape, jnp.float32)
    call = jax.ffi.ffi_call(_BACKWARD, (jax.ShapeDtypeStruct(x.shape, x.dtype), stat, stat))
    outputs = call(x, gy, mean, residual, rstd, weight, gmean, gvar, channels_last=np.int64(channels_last))
    return match_varying(x, *outputs)[1:]
