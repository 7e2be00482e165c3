"""The primitives that reach lucid's native CPU kernels.

JAX transposes a program one primitive at a time, so a hand-written backward
pass can only replace the transpose of the tangent map if the tangent map is
itself one primitive. ``_tangent_p`` is that map, and ``_cotangent_p`` its
transpose; each is the other's transpose rule, so reverse mode of any order
alternates between them. ``_forward_p`` computes the output and the
statistics. On CPU, ``_forward_p`` and ``_cotangent_p`` lower to the kernels
(:mod:`lucid.nn._native`); on every other platform, and for ``_tangent_p``,
they lower to the ``jnp`` formulas of :mod:`lucid.nn._stats`, which are also
their derivatives (second order and up): the kernels are never differentiated
and no formula is written twice.

Operands keep the caller's layout, ``(N, C, *spatial)`` (``channels_last=0``)
or ``(N, *spatial, C)``, so that reverse mode saves ``x`` itself; statistics
are ``(N, C)`` and weight ``(C,)``. ``vmap`` adds leading axes to every
operand (``leading`` counts them), over which weight and bias may differ.
For the tangent pair: ``x, mean, residual, rstd, weight`` (the point of
linearization), then three linear ones: ``dx, dweight, dbias`` into
``_tangent_p``, giving ``dy, dmean, dvar``; the cotangents of those into
``_cotangent_p``, giving those of ``dx, dweight, dbias``.

This is the one module that uses ``jax.interpreters`` (the registries of
differentiation, batching and lowering rules, which have no public
replacement).
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

from . import _native, _stats
from ._stats import NormConfig

_forward_p = Primitive("lucid_instance_norm_forward")
_tangent_p = Primitive("lucid_instance_norm_tangent")
_cotangent_p = Primitive("lucid_instance_norm_cotangent")
_NUM_POINT = 5  # operands of the tangent pair before the linear ones

for _prim in (_forward_p, _tangent_p, _cotangent_p):
    _prim.multiple_results = True


# --------------------------------------------------------------------------
# The formulas on the kernels' layout
# --------------------------------------------------------------------------


def _in_kernel_layout(fn):
    """Runs ``fn`` on the kernels' layout: ``x`` and the operands shaped like it as
    ``(P, N, C, M)`` or ``(P, N, M, C)``, the others ``(P, N, C)`` or ``(P, C)``,
    with ``P`` the product of the leading axes; outputs return to the operands' shapes."""

    def wrapped(*operands, channels_last, leading, **params):
        x = operands[0]
        view = _native.kernel_view(x.shape, channels_last, leading)
        lead = x.shape[:leading]
        inputs = [v.reshape(view.shape) if v.shape == x.shape else v.reshape((view.p, *v.shape[leading:]))
                  for v in operands]
        outs = fn(*inputs, channels_last=channels_last, **params)
        return [o.reshape(x.shape) if o.ndim == 4 else o.reshape((*lead, *o.shape[1:])) for o in outs]

    return wrapped


def _spatial_axis(channels_last: int) -> int:
    """The spatial axis of the kernels' 4-d layout."""
    return 2 if channels_last else 3


def _per_instance(v, channels_last):  # (P, N, C) -> broadcastable to the 4-d layout
    return jnp.expand_dims(v, _spatial_axis(channels_last))


def _per_channel(v, channels_last):  # (P, C) -> broadcastable to the 4-d layout
    return jnp.expand_dims(v, (1, _spatial_axis(channels_last)))


def _forward_formula(x, weight, bias, *, channels_last, eps):
    """:func:`lucid.nn._stats.normalized_with_stats` on the kernels' layout."""
    spatial = _spatial_axis(channels_last)
    config = NormConfig((spatial,), None, eps)
    y, mean, residual, var, _ = _stats.normalized_with_stats(
        x, _per_channel(weight, channels_last), _per_channel(bias, channels_last), None, config)
    return [y, *(jnp.squeeze(s, spatial) for s in (mean, residual, var))]


def _forward_with_kernel(x, weight, bias, *, channels_last, eps):
    return _native.forward_call(x, weight, bias, eps=eps, channels_last=channels_last)


def _tangent_formula(x, mean, residual, rstd, weight, dx, dweight, dbias, *, channels_last):
    """:func:`lucid.nn._stats.instance_tangent` on the kernels' layout."""
    spatial = _spatial_axis(channels_last)
    per_instance = partial(_per_instance, channels_last=channels_last)
    per_channel = partial(_per_channel, channels_last=channels_last)
    count = jnp.asarray(x.shape[spatial], rstd.dtype)
    dy, dmean, dvar = _stats.instance_tangent(
        NormConfig((spatial,), None, 0.0), x, per_instance(mean), per_instance(residual), per_instance(rstd),
        count, per_channel(weight), None, dx, per_channel(dweight), per_channel(dbias),
    )
    return dy, jnp.squeeze(dmean, spatial), jnp.squeeze(dvar, spatial)


def _cotangent_formula(x, mean, residual, rstd, weight, gy, gmean, gvar, *, channels_last):
    """The transpose of :func:`_tangent_formula` in its linear operands."""
    tangent = partial(_tangent_formula, x, mean, residual, rstd, weight, channels_last=channels_last)
    zeros = (jnp.zeros_like(x), jnp.zeros_like(weight), jnp.zeros_like(weight))
    return jax.vjp(tangent, *zeros)[1]((gy, gmean, gvar))


def _cotangent_with_kernel(x, mean, residual, rstd, weight, gy, gmean, gvar, *, channels_last):
    gx, g1, g2 = _native.backward_call(x, gy, mean, residual, rstd, weight, gmean, gvar, channels_last=channels_last)
    # d weight = sum_n sum_s(gy * xhat), d bias = sum_n sum_s(gy): from the per-instance partials.
    return gx, jnp.sum(g2, axis=1), jnp.sum(g1, axis=1)


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def _forward_abstract_eval(x, weight, bias, *, channels_last, leading, eps):
    view = _native.kernel_view(x.shape, channels_last, leading)
    stat = x.update(shape=(*x.shape[:leading], view.n, view.c), dtype=jnp.dtype(jnp.float32), weak_type=False)
    return [x, stat, stat, stat]


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

    def batch(operands, dims, *, leading, **params):
        size = next(v.shape[d] for v, d in zip(operands, dims) if d is not None)
        moved = [jnp.broadcast_to(v, (size, *v.shape)) if d is None else jnp.moveaxis(v, d, 0)
                 for v, d in zip(operands, dims)]
        outs = prim.bind(*moved, leading=leading + 1, **params)
        return outs, [0] * len(outs)

    return batch


@functools.lru_cache(maxsize=None)
def _compiled(prim: Primitive, params: tuple) -> callable:
    return jax.jit(partial(prim.bind, **dict(params)))


def _eager(prim: Primitive):
    """An eager implementation: the primitive's own lowering, compiled once per setting."""

    def impl(*operands, **params):
        return _compiled(prim, tuple(sorted(params.items())))(*operands)

    return impl


for _prim, _formula, _kernel, _abstract_eval in (
    (_forward_p, _forward_formula, _forward_with_kernel, _forward_abstract_eval),
    (_tangent_p, _tangent_formula, None, _tangent_abstract_eval),
    (_cotangent_p, _cotangent_formula, _cotangent_with_kernel, _cotangent_abstract_eval),
):
    _prim.def_impl(_eager(_prim))
    _prim.def_abstract_eval(_abstract_eval)
    batching.primitive_batchers[_prim] = _batch_into_leading_axis(_prim)
    mlir.register_lowering(_prim, mlir.lower_fun(_in_kernel_layout(_formula), multiple_results=True))
    if _kernel is not None:
        mlir.register_lowering(_prim, mlir.lower_fun(_in_kernel_layout(_kernel), multiple_results=True),
                               platform="cpu")
for _prim, _other, _formula in ((_tangent_p, _cotangent_p, _tangent_formula),
                                (_cotangent_p, _tangent_p, _cotangent_formula)):
    ad.primitive_jvps[_prim] = _jvp_from(_in_kernel_layout(_formula))
    ad.primitive_transposes[_prim] = _transpose_into(_other)


# --------------------------------------------------------------------------
# Entry points, called by lucid.nn._normalize where config.kernel is set
# --------------------------------------------------------------------------


def _as_varying_as(x, *values):
    """``values`` marked to vary over (at least) the manual mesh axes ``x`` varies over.

    Inside ``shard_map``, a replicated weight meets a sharded ``x`` here. A
    standard binary operation with a zero that varies like ``x`` inserts
    JAX's implicit broadcast to varying, whose transpose is the ``psum`` that
    the weight's gradient needs (outside ``shard_map`` it is a plain ``+ 0``
    on small arrays).
    """
    zero = jnp.zeros_like(x, shape=(), dtype=jnp.float32)
    return [v + zero for v in values]


def kernel_forward(x, weight, bias, config: NormConfig):
    """``(y, mean, residual, var)`` from the forward kernel, statistics shaped like the core's."""
    order = _native.channel_order(x.ndim, config.reduce_axes)
    view = _native.kernel_view(x.shape, order, 0)
    w, b = (_native.channel_vector(v, view.c, fill) for v, fill in ((weight, 1.0), (bias, 0.0)))
    y, mean, residual, var = _forward_p.bind(x, w, b, channels_last=order, leading=0, eps=config.eps)
    stats_shape = tuple(1 if a in config.reduce_axes else d for a, d in enumerate(x.shape))
    return (y, *(s.reshape(stats_shape) for s in (mean, residual, var)))


def kernel_tangent(config: NormConfig, x, mean, residual, rstd, weight, dx, dweight, dbias):
    """:func:`lucid.nn._stats.instance_tangent` for a call the kernels compute, through ``_tangent_p``."""
    order = _native.channel_order(x.ndim, config.reduce_axes)
    view = _native.kernel_view(x.shape, order, 0)

    def per_instance(v):
        return v.reshape(view.n, view.c)

    small = _as_varying_as(
        x, per_instance(mean), per_instance(residual), per_instance(rstd),
        *(_native.channel_vector(v, view.c, fill) for v, fill in ((weight, 1.0), (dweight, 0.0), (dbias, 0.0))),
    )
    dy, dmean, dvar = _tangent_p.bind(x, *small[:4], dx, *small[4:], channels_last=order, leading=0)
    return dy, dmean.reshape(mean.shape), dvar.reshape(mean.shape)
