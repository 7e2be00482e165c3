"""Instance statistics, normalization and the linear tangent maps, as ``jnp`` formulas.

Everything here is plain ``jax.numpy``/``lax`` on arrays; nothing imports the
``Tensor``/``Module`` facade. :mod:`lucid.nn._normalize` wires these formulas
into the two entry points of lucid's math and their derivative rules, and
:mod:`lucid.nn._primitives` uses them as the reference (and non-CPU lowering)
of the native kernels, so each formula lives here once.

Notation, per instance ``(n, c)`` and its ``M`` (valid) spatial elements::

    k      a shift close to the data (the first element, or a rough masked mean)
    md     mean(x - k)                     so the mean is  mu = k + md
    var    mean((x - mu)**2)               biased, used for normalization
    r      1 / sqrt(var + eps)
    xhat   ((x - k) - md) * r
    y      xhat * w + b

Why the shift: in float32, ``x`` with mean 1e4 and unit spread has an ulp of
about 1e-3, so rounding ``mu`` itself to float32 already costs 5e-4 of output
accuracy. ``x - k`` is exact (both are floats of the same magnitude), and
``md`` is a small number carrying full relative precision, so ``(x - k) - md``
keeps the output within a few ulps of a float64 reference.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class NormConfig(NamedTuple):
    """The static settings of one call: hashable, so it keys JAX's caches.

    Attributes:
        reduce_axes: the spatial axes of the input (every axis but batch and channel).
        spatial_axis_name: names of mapped axes that split the spatial axes
            (``shard_map``/``pmap``), or ``None``.
        eps: added to the variance before the square root.
        kernel: compute this call with lucid's native CPU kernel (decided by
            :func:`lucid.nn._native.applies`; on other platforms the
            kernel's primitives lower to these formulas).
    """

    reduce_axes: tuple[int, ...]
    spatial_axis_name: str | tuple[str, ...] | None
    eps: float
    kernel: bool = False


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Statistics are computed in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def spatial_sum(v: jax.Array, config: NormConfig) -> jax.Array:
    """Sum over the spatial axes of every instance, across devices if they are split."""
    s = jnp.sum(v, axis=config.reduce_axes, keepdims=True)
    if config.spatial_axis_name is not None:
        s = lax.psum(s, config.spatial_axis_name)
    return s


def _spatial_sums(values: tuple[jax.Array, ...], config: NormConfig) -> tuple[jax.Array, ...]:
    """Several spatial sums from one sweep over memory.

    One variadic reduce, so XLA reads the operands' producer (``x``) once
    instead of once per sum. Only the primal uses it: a variadic reduce has no
    transpose rule, so the linear tangent maps use :func:`spatial_sum`.
    """
    zeros = tuple(jnp.zeros((), v.dtype) for v in values)
    sums = lax.reduce(values, zeros, lambda a, b: tuple(p + q for p, q in zip(a, b)), config.reduce_axes)
    sums = tuple(jnp.expand_dims(s, config.reduce_axes) for s in sums)
    if config.spatial_axis_name is not None:
        sums = lax.psum(sums, config.spatial_axis_name)
    return sums


def _shift(xc: jax.Array, mask: jax.Array | None, count: jax.Array, config: NormConfig) -> jax.Array:
    """A per-instance value close to the data; its exact value does not matter.

    Unmasked: the first spatial element (no extra pass over memory). Masked: a
    rough masked mean, because the first element may be padding.

    A spatial axis sharded over an ``Explicit`` mesh axis under ``jax.jit``
    cannot be sliced to one element (JAX rejects slicing a sharded dim to a
    size the mesh does not divide); along such axes the shift is the mean of
    that first line instead, a small all-reduce that every device shares.
    """
    if mask is not None:
        return spatial_sum(jnp.where(mask, xc, 0), config) / count
    spec = jax.typeof(xc).sharding.spec
    sharded = tuple(a for a in config.reduce_axes if a < len(spec) and spec[a] is not None)
    first = xc[tuple(slice(0, 1) if a in config.reduce_axes and a not in sharded else slice(None)
                     for a in range(xc.ndim))]
    if sharded:
        first = jnp.mean(first, axis=sharded, keepdims=True)
    if config.spatial_axis_name is not None:
        # Every shard must shift by the same value for the sums to combine.
        first = lax.pmean(first, config.spatial_axis_name)
    return first


def local_spatial_size(shape: tuple[int, ...], config: NormConfig) -> int:
    return math.prod(shape[a] for a in config.reduce_axes)


def valid_count(x: jax.Array, mask: jax.Array | None, config: NormConfig, dtype) -> jax.Array:
    """Number of valid spatial elements per instance, at least 1 (an all-padding
    instance then normalizes to its bias instead of dividing by zero)."""
    if mask is None:
        count = jnp.asarray(local_spatial_size(x.shape, config), dtype)
        if config.spatial_axis_name is not None:
            count = count * lax.psum(1, config.spatial_axis_name)
        return count
    ones = jnp.broadcast_to(mask, x.shape).astype(dtype)
    return jnp.maximum(spatial_sum(ones, config), 1)


class InstanceStats(NamedTuple):
    """Per-instance statistics, each of shape ``x.shape`` with spatial axes set to 1."""

    shift: jax.Array
    mean_shifted: jax.Array
    var: jax.Array
    count: jax.Array


def instance_stats(x: jax.Array, mask: jax.Array | None, config: NormConfig) -> InstanceStats:
    """Shifted one-sweep mean and biased variance of every ``(n, c)`` instance.

    ``sum(d)`` and ``sum(d * d)`` of ``d = x - k`` are computed from the same
    read of ``x``; with ``k`` within a few standard deviations of the mean the
    subtraction ``S2/M - md**2`` loses at most a few bits.
    """
    cdt = compute_dtype(x.dtype)
    xc = x.astype(cdt)
    count = valid_count(x, mask, config, cdt)
    k = _shift(xc, mask, count, config)
    d = xc - k
    if mask is not None:
        d = jnp.where(mask, d, 0)
    s1, s2 = _spatial_sums((d, d * d), config)
    md = s1 / count
    var = jnp.maximum(s2 / count - md * md, 0)
    return InstanceStats(k, md, var, count)


def centered(x: jax.Array, shift: jax.Array, mean_shifted: jax.Array | None) -> jax.Array:
    """``(x - k) - md`` in the compute dtype (``md`` is ``None`` for running stats)."""
    centered = x.astype(shift.dtype) - shift
    return centered if mean_shifted is None else centered - mean_shifted


def normalize(x, shift, mean_shifted, rstd, weight, bias) -> jax.Array:
    """``y = ((x - k) - md) * (r * w) + b``: centre first, then one multiply-add.

    ``r * w`` is folded on the small (N, C) side, never ``x * a + c``, which
    would cancel catastrophically for data far from zero.
    """
    scale = rstd if weight is None else rstd * weight
    y = centered(x, shift, mean_shifted) * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def normalized_with_stats(x, weight, bias, mask, config: NormConfig):
    """``(y, mean, residual, var, count)`` by the formulas above (the XLA path).

    ``mean`` is rounded to the compute dtype and ``residual`` is what that
    rounding lost: ``mean + residual`` is the mean to about twice the
    precision, and the tangent map centres on ``mean`` and corrects by
    ``residual``.
    """
    stats = instance_stats(x, mask, config)
    rstd = lax.rsqrt(stats.var + config.eps)
    y = normalize(x, stats.shift, stats.mean_shifted, rstd, weight, bias)
    mean = stats.shift + stats.mean_shifted
    return y, mean, stats.mean_shifted - (mean - stats.shift), stats.var, stats.count


def instance_tangent(config, x, center, residual, rstd, count, weight, mask, dx, dweight, dbias):
    """The linear tangent map of normalization with instance statistics.

    Per instance, with ``dm = mean(dx)`` and ``ds = mean(xhat * dx)`` over the
    valid elements::

        dy    = dx * (w r) + xhat * (dw - w r ds) + (db - w r dm)
        dmean = dm
        dvar  = 2 ds / r          since  x - mu = xhat / r

    It is written on ``d = x - center`` (exact) instead of
    ``xhat = (d - e) r``, with ``e = mean - center`` the tiny rounding
    residual: ``ds = r (mean(d dx) - e dm)`` and ``xhat * B = d * (r B) - e r B``.
    Then every input-sized term is ``dx`` or
    ``d`` times a per-instance coefficient, and the transposed program (the
    backward pass) needs exactly two per-instance sums, ``sum(g)`` and
    ``sum(g * d)``, with nothing input-sized to materialize in between.
    """
    cdt = rstd.dtype
    d = x.astype(cdt) - center
    dxc = dx.astype(cdt)
    dxm = dxc if mask is None else jnp.where(mask, dxc, 0)
    dm = spatial_sum(dxm, config) / count
    ds = rstd * (spatial_sum(d * dxm, config) / count - residual * dm)
    a = rstd if weight is None else rstd * weight
    b = -a * ds
    c = -a * dm
    if dweight is not None:
        b = b + dweight
    if dbias is not None:
        c = c + dbias
    rb = rstd * b
    dy = (dxc * a + d * rb + (c - residual * rb)).astype(x.dtype)
    return dy, dm, 2 * ds / rstd


def running_tangent(x, running_mean, rstd, weight, dx, drunning_mean, drunning_var, dweight, dbias):
    """The linear tangent map of normalization with given (running) statistics.

    With ``xhat = (x - rm) r`` and ``dr = -r**3 / 2 * drv``::

        dy = dx * (w r) + xhat * (dw + w dr / r) + (db - w r drm)
    """
    cdt = rstd.dtype
    xhat = centered(x, running_mean, None) * rstd
    a = rstd if weight is None else rstd * weight
    w = 1 if weight is None else weight
    b = -0.5 * w * rstd * rstd * drunning_var.astype(cdt)
    c = -a * drunning_mean.astype(cdt)
    if dweight is not None:
        b = b + dweight
    if dbias is not None:
        c = c + dbias
    return (dx.astype(cdt) * a + xhat * b + c).astype(x.dtype)
