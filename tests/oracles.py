"""The test suite's oracles, in one place.

* :func:`reference`: instance norm written out plainly, for two array modules:
  ``xp=np`` computes in float64 (the accuracy oracle), ``xp=jnp`` in the input's
  float precision and is autodiff-able (the oracle for ``jax.grad``/``jax.jvp``).
  ``np_instance_norm`` and ``ref_instance_norm`` are its two uses.
* :func:`reference_running_stats`: the running-statistics rule in float64.
* :func:`torch_instance_norm`: PyTorch's own functional instance norm.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import torch


def channel_shape(ndim, channel_axis):
    axis = channel_axis % ndim
    return axis, tuple(-1 if a == axis else 1 for a in range(ndim))


def reference(x, weight=None, bias=None, running_mean=None, running_var=None, *,
              training=True, eps=1e-5, mask=None, channel_axis=1, xp=np):
    """``(y, mean, biased_var, count)``, statistics keeping the spatial axes as size 1
    (``mean``/``var`` are the running ones, and ``count`` ``None``, when those are used).

    A mask selects the valid elements of each instance. ``1 / sqrt(var + eps)``
    is taken as 0 where ``var + eps == 0`` (PyTorch's rule) and for an instance
    with no valid element: those normalize to their bias.
    """
    axis, cshape = channel_shape(x.ndim, channel_axis)
    spatial = tuple(a for a in range(x.ndim) if a not in (0, axis))
    xc = xp.asarray(x, np.float64) if xp is np else x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if training or running_mean is None:
        m = xp.ones_like(xc) if mask is None else xp.broadcast_to(xp.asarray(mask), x.shape).astype(xc.dtype)
        count = xp.sum(m, axis=spatial, keepdims=True)
        mean = xp.sum(xc * m, axis=spatial, keepdims=True) / xp.maximum(count, 1)
        var = xp.sum(m * (xc - mean) ** 2, axis=spatial, keepdims=True) / xp.maximum(count, 1)
        none = (var + eps == 0) | (count == 0)
    else:
        mean = xp.asarray(running_mean).reshape(cshape).astype(xc.dtype)
        var = xp.asarray(running_var).reshape(cshape).astype(xc.dtype)
        count = None
        none = var + eps == 0
    y = (xc - mean) * xp.where(none, 0, 1 / xp.sqrt(xp.where(none, 1, var + eps)))
    if weight is not None:
        y = y * xp.asarray(weight).reshape(cshape).astype(xc.dtype)
    if bias is not None:
        y = y + xp.asarray(bias).reshape(cshape).astype(xc.dtype)
    return (y if xp is np else y.astype(x.dtype)), mean, var, count


def np_instance_norm(x, weight=None, bias=None, *, eps=1e-5, channel_axis=1, mask=None):
    """float64 NumPy instance norm with instance statistics: the accuracy oracle."""
    return reference(np.asarray(x, np.float64), weight, bias, eps=eps, channel_axis=channel_axis, mask=mask)[0]


def ref_instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                      training=True, eps=1e-5, mask=None, channel_axis=1):
    """Plain ``jnp`` instance norm, autodiff-able: the oracle for ``jax.grad``/``jax.jvp``."""
    return reference(x, weight, bias, running_mean, running_var, training=training, eps=eps, mask=mask,
                     channel_axis=channel_axis, xp=jnp)


def reference_running_stats(x, running_mean, running_var, *, momentum, num_batches_tracked=0, mask=None,
                            channel_axis=1):
    """The running statistics after one training call, in float64: the batch averages of
    the instance means and unbiased variances (``M / (M - 1)``, ``M`` clamped to 2 or more),
    blended with ``momentum`` (``None``: ``1 / (num_batches_tracked + 1)``)."""
    _, mean, var, count = reference(np.asarray(x, np.float64), mask=mask, channel_axis=channel_axis)
    axis, _ = channel_shape(np.ndim(x), channel_axis)
    other = tuple(a for a in range(np.ndim(x)) if a != axis)
    unbiased = var * count / np.maximum(count - 1, 1)
    factor = 1.0 / (num_batches_tracked + 1) if momentum is None else momentum
    rm = (1 - factor) * np.asarray(running_mean, np.float64) + factor * mean.mean(axis=other)
    rv = (1 - factor) * np.asarray(running_var, np.float64) + factor * unbiased.mean(axis=other)
    return rm, rv


def torch_instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                        training=True, momentum=0.1, eps=1e-5, grad_out=None):
    """PyTorch's functional instance norm; returns output, input/weight/bias grads and
    the (in-place updated) running statistics, all as NumPy."""
    tx = torch.tensor(np.asarray(x), requires_grad=True)
    tw = None if weight is None else torch.tensor(np.asarray(weight), requires_grad=True)
    tb = None if bias is None else torch.tensor(np.asarray(bias), requires_grad=True)
    trm = None if running_mean is None else torch.tensor(np.asarray(running_mean))
    trv = None if running_var is None else torch.tensor(np.asarray(running_var))
    ty = torch.nn.functional.instance_norm(
        tx, trm, trv, tw, tb, use_input_stats=training or running_mean is None, momentum=momentum, eps=eps)
    g = torch.ones_like(ty) if grad_out is None else torch.tensor(np.asarray(grad_out))
    ty.backward(g)

    def grab(t):
        return None if t is None else t.detach().numpy()

    return {
        "y": grab(ty), "dx": grab(tx.grad), "dw": None if tw is None else grab(tw.grad),
        "db": None if tb is None else grab(tb.grad), "running_mean": grab(trm), "running_var": grab(trv),
    }
