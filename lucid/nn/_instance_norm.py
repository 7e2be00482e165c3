"""The math of instance normalization: statistics, normalization, derivative rules.

Everything here works on arrays (``jax.numpy``/``lax``, and one primitive pair
for the native backward kernel); nothing imports the ``Tensor``/``Module``
facade. Every public entry point of lucid (the functional API, the modules,
the ``Tensor`` path) ends in :func:`normalize_with_instance_stats`
or :func:`normalize_with_running_stats`, so each formula lives here once.

Notation, per instance ``(n, c)`` and its ``M`` (valid) spatial elements::

    k      a shift close to the mean (the XLA path: the rough mean sum(x) / M)
    md     mean(x - k)                     so the mean is  mu = k + md
    var    mean((x - mu)**2)               biased, used for normalization
    r      1 / sqrt(var + eps)
    xhat   ((x - k) - md) * r
    y      xhat * w + b

Why the shift: in float32, ``x`` with mean 1e4 and unit spread has an ulp of
about 1e-3, so rounding ``mu`` itself to float32 already costs 5e-4 of output
accuracy. ``x - k`` is exact (both are floats of the same magnitude), and
``md`` is a small number carrying full relative precision, so ``(x - k) - md``
keeps the output within a few ulps of a float64 reference. And with ``k``
near the mean, wherever the outliers are, the variance's sums of ``x - k``
cancel nothing (:func:`instance_stats`, a corrected two-pass algorithm).

Why ``custom_jvp`` (and not ``custom_vjp``): a JVP rule that is linear in the
tangents gives forward mode (``jvp``, ``jacfwd``, ``hessian``) directly, and
JAX transposes it for reverse mode, so one hand-derived rule serves both and
all higher orders. The rule is written in "per-instance coefficient" form::

    dy = dx * A + xhat * B + C        A, B, C of shape (N, C) only

whose transpose is exactly the hand-derived backward pass::

    g1 = sum_s(dy), g2 = sum_s(dy * xhat)            (two per-instance sums)
    dx = w * r * (dy - g1 / M - xhat * g2 / M)
    dw = sum_n(g2),  db = sum_n(g1)                   (from the small partials)

The tangent map runs under ``jax.checkpoint``: without it, JAX's partial
evaluation would save ``xhat`` (a second input-sized array) for the backward
pass. With it, reverse mode keeps only ``x`` (an input anyway) and the O(N*C)
statistics, and recomputes ``xhat`` inside the fused backward kernel.

Where lucid's native CPU kernels apply (:mod:`lucid.nn._native`), the same
tangent map is one primitive whose transpose rule calls the native backward
kernel: the two per-instance sums from one read of ``x`` and the cotangent,
then ``dx`` from cache (see "The tangent map as a primitive pair" below).
"""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax._src import dispatch
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _native


class Layout(NamedTuple):
    """Static description of how an input is laid out.

    Attributes:
        reduce_axes: the spatial axes of the input (every axis but batch and channel).
        spatial_axis_name: names of mapped axes that split the spatial axes
            (``shard_map``/``pmap``), or ``None``.
        eps: added to the variance before the square root.
        native: allow lucid's native CPU kernel where it applies (see
            :mod:`lucid.nn._native`); part of the static layout so that
            turning it off retraces instead of reusing a compiled program.
        tile: in the compact view of :func:`_compact_view` only: how many
            consecutive spatial positions share the last axis.
    """

    reduce_axes: tuple[int, ...]
    spatial_axis_name: str | tuple[str, ...] | None
    eps: float
    native: bool = False
    tile: int = 1


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
    the kernel is the sum alone: :func:`_spatial_sum` fences every sum; a
    per-instance coefficient fenced before it is broadcast against ``x``
    fences the sum that the transposed program (the backward pass) makes of it.
    """
    finfo = jnp.finfo(v.dtype)
    return lax.reduce_precision(v, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant)


def _spatial_sum(v: jax.Array, layout: Layout) -> jax.Array:
    """Sum over the spatial axes of every instance, across devices if they are split (fenced: :func:`_fence`).

    In a tiled view (:func:`_compact_view`) the sum over the spatial axis
    leaves ``tile`` partial sums per instance along the last axis; they are added last.
    """
    s = jnp.sum(v, axis=layout.reduce_axes, keepdims=True)
    if layout.tile > 1:
        s = jnp.sum(s.reshape(*s.shape[:-1], layout.tile, s.shape[-1] // layout.tile), axis=-2)
    s = _fence(s)
    if layout.spatial_axis_name is not None:
        s = lax.psum(s, layout.spatial_axis_name)
    return s


#: The compact view's target width of its last axis, in elements (see :func:`_compact_view`).
_VIEW_WIDTH = 512


def _compact_view(x: jax.Array, layout: Layout) -> Layout | None:
    """The layout of a compact view of ``x`` for the sums, or ``None`` where ``x`` is one already or none applies.

    XLA's CPU reduction library is fastest on long contiguous rows. The view
    merges the adjacent spatial axes into one (an 8x8 image is otherwise 8
    rows of 8); and where channels follow them (channels-last), whose few
    values per position make short rows, it folds ``tile`` consecutive
    positions into the last axis, ``(N, M, C) -> (N, M / tile, tile * C)``,
    a row of about :data:`_VIEW_WIDTH` elements. Both are free reshapes of a
    contiguous array. Per-instance values meet the view through
    :func:`_spread`, and :func:`_spatial_sum` adds the partial sums.

    Not under ``jax.jit`` with a mesh whose axes the compiler partitions, nor
    for an input whose type says a spatial axis is split: the view's axes
    would have to carry the split.
    """
    axes = layout.reduce_axes
    spec = jax.typeof(x).sharding.spec
    if layout.tile > 1 or axes != tuple(range(axes[0], axes[-1] + 1)) or not _native._mesh_is_local():
        return None
    if any(a < len(spec) and spec[a] is not None for a in axes):
        return None
    size, trail = math.prod(x.shape[a] for a in axes), x.shape[axes[-1] + 1:]
    tile = 1
    if len(trail) == 1 and trail[0] > 1:
        tile = max(t for t in range(1, max(1, _VIEW_WIDTH // trail[0]) + 1) if size % t == 0)
    if len(axes) == 1 and tile == 1:
        return None
    return layout._replace(reduce_axes=(axes[0],), tile=tile)


def _to_view(v, shape: tuple[int, ...], layout: Layout, view: Layout):
    """``v`` (``None``, a scalar, or broadcastable to ``shape``) in the view ``view`` of :func:`_compact_view`.

    Arrays with spatial extent take the view's shape; per-instance and
    per-channel arrays keep their last axis untiled (see :func:`_spread`).
    """
    if v is None or jnp.ndim(v) == 0:
        return v
    axes = layout.reduce_axes
    lead, trail = axes[0], axes[-1] + 1
    v = jnp.reshape(v, (1,) * (len(shape) - v.ndim) + v.shape)
    if all(v.shape[a] == 1 for a in axes):
        return v.reshape((*v.shape[:lead], 1, *v.shape[trail:]))
    full = tuple(shape[a] if a in axes or (view.tile > 1 and a >= trail) else n for a, n in enumerate(v.shape))
    v = jnp.broadcast_to(v, full)
    size = math.prod(v.shape[a] for a in axes)
    if view.tile > 1:
        return v.reshape((*v.shape[:lead], size // view.tile, view.tile * math.prod(v.shape[trail:])))
    return v.reshape((*v.shape[:lead], size, *v.shape[trail:]))


def _spread(v, layout: Layout):
    """A per-instance (or per-channel) array lined up with the elements of a tiled view: its last axis repeated."""
    if v is None or layout.tile == 1 or jnp.ndim(v) == 0 or v.shape[-1] == 1:
        return v
    return jnp.tile(v, (1,) * (v.ndim - 1) + (layout.tile,))


def _local_spatial_size(shape: tuple[int, ...], layout: Layout) -> int:
    return math.prod(shape[a] for a in layout.reduce_axes) * layout.tile


def _shift(xc: jax.Array, mask: jax.Array | None, count: jax.Array, layout: Layout) -> jax.Array:
    """A rough mean ``k`` of every instance: the centre of :func:`instance_stats`'s second pass.

    ``sum(x) / M`` over the valid elements (one read of ``x``, summed across
    devices like every other statistic): within a few ulps of the data's
    magnitude of the mean, wherever the outliers are. The second pass corrects it.

    Its exact value does not matter, but it must be one value: the sums and
    the output all centre on ``k`` and correct by ``md``, which adds up only if
    they subtract the same float. XLA recomputes a small expression inside
    each of its consumers, and there contracts a multiply feeding a subtraction
    into one fused multiply-add: one pass would subtract the unrounded
    ``sum * (1 / M)``, another the rounded one. Rounded to one bit less than
    its dtype (an operation that is neither an addition nor an identity XLA
    could drop), ``k`` is the same float in every consumer.
    """
    finfo = jnp.finfo(xc.dtype)
    total = _spatial_sum(xc if mask is None else jnp.where(mask, xc, 0), layout)
    return lax.reduce_precision(total / count, exponent_bits=finfo.nexp, mantissa_bits=finfo.nmant - 1)


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


def _valid_count(x: jax.Array, mask: jax.Array | None, layout: Layout, dtype) -> jax.Array:
    """Number of valid spatial elements per instance, at least 1 (an all-padding
    instance then normalizes to its bias instead of dividing by zero)."""
    if mask is None:
        count = jnp.asarray(_local_spatial_size(x.shape, layout), dtype)
        if layout.spatial_axis_name is not None:
            count = count * lax.psum(1, layout.spatial_axis_name)
        return count
    ones = jnp.broadcast_to(mask, x.shape).astype(dtype)
    return jnp.maximum(_spatial_sum(ones, layout), 1)


class InstanceStats(NamedTuple):
    """Per-instance statistics, each of shape ``x.shape`` with spatial axes set to 1."""

    shift: jax.Array
    mean_shifted: jax.Array
    var: jax.Array
    count: jax.Array


def instance_stats(x: jax.Array, mask: jax.Array | None, layout: Layout) -> InstanceStats:
    """Mean and biased variance of every ``(n, c)`` instance by a corrected two-pass algorithm.

    The first pass gives a rough mean ``k`` (:func:`_shift`); the second sums
    ``d = x - k`` and ``d * d``, and::

        md  = sum(d) / M                           the correction of the mean, mu = k + md
        var = (sum(d * d) - sum(d) * md) / M       = mean((x - mu)**2) exactly

    ``k`` is within a few ulps of the data's magnitude of the true mean,
    wherever the outliers are, so the correction ``sum(d) * md`` is tiny next
    to ``sum(d * d)``: nothing cancels, and the variance keeps full float
    precision (a one-sweep ``E[x**2] - E[x]**2`` around a value far from the
    mean, e.g. a hot first pixel, would not).

    Each pass is one single-output sum over the spatial axes (of a compact
    view, :func:`_compact_view`), the form XLA's CPU backend hands to its
    vectorized reduction library (a multi-output reduce is compiled to much
    slower scalar loops); on GPU, XLA fuses the sibling sums of the second
    pass into one read of ``x``.
    """
    view = _compact_view(x, layout)
    if view is not None:
        stats = instance_stats(*(_to_view(v, x.shape, layout, view) for v in (x, mask)), view)
        kept = tuple(1 if a in layout.reduce_axes else n for a, n in enumerate(x.shape))
        return InstanceStats(*(v.reshape(kept) if v.ndim else v for v in stats))
    cdt = compute_dtype(x.dtype)
    # Each pass converts x to the compute dtype by itself (in its one read)
    # rather than all sharing one converted copy written to memory.
    x0, x1, x2 = (x,) * 3 if x.dtype == cdt else (v.astype(cdt) for v in _copies(x, 3))
    count = _valid_count(x, mask, layout, cdt)
    k = _shift(x0, mask, count, layout)
    d1, d2 = (xv - _spread(c, layout) for xv, c in zip((x1, x2), _copies(k, 2)))
    if mask is not None:
        d1, d2 = jnp.where(mask, d1, 0), jnp.where(mask, d2, 0)
    s1 = _spatial_sum(d1, layout)
    s2 = _spatial_sum(d2 * d2, layout)
    md = s1 / count
    var = jnp.maximum((s2 - s1 * md) / count, 0)
    return InstanceStats(k, md, var, count)


def _centered(x: jax.Array, shift: jax.Array, mean_shifted: jax.Array | None) -> jax.Array:
    """``(x - k) - md`` in the compute dtype (``md`` is ``None`` for running stats)."""
    centered = x.astype(shift.dtype) - shift
    return centered if mean_shifted is None else centered - mean_shifted


def _normalize(x, shift, mean_shifted, rstd, weight, bias) -> jax.Array:
    """``y = ((x - k) - md) * (r * w) + b``: centre first, then one multiply-add.

    ``r * w`` is folded on the small (N, C) side, never ``x * a + c``, which
    would cancel catastrophically for data far from zero.
    """
    scale = rstd if weight is None else rstd * weight
    y = _centered(x, shift, mean_shifted) * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


# --------------------------------------------------------------------------
# Instance statistics (training, or no running statistics)
# --------------------------------------------------------------------------


def normalize_with_instance_stats(x, weight, bias, mask, layout: Layout):
    """Normalize every ``(n, c)`` instance with its own statistics.

    Args:
        x: input of any float dtype; ``layout.reduce_axes`` are its spatial axes.
        weight, bias: ``None`` or arrays broadcastable to ``x`` (channel-shaped).
        mask: ``None`` or a boolean array broadcastable to ``x``; statistics
            use only the elements where it is ``True``. Every element is
            normalized (padding too) with its instance's statistics.
        layout: static axes, collective names and ``eps``.

    Returns:
        ``(y, mean, var)``: ``y`` in ``x.dtype``; the per-instance mean and
        biased variance in the compute dtype, of shape ``x.shape`` with the
        spatial axes set to 1; and the valid count of each instance.
    """
    y, center, residual, var, count = _normalize_and_stats(x, weight, bias, mask, layout)
    return y, center + residual, var, count


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _normalize_and_stats(x, weight, bias, mask, layout: Layout):
    """``(y, center, residual, var, count)``: the output and per-instance statistics.

    The mean is ``center + residual``: ``center`` a float close to the mean,
    ``residual`` the small rest (the tangent map centres on ``center`` and
    corrects by ``residual``, as the output does). The XLA path gives the
    rough mean ``k`` and its correction ``md`` (:func:`instance_stats`); on
    CPU, where it applies, lucid's native kernel computes the rounded mean and
    its rounding error in one read of ``x`` (:mod:`lucid.nn._native`).
    """

    def with_xla():
        stats = instance_stats(x, mask, layout)
        rstd = lax.rsqrt(stats.var + layout.eps)
        y = _normalize(x, stats.shift, stats.mean_shifted, rstd, weight, bias)
        return y, stats.shift, stats.mean_shifted, stats.var, stats.count

    if not (layout.native and _native.eligible(x, weight, bias, mask, layout.reduce_axes, layout.spatial_axis_name)):
        return with_xla()

    def with_kernel():
        y, mean, residual, var = _native.forward(x, weight, bias, layout.eps, layout.reduce_axes)
        return y, mean, residual, var, _valid_count(x, None, layout, jnp.float32)

    return lax.platform_dependent(cpu=with_kernel, default=with_xla)


def _instance_tangent(layout, x, center, residual, rstd, count, weight, mask, dx, dweight, dbias):
    """The linear tangent map of :func:`normalize_with_instance_stats`.

    Per instance, with ``dm = mean(dx)`` and ``ds = mean(xhat * dx)`` over the
    valid elements::

        dy    = dx * (w r) + xhat * (dw - w r ds) + (db - w r dm)
        dmean = dm
        dvar  = 2 ds / r          since  x - mu = xhat / r

    Every input-sized term is ``dx``, ``xhat`` or ``d = x - center`` times a
    per-instance coefficient, so the transposed program (the backward pass)
    needs exactly two per-instance sums, ``sum(g)`` and ``sum(g * d)``, with
    nothing input-sized to materialize in between. ``ds`` sums ``xhat``
    recomputed as the forward pass does it (:func:`_centered`, exact): its
    transpose is the input cotangent's ``xhat`` term, which a split into
    ``d * r - e * r`` (``e`` the residual) would cancel where ``e`` is not
    small next to the spread (an item with one valid element). The output's
    ``xhat * B`` is split, ``d * (r B) - e r B``: its transpose is the sum,
    ``sum(g * d) - e sum(g)``, one subtraction per element fewer.
    """
    view = _compact_view(x, layout)
    if view is not None:
        views = (_to_view(v, x.shape, layout, view)
                 for v in (x, center, residual, rstd, count, weight, mask, dx, dweight, dbias))
        dy, dmean, dvar = _instance_tangent(view, *views)
        return dy.reshape(x.shape), dmean.reshape(center.shape), dvar.reshape(center.shape)
    cdt = rstd.dtype
    # One centred x for the sums of the tangent, one for its output: in the
    # transposed program (the backward pass) the latter becomes the sum of
    # g * d, the former a term of the input's cotangent; unshared, each is
    # recomputed from x where it is used.
    x_sum, x_out = (x, x) if x.dtype == cdt else _copies(x, 2)
    center_sum, center_out = _copies(center, 2)
    dxc = dx.astype(cdt)
    dxm = dxc if mask is None else jnp.where(mask, dxc, 0)
    dm = _spatial_sum(dxm, layout) / count
    centered_sum = _centered(x_sum, _spread(center_sum, layout), _spread(residual, layout))
    ds = rstd * (_spatial_sum(centered_sum * dxm, layout) / count)
    a = rstd if weight is None else rstd * weight
    b = -a * ds
    c = -a * dm
    if dweight is not None:
        b = b + dweight
    if dbias is not None:
        c = c + dbias
    rb = rstd * b
    # Fenced before they meet x: the backward pass's sum(g * d) and sum(g) are their transposes.
    dy = dxc * _spread(a, layout) + _centered(x_out, _spread(center_out, layout), None) * _spread(_fence(rb), layout)
    dy = (dy + _spread(_fence(c - residual * rb), layout)).astype(x.dtype)
    return dy, dm, 2 * ds / rstd


@_normalize_and_stats.defjvp
def _normalize_and_stats_jvp(layout, primals, tangents):
    x, weight, bias, mask = primals
    dx, dweight, dbias, _ = tangents
    # The primal through the function itself, not its body: at higher orders
    # JAX differentiates this rule, and must meet this rule again rather than
    # the statistics' implementation (the native kernel has no derivative).
    primal_out = y, center, residual, var, count = _normalize_and_stats(x, weight, bias, mask, layout)
    rstd = lax.rsqrt(var + layout.eps)
    # The tangent map centres on `center`, a computed (N, C) array rather than
    # a slice of x, so XLA fuses the recomputation of x - center into the
    # backward reductions instead of materializing it. x - center is exact
    # (floats of one magnitude); the small residual keeps
    # xhat = ((x - center) - residual) * r exact.
    dweight = None if weight is None else dweight
    dbias = None if bias is None else dbias
    if layout.native and _native.eligible(x, weight, bias, mask, layout.reduce_axes, layout.spatial_axis_name):
        # The same map as one primitive, whose transpose runs the native backward kernel on CPU.
        dy, dmean, dvar = _kernel_tangent(layout, x, center, residual, rstd, weight, dx, dweight, dbias)
    else:
        # The tangent map recomputes xhat instead of saving it (see the module docstring);
        # prevent_cse keeps XLA from sharing x - center with the forward pass.
        tangent = jax.checkpoint(partial(_instance_tangent, layout), prevent_cse=True)
        dy, dmean, dvar = tangent(x, center, residual, rstd, count, weight, mask, dx, dweight, dbias)
    # Only the mean, center + residual, is a quantity with a derivative: the
    # whole of it goes to `center`, the residual's is zero.
    return primal_out, (dy, dmean, jnp.zeros_like(residual), dvar, jnp.zeros_like(count))


# --------------------------------------------------------------------------
# The tangent map as a primitive pair, for the native backward kernel
# --------------------------------------------------------------------------
#
# JAX transposes a program one primitive at a time, so a hand-written backward
# pass can only replace the transpose of the tangent map if the tangent map is
# itself one primitive. ``_tangent_p`` is that map, and ``_cotangent_p`` its
# transpose; each is the other's transpose rule, so reverse mode of any order
# alternates between them. Their derivatives (second order and up) and their
# lowering on other platforms are the ``jnp`` formulas of ``_instance_tangent``
# (the cotangent as its ``jax.vjp``), so the kernel is never differentiated and
# no formula is written twice. On CPU ``_cotangent_p`` lowers to the kernel.
#
# Operands: ``x, mean, residual, rstd, weight`` (the point of linearization),
# then three linear ones: ``dx, dweight, dbias`` into ``_tangent_p``, giving
# ``dy, dmean, dvar``; the cotangents of those into ``_cotangent_p``, giving
# those of ``dx, dweight, dbias``. ``x`` and ``dx``/``dy`` keep the caller's
# shape, ``(N, C, *spatial)`` (``channels_last=0``) or ``(N, *spatial, C)``,
# so that reverse mode saves ``x`` itself; statistics are ``(N, C)`` and
# weight ``(C,)``. ``vmap`` adds leading axes to every operand (``leading``
# counts them), over which weight and bias may differ.

_tangent_p = Primitive("lucid_instance_norm_tangent")
_cotangent_p = Primitive("lucid_instance_norm_cotangent")
_NUM_POINT = 5  # operands before the linear ones


def _in_kernel_layout(fn):
    """Runs ``fn`` on the kernels' layout: ``x`` and the first linear operand
    as ``(P, N, C, M)`` or ``(P, N, M, C)``, the others ``(P, N, C)`` or ``(P, C)``,
    with ``P`` the product of the leading axes; outputs return to the operands' shapes."""

    def wrapped(*operands, channels_last, leading):
        x = operands[0]
        lead = x.shape[:leading]
        p = math.prod(lead)
        n, c = x.shape[leading], x.shape[-1 if channels_last else leading + 1]
        m = x.size // (p * n * c) if x.size else 0
        view = (p, n, m, c) if channels_last else (p, n, c, m)
        inputs = [v.reshape(view) if v.shape == x.shape else v.reshape((p, *v.shape[leading:])) for v in operands]
        outs = fn(*inputs, channels_last=channels_last)
        return [o.reshape(x.shape) if o.ndim == 4 else o.reshape((*lead, *o.shape[1:])) for o in outs]

    return wrapped


def _spatial_axis(channels_last: int) -> int:
    """The spatial axis of the kernels' 4-d layout."""
    return 2 if channels_last else 3


def _tangent_in_kernel_layout(x, mean, residual, rstd, weight, dx, dweight, dbias, *, channels_last):
    """:func:`_instance_tangent` on the kernels' layout."""
    spatial = _spatial_axis(channels_last)
    per_instance = partial(jnp.expand_dims, axis=spatial)  # (P, N, C) -> x's rank

    def per_channel(v):  # (P, C) -> x's rank
        return jnp.expand_dims(v, (1, spatial))

    count = jnp.asarray(x.shape[spatial], rstd.dtype)
    dy, dmean, dvar = _instance_tangent(
        Layout((spatial,), None, 0.0), x, per_instance(mean), per_instance(residual), per_instance(rstd), count,
        per_channel(weight), None, dx, per_channel(dweight), per_channel(dbias),
    )
    return dy, jnp.squeeze(dmean, spatial), jnp.squeeze(dvar, spatial)


def _cotangent_in_kernel_layout(x, mean, residual, rstd, weight, gy, gmean, gvar, *, channels_last):
    """The transpose of :func:`_tangent_in_kernel_layout` in its linear operands."""
    tangent = partial(_tangent_in_kernel_layout, x, mean, residual, rstd, weight, channels_last=channels_last)
    zeros = (jnp.zeros_like(x), jnp.zeros_like(weight), jnp.zeros_like(weight))
    return jax.vjp(tangent, *zeros)[1]((gy, gmean, gvar))


def _cotangent_with_kernel(x, mean, residual, rstd, weight, gy, gmean, gvar, *, channels_last):
    gx, g1, g2 = _native.backward(x, gy, mean, residual, rstd, weight, gmean, gvar, channels_last)
    # d weight = sum_n sum_s(gy * xhat), d bias = sum_n sum_s(gy): from the per-instance partials.
    return gx, jnp.sum(g2, axis=1), jnp.sum(g1, axis=1)


def _tangent_abstract_eval(x, mean, residual, rstd, weight, dx, dweight, dbias, **params):
    return [dx, mean, mean]


def _cotangent_abstract_eval(x, mean, residual, rstd, weight, gy, gmean, gvar, **params):
    return [gy, weight, weight]


def _transpose_into(other: Primitive):
    """The transpose rule of one primitive of the pair: a call of the other."""

    def transpose(cts, *operands, **params):
        point, linear = operands[:_NUM_POINT], operands[_NUM_POINT:]
        if any(ad.is_undefined_primal(v) for v in point):
            raise ValueError("lucid's tangent map is linear in its last three operands only")
        if all(type(ct) is ad.Zero for ct in cts):
            return [None] * len(operands)
        outs = other.bind(*point, *map(ad.instantiate_zeros, cts), **params)
        return [None] * _NUM_POINT + [o if ad.is_undefined_primal(v) else None for o, v in zip(outs, linear)]

    return transpose


def _jvp_from(reference):
    """A JVP rule from the ``jnp`` formula: derivatives never meet the kernel."""

    def jvp(primals, tangents, **params):
        return jax.jvp(partial(reference, **params), tuple(primals), tuple(map(ad.instantiate_zeros, tangents)))

    return jvp


def _batch_into_leading_axis(prim: Primitive):
    """A ``vmap`` rule: the mapped axis becomes one more leading axis of every operand."""

    def batch(operands, dims, channels_last, leading):
        size = next(v.shape[d] for v, d in zip(operands, dims) if d is not None)
        moved = [jnp.broadcast_to(v, (size, *v.shape)) if d is None else jnp.moveaxis(v, d, 0) for v, d in zip(operands, dims)]
        outs = prim.bind(*moved, channels_last=channels_last, leading=leading + 1)
        return outs, [0] * len(outs)

    return batch


for _prim, _other, _reference, _abstract_eval in (
    (_tangent_p, _cotangent_p, _in_kernel_layout(_tangent_in_kernel_layout), _tangent_abstract_eval),
    (_cotangent_p, _tangent_p, _in_kernel_layout(_cotangent_in_kernel_layout), _cotangent_abstract_eval),
):
    _prim.multiple_results = True
    _prim.def_impl(partial(dispatch.apply_primitive, _prim))
    _prim.def_abstract_eval(_abstract_eval)
    ad.primitive_jvps[_prim] = _jvp_from(_reference)
    ad.primitive_transposes[_prim] = _transpose_into(_other)
    batching.primitive_batchers[_prim] = _batch_into_leading_axis(_prim)
    mlir.register_lowering(_prim, mlir.lower_fun(_reference, multiple_results=True))
mlir.register_lowering(
    _cotangent_p, mlir.lower_fun(_in_kernel_layout(_cotangent_with_kernel), multiple_results=True), platform="cpu"
)


def _kernel_tangent(layout: Layout, x, mean, residual, rstd, weight, dx, dweight, dbias):
    """:func:`_instance_tangent` for a call the kernel computes, through ``_tangent_p``."""
    order = _native.channel_order(x.ndim, layout.reduce_axes)
    n, c = x.shape[0], x.shape[-1 if order else 1]

    def per_instance(v):
        return v.reshape(n, c)

    per_channel = partial(_native.channel_vector, c=c)
    operands = _native.match_varying(
        x, per_instance(mean), per_instance(residual), per_instance(rstd), per_channel(weight, fill=1.0),
        dx, per_channel(dweight, fill=0.0), per_channel(dbias, fill=0.0),
    )
    dy, dmean, dvar = _tangent_p.bind(*operands, channels_last=order, leading=0)
    return dy, dmean.reshape(mean.shape), dvar.reshape(mean.shape)


# --------------------------------------------------------------------------
# Running statistics (evaluation)
# --------------------------------------------------------------------------


@partial(jax.custom_jvp, nondiff_argnums=(5,))
def normalize_with_running_stats(x, running_mean, running_var, weight, bias, layout: Layout):
    """Normalize with given per-channel statistics: ``(x - rm) / sqrt(rv + eps) * w + b``.

    ``running_mean``/``running_var``/``weight``/``bias`` are broadcastable to
    ``x`` (channel-shaped); ``weight``/``bias`` may be ``None``.
    """
    cdt = compute_dtype(x.dtype)
    rstd = lax.rsqrt(running_var.astype(cdt) + layout.eps)
    return _normalize(x, running_mean.astype(cdt), None, rstd, weight, bias)


def _running_tangent(layout, x, running_mean, rstd, weight, dx, drunning_mean, drunning_var, dweight, dbias):
    """The linear tangent map of :func:`normalize_with_running_stats`.

    With ``xhat = (x - rm) r`` and ``dr = -r**3 / 2 * drv``::

        dy = dx * (w r) + xhat * (dw + w dr / r) + (db - w r drm)
    """
    cdt = rstd.dtype
    xhat = _centered(x, running_mean, None) * rstd
    a = rstd if weight is None else rstd * weight
    w = 1 if weight is None else weight
    b = -0.5 * w * rstd * rstd * drunning_var.astype(cdt)
    c = -a * drunning_mean.astype(cdt)
    if dweight is not None:
        b = b + dweight
    if dbias is not None:
        c = c + dbias
    return (dx.astype(cdt) * a + xhat * b + c).astype(x.dtype)


@normalize_with_running_stats.defjvp
def _normalize_with_running_stats_jvp(layout, primals, tangents):
    x, running_mean, running_var, weight, bias = primals
    dx, drm, drv, dweight, dbias = tangents
    cdt = compute_dtype(x.dtype)
    rm = running_mean.astype(cdt)
    rstd = lax.rsqrt(running_var.astype(cdt) + layout.eps)
    y = _normalize(x, rm, None, rstd, weight, bias)
    tangent = jax.checkpoint(partial(_running_tangent, layout), prevent_cse=False)
    dy = tangent(
        x, rm, rstd, weight, dx, drm, drv,
        None if weight is None else dweight, None if bias is None else dbias,
    )
    return y, dy


# --------------------------------------------------------------------------
# Running-statistics update
# --------------------------------------------------------------------------


def update_running_stats(
    stats: dict,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    momentum,
    axis_name,
    channel_axis: int,
) -> dict:
    """The PyTorch rule, with ``momentum=None`` as the cumulative moving average.

    ``running_mean = (1 - m) running_mean + m * mean_n(mean)`` and
    ``running_var = (1 - m) running_var + m * mean_n(var * M / (M - 1))``, the
    batch averages taken over the whole batch, across ``axis_name`` devices.
    ``M`` is each instance's valid count (clamped so that ``M - 1 >= 1``).
    """
    cdt = mean.dtype
    unbiased = var * count / jnp.maximum(count - 1, 1)
    # Reduce everything but the channel axis: (N, ..., C, ...) -> (C,)
    other = tuple(a for a in range(mean.ndim) if a != channel_axis)
    sum_mean = jnp.sum(mean, axis=other)
    sum_var = jnp.sum(jnp.broadcast_to(unbiased, mean.shape), axis=other)
    n = jnp.asarray(math.prod(mean.shape[a] for a in other), cdt)
    if axis_name is not None:
        sum_mean, sum_var, n = lax.psum((sum_mean, sum_var, n), axis_name)
    tracked = stats.get("num_batches_tracked")
    new = {}
    if tracked is not None:
        new["num_batches_tracked"] = tracked + 1
    if momentum is None:
        factor = 1.0 / new["num_batches_tracked"].astype(cdt)
    else:
        factor = jnp.asarray(momentum, cdt)
    rm, rv = stats["running_mean"], stats["running_var"]
    new["running_mean"] = ((1 - factor) * rm.astype(cdt) + factor * (sum_mean / n)).astype(rm.dtype)
    new["running_var"] = ((1 - factor) * rv.astype(cdt) + factor * (sum_var / n)).astype(rv.dtype)
    return {key: new[key] for key in stats}
