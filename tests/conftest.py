"""Shared oracles for the test suite.

Eight host CPU devices are configured here, before anything imports jax, so the
multi-device tests see a mesh of 8 on any machine.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402  (the oracle is required: a missing torch fails, never skips)

torch.manual_seed(0)


def channel_shape(ndim, channel_axis):
    axis = channel_axis % ndim
    return axis, tuple(-1 if a == axis else 1 for a in range(ndim))


def ref_instance_norm(x, weight=None, bias=None, running_mean=None, running_var=None, *,
                      training=True, eps=1e-5, mask=None, channel_axis=1):
    """Plain ``jnp`` instance norm, autodiff-able: the oracle for ``jax.grad``/``jax.jvp``.

    Returns ``(y, mean, biased_var, count)`` with statistics of shape ``(N, C)``
    (``mean``/``var`` are the running ones when they are used).
    """
    axis, cshape = channel_shape(x.ndim, channel_axis)
    spatial = tuple(a for a in range(x.ndim) if a not in (0, axis))
    xc = x.astype(jnp.promote_types(x.dtype, jnp.float32))
    if training or running_mean is None:
        m = jnp.ones_like(xc) if mask is None else jnp.broadcast_to(mask, x.shape).astype(xc.dtype)
        count = jnp.maximum(jnp.sum(m, axis=spatial, keepdims=True), 1)
        mean = jnp.sum(xc * m, axis=spatial, keepdims=True) / count
        var = jnp.sum(m * (xc - mean) ** 2, axis=spatial, keepdims=True) / count
    else:
        mean = running_mean.reshape(cshape)
        var = running_var.reshape(cshape)
        count = None
    y = (xc - mean) / jnp.sqrt(var + eps)
    if weight is not None:
        y = y * weight.reshape(cshape)
    if bias is not None:
        y = y + bias.reshape(cshape)
    return y.astype(x.dtype), mean, var, count


def np_instance_norm(x, weight=None, bias=None, *, eps=1e-5, channel_axis=1):
    """float64 NumPy instance norm with instance statistics: the accuracy oracle."""
    x = np.asarray(x, np.float64)
    axis, cshape = channel_shape(x.ndim, channel_axis)
    spatial = tuple(a for a in range(x.ndim) if a not in (0, axis))
    mean = x.mean(axis=spatial, keepdims=True)
    var = x.var(axis=spatial, keepdims=True)
    y = (x - mean) / np.sqrt(var + eps)
    if weight is not None:
        y = y * np.asarray(weight, np.float64).reshape(cshape)
    if bias is not None:
        y = y + np.asarray(bias, np.float64).reshape(cshape)
    return y


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
    grab = lambda t: None if t is None else t.detach().numpy()  # noqa: E731
    return {
        "y": grab(ty), "dx": grab(tx.grad), "dw": None if tw is None else grab(tw.grad),
        "db": None if tb is None else grab(tb.grad), "running_mean": grab(trm), "running_var": grab(trv),
    }


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
