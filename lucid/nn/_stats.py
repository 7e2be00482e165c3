"""Instance statistics, normalization and the linear tangent maps, as ``jnp`` formulas.

Everything here is plain ``jax.numpy``/``lax`` on arrays; nothing imports the
``Tensor``/``Module`` facade. :mod:`lucid.nn._normalize` wires these formulas
into the two entry points of lucid's math and their derivative rules, and
:mod:`lucid.nn._primitives` uses them as the reference (and non-CPU lowering)
of the native kernels, so each formula lives here once.

Notation, per instance ``(n, c)`` and its ``M`` (valid) spatial elements::

    k      a shift close to the mean (the rough mean sum(x) / M)
    md     mean(x - k)                     so the mean is  mu = k + md
    var    mean((x - mu)**2)               biased, used for normalization
    r      1 / sqrt(var + eps), and 0 where var + eps == 0 or M == 0
    xhat   ((x - k) - md) * r
    y      xhat * w + b

Why the shift: in float32, ``x`` with mean 1e4 and unit spread has an ulp of
about 1e-3, so rounding ``mu`` itself to float32 already costs 5e-4 of output
accuracy. ``x - k`` is exact (both are floats of the same magnitude), and
``md`` is a small number carrying full relative precision, so ``(x - k) - md``
keeps the output within a few ulps of a float64 reference. And with ``k``
near the mean, wherever the outliers are, the variance's sums of ``x - k``
cancel nothing (:func:`instance_stats`, a corrected two-pass algorithm).

Speed on CPU (the XLA path runs where the native kernel does not: masks,
float16, ``pure_xla()``): XLA's CPU backend hands a single-output sum,
together with the elementwise work feeding it, to a vectorized reduction
library, and is several times slower on anything else. Hence one sum per
quantity (:func:`spatial_sum`), each fenced (:func:`_fence`), each with its
own copy of the small per-instance arrays it subtracts (:func:`_copies`), on
a compact view of ``x`` with long rows (:func:`_compact_view`).
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
        tile: in the compact view of :func:`_compact_view` only: how many
            consecutive positions its last axis folds together, with the
            channels that follow them (channels-last).
        split: in the compact view only: the length of the segments its last
            axis cuts a long channels-first row into.
    """

    reduce_axes: tuple[int, ...]
    spatial_axis_name: str | tuple[str, ...] | None
    eps: float
    kernel: bool = False
    tile: int = 1
    split: int = 1


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """Statistics are computed in at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


def _fence(v: jax.Array) -> jax.Array:
    """``v`` itself, through ``reduce_precision`` to its own dtype's precision.

    An exact identity (linear, so it transposes to itself) that XLA keeps and
    that XLA's CPU reduction library does not take. That library runs a sum
    together with the elementwise work feeding it, and also absorbs the
    per-instance arithmetic after it, which makes its kernel several times
    slower (and can grow it into the output pass). Fenced right after the sum,
    the kernel is the sum alone: :func:`spatial_sum` fences every sum; a
    per-instance coefficient fenced before it is broadcast against ``x``
    fences the sum that the transposed program (the backward pass) makes of it.
    """
    finfo = jnp.finfo(v.dtype)
    return lax.reduce_precision(v, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant)


def spatial_sum(v: jax.Array, config: NormConfig) -> jax.Array:
    """Sum over the spatial axes of every instance, across devices if they are split (fenced: :func:`_fence`).

    In a tiled view (:func:`_compact_view`) the sum over the spatial axis
    leaves ``tile`` partial sums per instance along the last axis; they are
    added last. In a split view every segment is summed first (fenced), then
    the segments' sums.
    """
    if config.split > 1:
        v = _fence(jnp.sum(v, axis=-1, keepdims=True))
    s = jnp.sum(v, axis=config.reduce_axes, keepdims=True)
    if config.tile > 1:
        s = jnp.sum(s.reshape(*s.shape[:-1], config.tile, s.shape[-1] // config.tile), axis=-2)
    s = _fence(s)
    if config.spatial_axis_name is not None:
        s = lax.psum(s, config.spatial_axis_name)
    return s


#: The compact view's target width of its last axis, in elements (see :func:`_compact_view`).
_VIEW_WIDTH = 512
#: Channels-first rows longer than this are cut into segments of at most
#: :data:`_SEGMENT` (and at least :data:`_SEGMENT` / 4) elements (see :func:`_compact_view`).
_LONG_ROW = 32768
_SEGMENT = 16384


def _mesh_is_local() -> bool:
    """True unless a mesh with axes that the compiler partitions is in context."""
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or all(t == jax.sharding.AxisType.Manual for t in mesh.axis_types)


def _compact_view(x: jax.Array, config: NormConfig) -> NormConfig | None:
    """The config of a compact view of ``x`` for the sums, or ``None`` where ``x`` is one already or none applies.

    XLA's CPU reduction library is fastest on long contiguous rows. The view
    merges the adjacent spatial axes into one (an 8x8 image is otherwise 8
    rows of 8); and where channels follow them (channels-last), whose few
    values per position make short rows, it folds ``tile`` consecutive
    positions into the last axis, ``(N, M, C) -> (N, M / tile, tile * C)``,
    a row of about :data:`_VIEW_WIDTH` elements. A channels-first row longer
    than :data:`_LONG_ROW` (a 3D volume) is cut into segments,
    ``(N, C, M) -> (N, C, M / split, split)``: XLA's CPU reduction library sums
    many rows of ~16k elements and then their sums about a quarter faster
    than a few very long rows. And the view has no axis of size 1 but the
    summed one (a batch of one, a single channel): with one, the library's
    sum of a product of two arrays (the backward pass's ``sum(g * d)``, a
    masked sum) runs 50 to 100 times slower. All are free reshapes of a
    contiguous array. Per-instance values meet the view through
    :func:`_spread`, and :func:`spatial_sum` adds the partial sums.

    Not under ``jax.jit`` with a mesh whose axes the compiler partitions, nor
    for an input whose type says a spatial axis is split: the view's axes
    would have to carry the split.
    """
    axes = config.reduce_axes
    spec = jax.typeof(x).sharding.spec
    if config.tile > 1 or config.split > 1 or axes != tuple(range(axes[0], axes[-1] + 1)) or not _mesh_is_local():
        return None
    if any(a < len(spec) and spec[a] is not None for a in axes):
        return None
    size, trail = math.prod(x.shape[a] for a in axes), x.shape[axes[-1] + 1:]
    tile = split = 1
    if len(trail) == 1 and trail[0] > 1:
        tile = max(t for t in range(1, max(1, _VIEW_WIDTH // trail[0]) + 1) if size % t == 0)
    elif _is_one(math.prod(trail)) and isinstance(size, int) and size > _LONG_ROW:
        split = next((t for t in range(_SEGMENT, _SEGMENT // 4 - 1, -1) if size % t == 0), 1)
    lead = sum(not _is_one(n) for n in x.shape[:axes[0]])
    if len(axes) == 1 and tile == split == 1 and lead == axes[0] and not any(map(_is_one, trail)):
        return None
    return config._replace(reduce_axes=(lead,), tile=tile, split=split)


def _is_one(n) -> bool:
    """``n`` (an axis size, perhaps symbolic under ``jax.export``) is the constant 1."""
    return isinstance(n, int) and n == 1


def _to_view(v, shape: tuple[int, ...], config: NormConfig, view: NormConfig):
    """``v`` (``None``, a scalar, or broadcastable to ``shape``) in the view ``view`` of :func:`_compact_view`.

    Arrays with spatial extent take the view's shape; per-instance and
    per-channel arrays keep their last axis untiled (see :func:`_spread`).
    The axes where ``shape`` is 1 are dropped (``v`` is 1 there too).
    """
    if v is None or jnp.ndim(v) == 0:
        return v
    axes = config.reduce_axes
    first, after = axes[0], axes[-1] + 1
    v = jnp.reshape(v, (1,) * (len(shape) - v.ndim) + v.shape)
    lead = tuple(n for n, m in zip(v.shape[:first], shape[:first]) if not _is_one(m))
    trail = tuple(n for n, m in zip(v.shape[after:], shape[after:]) if not _is_one(m))
    if all(v.shape[a] == 1 for a in axes):
        return v.reshape((*lead, 1, *trail, *(1,) * (view.split > 1)))
    full = tuple(shape[a] if a in axes or (view.tile > 1 and a >= after) else n for a, n in enumerate(v.shape))
    v = jnp.broadcast_to(v, full)
    size = math.prod(v.shape[a] for a in axes)
    if view.tile > 1:
        return v.reshape((*lead, size // view.tile, view.tile * math.prod(v.shape[after:])))
    if view.split > 1:
        return v.reshape((*lead, size // view.split, view.split))
    return v.reshape((*lead, size, *trail))


def _spread(v, config: NormConfig):
    """A per-instance (or per-channel) array lined up with the elements of a tiled view: its last axis repeated."""
    if v is None or config.tile == 1 or jnp.ndim(v) == 0 or v.shape[-1] == 1:
        return v
    return jnp.tile(v, (1,) * (v.ndim - 1) + (config.tile,))


def _summed_by_transpose(v: jax.Array, config: NormConfig, shape: tuple[int, ...]) -> jax.Array:
    """A per-instance coefficient of the tangent map, ready to meet ``x`` (of ``shape``) in the view ``config``.

    Its transpose (in the backward pass) is a sum of an x-sized product, made
    the way :func:`spatial_sum` makes one: fenced, and in a split view summed
    over every segment first (the coefficient is spread over the segments,
    fenced, then over their elements).
    """
    v = _fence(v)
    if config.split > 1:
        v = _fence(jnp.broadcast_to(v, (*v.shape[:-2], shape[-2], 1)))
    return _spread(v, config)


def _copies(v: jax.Array, n: int) -> tuple[jax.Array, ...]:
    """``n`` copies of a small per-instance array that XLA does not merge back into one.

    XLA's CPU backend runs a sum in its vectorized reduction library only
    together with the elementwise work that feeds that sum alone: an x-sized
    expression that two sums share (``x - k`` in both, once XLA has merged
    identical expressions) is written to memory and read back instead. A sum
    built on its own copy of ``k`` recomputes its expression from ``x`` within
    its one read. (An optimization barrier: free at run time, and only a
    matter of speed.)
    """
    return lax.optimization_barrier((v,) * n)


def local_spatial_size(shape: tuple[int, ...], config: NormConfig) -> int:
    return math.prod(shape[a] for a in config.reduce_axes) * config.tile * config.split


def valid_count(x: jax.Array, mask: jax.Array | None, config: NormConfig, dtype) -> jax.Array:
    """The number of valid spatial elements of every instance (0 for an all-padding one)."""
    if mask is None:
        count = jnp.asarray(local_spatial_size(x.shape, config), dtype)
        if config.spatial_axis_name is not None:
            count = count * lax.psum(1, config.spatial_axis_name)
        return count
    ones = jnp.broadcast_to(mask, x.shape).astype(dtype)
    return spatial_sum(ones, config)


def _at_least_one(count: jax.Array) -> jax.Array:
    """``count`` as a divisor: an all-padding instance's sums are 0, and stay 0."""
    return jnp.maximum(count, 1)


def inverse_std(var: jax.Array, eps: float, count: jax.Array | None = None) -> jax.Array:
    """``r = 1 / sqrt(var + eps)``, and 0 where ``var + eps == 0`` (PyTorch's rule) or the instance has no
    valid element: the output there is the bias. A NaN variance keeps ``r`` NaN."""
    v = var + eps
    none = v == 0 if count is None else (v == 0) | (count == 0)
    # rsqrt of 1 where unused, so that no derivative of rsqrt at 0 (inf) meets the zero it is selected away by.
    return jnp.where(none, 0, lax.rsqrt(jnp.where(none, 1, v)))


class InstanceStats(NamedTuple):
    """Per-instance statistics, each of shape ``x.shape`` with spatial axes set to 1."""

    shift: jax.Array
    mean_shifted: jax.Array
    var: jax.Array
    count: jax.Array


def instance_stats(x: jax.Array, mask: jax.Array | None, config: NormConfig) -> InstanceStats:
    """Mean and biased variance of every ``(n, c)`` instance by a corrected two-pass algorithm.

    The first pass gives a rough mean ``k = sum(x) / M`` over the valid
    elements; the second sums ``d = x - k`` and ``d * d``, and::

        md  = sum(d) / M                           the correction of the mean, mu = k + md
        var = (sum(d * d) - sum(d) * md) / M       = mean((x - mu)**2) exactly

    ``k`` is within a few ulps of the data's magnitude of the true mean,
    wherever the outliers are, so the correction ``sum(d) * md`` is tiny next
    to ``sum(d * d)``: nothing cancels, and the variance keeps full float
    precision (a one-sweep ``E[x**2] - E[x]**2`` around a value far from the
    mean, e.g. a hot first pixel, would not). A NaN or an infinity gives a
    NaN variance (``maximum`` keeps NaN).

    ``k`` must be one float for every pass and the output (they all centre on
    it and correct by ``md``). XLA recomputes a small expression inside each
    consumer, and in some contracts ``sum * (1 / M)`` and the subtraction into
    one fused multiply-add: rounded to one bit less than its dtype, ``k`` is
    the same float everywhere.

    Each pass is one single-output sum over the spatial axes (of a compact
    view, :func:`_compact_view`), the form XLA's CPU backend hands to its
    vectorized reduction library; on GPU, XLA fuses the sibling sums of the
    second pass into one read of ``x``.
    """
    view = _compact_view(x, config)
    if view is not None:
        stats = instance_stats(*(_to_view(v, x.shape, config, view) for v in (x, mask)), view)
        kept = tuple(1 if a in config.reduce_axes else n for a, n in enumerate(x.shape))
        return InstanceStats(*(v.reshape(kept) if v.ndim else v for v in stats))
    cdt = compute_dtype(x.dtype)
    # Each pass converts x to the compute dtype by itself (in its one read)
    # rather than all sharing one converted copy written to memory.
    x0, x1, x2 = (x,) * 3 if x.dtype == cdt else (v.astype(cdt) for v in _copies(x, 3))
    count = valid_count(x, mask, config, cdt)
    divisor = _at_least_one(count)
    finfo = jnp.finfo(cdt)
    total = spatial_sum(x0 if mask is None else jnp.where(mask, x0, 0), config)
    k = lax.reduce_precision(total / divisor, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant - 1)
    d1, d2 = (xv - _spread(c, config) for xv, c in zip((x1, x2), _copies(k, 2)))
    if mask is not None:
        d1, d2 = jnp.where(mask, d1, 0), jnp.where(mask, d2, 0)
    s1 = spatial_sum(d1, config)
    s2 = spatial_sum(d2 * d2, config)
    md = s1 / divisor
    var = jnp.maximum((s2 - s1 * md) / divisor, 0)
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
    """``(y, center, residual, var, count)`` by the formulas above (the XLA path).

    The mean is ``center + residual``: ``center`` a float close to the mean
    (here the rough mean ``k``), ``residual`` the small rest (here ``md``);
    the tangent map centres on ``center`` and corrects by ``residual``, as
    the output does. ``count`` is the valid count (0 for an all-padding item).
    """
    stats = instance_stats(x, mask, config)
    rstd = inverse_std(stats.var, config.eps, stats.count)
    y = normalize(x, stats.shift, stats.mean_shifted, rstd, weight, bias)
    return y, stats.shift, stats.mean_shifted, stats.var, stats.count


def instance_tangent(config, x, center, residual, rstd, count, weight, mask, dx, dweight, dbias):
    """The linear tangent map of normalization with instance statistics.

    Per instance, with ``dm = mean(dx)`` and ``ds = mean(xhat * dx)`` over the
    valid elements::

        dy    = dx * (w r) + xhat * (dw - w r ds) + (db - w r dm)
        dmean = dm
        dvar  = 2 ds / r = 2 mean((x - mu) * dx)          (no division: r may be 0)

    Every input-sized term is ``dx``, ``xhat`` or ``d = x - center`` times a
    per-instance coefficient, so the transposed program (the backward pass)
    needs exactly two per-instance sums, ``sum(g)`` and ``sum(g * d)``, with
    nothing input-sized to materialize in between. ``ds`` sums ``x - mu``
    recomputed as the forward pass does it (:func:`centered`, exact): its
    transpose is the input cotangent's ``xhat`` term, which a split into
    ``d - e`` (``e`` the residual) would cancel where ``e`` is not small next
    to the spread (an item with one valid element). The output's ``xhat * B``
    is split, ``d * (r B) - e r B``: its transpose is the sum,
    ``sum(g * d) - e sum(g)``, one subtraction per element fewer.
    """
    view = _compact_view(x, config)
    if view is not None:
        views = (_to_view(v, x.shape, config, view)
                 for v in (x, center, residual, rstd, count, weight, mask, dx, dweight, dbias))
        dy, dmean, dvar = instance_tangent(view, *views)
        return dy.reshape(x.shape), dmean.reshape(center.shape), dvar.reshape(center.shape)
    cdt = rstd.dtype
    divisor = _at_least_one(count)
    # One centred x for the sums of the tangent, one for its output: in the
    # transposed program (the backward pass) the latter becomes the sum of
    # g * d, the former a term of the input's cotangent; unshared, each is
    # recomputed from x where it is used.
    x_sum, x_out = (x, x) if x.dtype == cdt else _copies(x, 2)
    center_sum, center_out = _copies(center, 2)
    dxc = dx.astype(cdt)
    dxm = dxc if mask is None else jnp.where(mask, dxc, 0)
    dm = spatial_sum(dxm, config) / divisor
    deviation = centered(x_sum, _spread(center_sum, config), _spread(residual, config))
    spread_dx = spatial_sum(deviation * dxm, config) / divisor  # mean((x - mu) dx) = ds / r
    ds = rstd * spread_dx
    a = rstd if weight is None else rstd * weight
    b = -a * ds
    c = -a * dm
    if dweight is not None:
        b = b + dweight
    if dbias is not None:
        c = c + dbias
    rb = rstd * b
    # The backward pass's sum(g * d) and sum(g) are the transposes of these two.
    d_out = centered(x_out, _spread(center_out, config), None)
    dy = dxc * _spread(a, config) + d_out * _summed_by_transpose(rb, config, x.shape)
    dy = (dy + _summed_by_transpose(c - residual * rb, config, x.shape)).astype(x.dtype)
    return dy, dm, 2 * spread_dx


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
