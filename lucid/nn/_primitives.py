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
from jax.extend import core as jax_core
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir
from jax.sharding import PartitionSpec as P

from . import _native, _partitioning, _stats
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


def _config(channels_last, spatial_axis_name, eps=0.0) -> NormConfig:
    return NormConfig((_spatial_axis(channels_last),), spatial_axis_name, eps)


def _forward_formula(x, weight, bias, *, channels_last, eps, spatial_axis_name=None):
    """:func:`lucid.nn._stats.normalized_with_stats` on the kernels' layout: what the forward kernel computes."""
    config = _config(channels_last, spatial_axis_name, eps)
    y, mean, residual, var, _ = _stats.normalized_with_stats(
        x, _per_channel(weight, channels_last), _per_channel(bias, channels_last), None, config)
    return [y, *(jnp.squeeze(s, config.reduce_axes) for s in (mean, residual, var))]


def _tangent_formula(x, mean, residual, rstd, weight, dx, dweight, dbias, *, channels_last, spatial_axis_name=None):
    """:func:`lucid.nn._stats.instance_tangent` on the kernels' layout.

    ``dweight``/``dbias`` are ``(P, C)``, or ``(P, N, C)`` to take them per
    instance (whose cotangents are then the per-instance sums).
    """
    config = _config(channels_last, spatial_axis_name)
    spatial = config.reduce_axes[0]
    per_instance = partial(_per_instance, channels_last=channels_last)

    def per_channel_or_instance(v):
        return per_instance(v) if v.ndim == 3 else _per_channel(v, channels_last)

    count = _stats.valid_count(x, None, config, rstd.dtype)
    dy, dmean, dvar = _stats.instance_tangent(
        config, x, per_instance(mean), per_instance(residual), per_instance(rstd), count,
        _per_channel(weight, channels_last), None, dx, per_channel_or_instance(dweight), per_channel_or_instance(dbias),
    )
    return dy, jnp.squeeze(dmean, spatial), jnp.squeeze(dvar, spatial)


def _backward_formula(x, gy, mean, residual, rstd, weight, gmean, gvar, *, channels_last, spatial_axis_name=None):
    """What the backward kernel computes: ``(gx, g1, g2)``, the cotangent of ``x`` and the per-instance
    sums ``g1 = sum(gy)``, ``g2 = sum(gy * xhat)``: the transpose of :func:`_tangent_formula`."""
    tangent = partial(_tangent_formula, x, mean, residual, rstd, weight, channels_last=channels_last,
                      spatial_axis_name=spatial_axis_name)
    zeros = (jnp.zeros_like(x), jnp.zeros_like(mean), jnp.zeros_like(mean))
    gx, g2, g1 = jax.vjp(tangent, *zeros)[1]((gy, gmean, gvar))
    if spatial_axis_name is not None:
        # Per-instance dweight/dbias are one number for all of an instance's blocks: their sums span them.
        g1, g2 = jax.lax.psum((g1, g2), spatial_axis_name)
    return gx, g1, g2


def _cotangent_formula(x, mean, residual, rstd, weight, gy, gmean, gvar, *, channels_last):
    """The transpose of :func:`_tangent_formula` in its linear operands."""
    gx, g1, g2 = _backward_formula(x, gy, mean, residual, rstd, weight, gmean, gvar, channels_last=channels_last)
    return _batch_sums(gx, g1, g2)


def _batch_sums(gx, g1, g2):
    # d weight = sum_n sum_s(gy * xhat), d bias = sum_n sum_s(gy): from the per-instance partials.
    return gx, jnp.sum(g2, axis=-2), jnp.sum(g1, axis=-2)


def _on_each_shard(kernel, formula):
    """What each device runs on its block (see :mod:`lucid.nn._partitioning`): the kernel when its
    spatial axes are whole, else the formula with its sums combined across the mesh axes that split them."""

    def local(*operands, channels_last, leading, spatial_axis_name, **params):
        fn = kernel if spatial_axis_name is None else partial(formula, spatial_axis_name=spatial_axis_name)
        return _in_kernel_layout(fn)(*operands, channels_last=channels_last, leading=leading, **params)

    return local


_forward_shards = _partitioning.shardwise(
    _on_each_shard(_native.forward_call, _forward_formula), in_kinds="xvv", out_kinds="xsss")
_backward_shards = _partitioning.shardwise(
    _on_each_shard(_native.backward_call, _backward_formula), in_kinds="xxsssvss", out_kinds="xss")


def _forward_on_shards(x, weight, bias, **params):
    return _forward_shards(tuple(sorted(params.items())), x, weight, bias)


def _cotangent_on_shards(x, mean, residual, rstd, weight, gy, gmean, gvar, **params):
    return _batch_sums(*_backward_shards(tuple(sorted(params.items())), x, gy, mean, residual, rstd, weight,
                                         gmean, gvar))


def _forward_with_kernel(x, weight, bias, **params):
    return _in_kernel_layout(_native.forward_call)(x, weight, bias, **params)


def _cotangent_with_kernel(x, mean, residual, rstd, weight, gy, gmean, gvar, **params):
    kernel = _in_kernel_layout(_native.backward_call)
    return _batch_sums(*kernel(x, gy, mean, residual, rstd, weight, gmean, gvar, **params))


# The kernels of a primitive for programs on many devices, as each device runs them (see
# lucid.nn._partitioning). A bind carries them, traced for its operands, as the parameter
# ``on_shards``: JAX lowers a program with its devices assigned (which custom_partitioning needs)
# when its equations hold a custom_partitioning call, their parameters' sub-programs included.
_ON_SHARDS = {}


def _bind(prim: Primitive, *operands, **params):
    """``prim.bind``, with the ``on_shards`` parameter of the primitives that have one."""
    params.pop("on_shards", None)
    on_shards = _ON_SHARDS.get(prim)
    if on_shards is not None:
        types = [jax.ShapeDtypeStruct(v.shape, v.dtype) for v in operands]
        params["on_shards"] = jax.make_jaxpr(partial(on_shards, **params))(*types)
    return prim.bind(*operands, **params)


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def _forward_abstract_eval(x, weight, bias, *, channels_last, leading, eps, on_shards):
    # The statistics are typed like x without its spatial axes (sharding and varying axes included).
    c_axis = x.ndim - 1 if channels_last else leading + 1
    kept = (*range(leading + 1), c_axis)
    spec = (*x.sharding.spec, *(None,) * x.ndim)
    sharding = x.sharding.update(spec=P(*(spec[a] for a in kept)))
    stat = x.update(shape=tuple(x.shape[a] for a in kept), dtype=jnp.dtype(jnp.float32), weak_type=False,
                    sharding=sharding)
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
        outs = _bind(other, *point, *map(ad.instantiate_zeros, cts), **params)
        return [None] * _NUM_POINT + [o if ad.is_undefined_primal(v) else None for o, v in zip(outs, linear)]

    return transpose


def _jvp_from(reference):
    """A JVP rule from the ``jnp`` formula: derivatives never meet the kernel."""

    def jvp(primals, tangents, on_shards=None, **params):
        return jax.jvp(partial(reference, **params), tuple(primals), tuple(map(ad.instantiate_zeros, tangents)))

    return jvp


def _batch_into_leading_axis(prim: Primitive):
    """A ``vmap`` rule: the mapped axis becomes one more leading axis of every operand."""

    def batch(operands, dims, *, leading, **params):
        size = next(v.shape[d] for v, d in zip(operands, dims) if d is not None)
        moved = [jnp.broadcast_to(v, (size, *v.shape)) if d is None else jnp.moveaxis(v, d, 0)
                 for v, d in zip(operands, dims)]
        outs = _bind(prim, *moved, leading=leading + 1, **params)
        return outs, [0] * len(outs)

    return batch


@functools.lru_cache(maxsize=None)
def _compiled(prim: Primitive, params: tuple) -> callable:
    return jax.jit(partial(_bind, prim, **dict(params)))


def _eager(prim: Primitive):
    """An eager implementation: the primitive's own lowering, compiled once per setting."""

    def impl(*operands, on_shards=None, **params):
        return _compiled(prim, tuple(sorted(params.items())))(*operands)

    return impl


def _kernel_reach(axis_context) -> str:
    """How a CPU program reaches the kernel, from the devices it spans (its lowering context
    knows them; under automatic sharding the traced types do not).

    ``"kernel"``: one device, or each device's own block inside ``shard_map`` over every mesh axis
    (or ``pmap``). ``"shards"``: a program over many devices, through custom_partitioning. That
    needs the devices assigned; were they not, ``"formula"``: the formulas run, partitioned by XLA
    (the same numbers, without the kernel's speed).
    """
    num_devices = getattr(axis_context, "num_devices", None)
    if num_devices is not None:
        if num_devices == 1:
            return "kernel"
        return "formula" if getattr(axis_context, "device_assignment", None) is None else "shards"
    manual, mesh = getattr(axis_context, "manual_axes", None), getattr(axis_context, "mesh", None)
    if manual is not None and mesh is not None and set(manual) != set(mesh.axis_names):
        return "shards"  # shard_map over some of the mesh's axes: the others are partitioned
    return "kernel"


def _default_lowering(formula):
    lowered = mlir.lower_fun(_in_kernel_layout(formula), multiple_results=True)

    def rule(ctx, *operands, on_shards=None, **params):
        return lowered(ctx, *operands, **params)

    return rule


def _cpu_lowering(kernel, formula):
    """The CPU lowering through the kernel, refusing ``jax.export`` with lucid's way out."""

    def rule(ctx, *operands, on_shards=None, **params):
        if ctx.module_context.lowering_parameters.for_export:
            raise ValueError(
                "lucid's native CPU kernel is a custom call local to this install and cannot be exported. "
                "Trace the export inside `with lucid.nn.functional.pure_xla():` (or pass implementation='xla' "
                "to instance_norm_apply): the program then holds XLA operations only and lowers for every platform."
            )
        reach = _kernel_reach(ctx.module_context.axis_context)
        if reach == "kernel":
            fn = partial(kernel, **params)
        elif reach == "shards" and on_shards is not None:
            fn = jax_core.jaxpr_as_fun(on_shards)
        else:
            fn = partial(_in_kernel_layout(formula), **params)
        return mlir.lower_fun(fn, multiple_results=True)(ctx, *operands)

    return rule


for _prim, _formula, _kernel, _abstract_eval in (
    (_forward_p, _forward_formula, _forward_with_kernel, _forward_abstract_eval),
    (_tangent_p, _tangent_formula, None, _tangent_abstract_eval),
    (_cotangent_p, _cotangent_formula, _cotangent_with_kernel, _cotangent_abstract_eval),
):
    _prim.def_impl(_eager(_prim))
    _prim.def_abstract_eval(_abstract_eval)
    batching.primitive_batchers[_prim] = _batch_into_leading_axis(_prim)
    mlir.register_lowering(_prim, _default_lowering(_formula))
    if _kernel is not None:
        mlir.register_lowering(_prim, _cpu_lowering(_kernel, _formula), platform="cpu")
_ON_SHARDS[_forward_p] = _forward_on_shards
_ON_SHARDS[_cotangent_p] = _cotangent_on_shards
for _prim, _other, _formula in ((_tangent_p, _cotangent_p, _tangent_formula),
                                (_cotangent_p, _tangent_p, _cotangent_formula)):
    ad.primitive_jvps[_prim] = _jvp_from(_in_kernel_layout(_formula))
    ad.primitive_transposes[_prim] = _transpose_into(_other)


# --------------------------------------------------------------------------
# Entry points, called by lucid.nn._normalize where config.kernel is set
# --------------------------------------------------------------------------


def kernel_forward(x, weight, bias, config: NormConfig):
    """``(y, mean, residual, var)`` from the forward kernel, statistics shaped like the core's."""
    order = _native.channel_order(x.ndim, config.reduce_axes)
    view = _native.kernel_view(x.shape, order, 0)
    w, b = (_native.channel_vector(v, view.c, fill) for v, fill in ((weight, 1.0), (bias, 0.0)))
    y, mean, residual, var = _bind(_forward_p, x, w, b, channels_last=order, leading=0, eps=config.eps)
    stats_shape = tuple(1 if a in config.reduce_axes else d for a, d in enumerate(x.shape))
    return (y, *(s.reshape(stats_shape) for s in (mean, residual, var)))


def kernel_tangent(config: NormConfig, x, mean, residual, rstd, weight, dx, dweight, dbias):
    """:func:`lucid.nn._stats.instance_tangent` for a call the kernels compute, through ``_tangent_p``."""
    order = _native.channel_order(x.ndim, config.reduce_axes)
    view = _native.kernel_view(x.shape, order, 0)

    def per_instance(v):
        return v.reshape(view.n, view.c)

    small = _native.vary_like(
        x, per_instance(mean), per_instance(residual), per_instance(rstd),
        *(_native.channel_vector(v, view.c, fill) for v, fill in ((weight, 1.0), (dweight, 0.0), (dbias, 0.0))),
    )
    dy, dmean, dvar = _bind(_tangent_p, x, *small[:4], dx, *small[4:], channels_last=order, leading=0)
    return dy, dmean.reshape(mean.shape), dvar.reshape(mean.shape)
