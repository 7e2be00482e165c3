"""The two entry points of lucid's math and their hand-derived derivative rules.

Every public path of lucid (the functional API, the modules, the ``Tensor``
path) ends in :func:`normalize_with_instance_stats` or
:func:`normalize_with_running_stats`. Their formulas are in
:mod:`lucid.nn._stats`; where lucid's native CPU kernel applies, the
statistics and the backward pass run in it (:mod:`lucid.nn._primitives`).

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
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from . import _primitives, _stats
from ._stats import NormConfig


def normalize_with_instance_stats(x, weight, bias, mask, config: NormConfig):
    """Normalize every ``(n, c)`` instance with its own statistics.

    Args:
        x: input of any float dtype; ``config.reduce_axes`` are its spatial axes.
        weight, bias: ``None`` or arrays broadcastable to ``x`` (channel-shaped).
        mask: ``None`` or a boolean array broadcastable to ``x``; statistics
            use only the elements where it is ``True``. Every element is
            normalized (padding too) with its instance's statistics.
        config: static axes, collective names, ``eps`` and the kernel choice.

    Returns:
        ``(y, mean, var, count)``: ``y`` in ``x.dtype``; the per-instance mean and
        biased variance in the compute dtype, of shape ``x.shape`` with the
        spatial axes set to 1; and the valid count of each instance (0 for
        an all-padding one).
    """
    y, center, residual, var, count = _normalize_and_stats(x, weight, bias, mask, config)
    return y, center + residual, var, count


@partial(jax.custom_jvp, nondiff_argnums=(4,))
def _normalize_and_stats(x, weight, bias, mask, config: NormConfig):
    """``(y, center, residual, var, count)`` (see :func:`lucid.nn._stats.normalized_with_stats`).

    The mean is ``center + residual``: the XLA path gives its rough mean and
    correction; where it applies, the native kernel gives the mean rounded
    to float and its rounding error, in one read of ``x``.
    """
    if not config.kernel:
        return _stats.normalized_with_stats(x, weight, bias, mask, config)
    y, mean, residual, var = _primitives.kernel_forward(x, weight, bias, config)
    return y, mean, residual, var, _stats.valid_count(x, None, config, jnp.float32)


@_normalize_and_stats.defjvp
def _normalize_and_stats_jvp(config, primals, tangents):
    x, weight, bias, mask = primals
    dx, dweight, dbias, _ = tangents
    # The primal through the function itself, not its body: at higher orders
    # JAX differentiates this rule, and must meet this rule again rather than
    # the statistics' implementation (the native kernel has no derivative).
    primal_out = y, center, residual, var, count = _normalize_and_stats(x, weight, bias, mask, config)
    rstd = _stats.inverse_std(var, config.eps, count)
    # The tangent map centres on `center`, a computed (N, C) array rather than
    # a slice of x, so XLA fuses the recomputation of x - center into the
    # backward reductions instead of materializing it. x - center is exact
    # (floats of one magnitude); the small residual keeps
    # xhat = ((x - center) - residual) * r exact.
    dweight = None if weight is None else dweight
    dbias = None if bias is None else dbias
    if config.kernel:
        # The same map as one primitive, whose transpose runs the native backward kernel on CPU.
        dy, dmean, dvar = _primitives.kernel_tangent(config, x, center, residual, rstd, weight, dx, dweight, dbias)
    else:
        # The tangent map recomputes xhat instead of saving it (see the module docstring);
        # prevent_cse keeps XLA from sharing x - center with the forward pass.
        tangent = jax.checkpoint(partial(_stats.instance_tangent, config), prevent_cse=True)
        dy, dmean, dvar = tangent(x, center, residual, rstd, count, weight, mask, dx, dweight, dbias)
    # Only the mean, center + residual, is a quantity with a derivative: the
    # whole of it goes to `center`, the residual's is zero.
    return primal_out, (dy, dmean, jnp.zeros_like(residual), dvar, jnp.zeros_like(count))


@partial(jax.custom_jvp, nondiff_argnums=(5,))
def normalize_with_running_stats(x, running_mean, running_var, weight, bias, config: NormConfig):
    """Normalize with given per-channel statistics: ``(x - rm) / sqrt(rv + eps) * w + b``.

    ``running_mean``/``running_var``/``weight``/``bias`` are broadcastable to
    ``x`` (channel-shaped); ``weight``/``bias`` may be ``None``.
    """
    cdt = _stats.compute_dtype(x.dtype)
    rstd = _stats.inverse_std(running_var.astype(cdt), config.eps)
    return _stats.normalize(x, running_mean.astype(cdt), None, rstd, weight, bias)


@normalize_with_running_stats.defjvp
def _normalize_with_running_stats_jvp(config, primals, tangents):
    x, running_mean, running_var, weight, bias = primals
    dx, drm, drv, dweight, dbias = tangents
    cdt = _stats.compute_dtype(x.dtype)
    rm = running_mean.astype(cdt)
    rstd = _stats.inverse_std(running_var.astype(cdt), config.eps)
    y = _stats.normalize(x, rm, None, rstd, weight, bias)
    tangent = jax.checkpoint(_stats.running_tangent, prevent_cse=False)
    dy = tangent(
        x, rm, rstd, weight, dx, drm, drv,
        None if weight is None else dweight, None if bias is None else dbias,
    )
    return y, dy
