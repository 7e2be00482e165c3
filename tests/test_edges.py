"""Edge semantics, on the native kernel's path and on the XLA path (README's Semantics section):
NaN/inf, ``eps=0`` with constant data, padded items with no or one valid element, empty inputs,
``momentum`` given as an array, and a batch count that never wraps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import ref_instance_norm, reference, reference_running_stats, torch_instance_norm

import lucid.nn as nn
import lucid.nn.functional as F
from lucid.nn._native import AVAILABLE

PATHS = [pytest.param("native", marks=pytest.mark.skipif(not AVAILABLE, reason="the native kernel is not built")),
         "xla"]


def _init(c, rng):
    params, stats = F.instance_norm_init(c)
    params = {k: jnp.asarray(rng.normal(size=c), jnp.float32) for k in params}
    stats = dict(stats, running_mean=jnp.asarray(rng.normal(size=c), jnp.float32),
                 running_var=jnp.asarray(rng.uniform(0.5, 2, size=c), jnp.float32))
    return params, stats


@pytest.mark.parametrize("bad", [np.nan, np.inf], ids=["nan", "inf"])
@pytest.mark.parametrize("implementation", PATHS)
@pytest.mark.parametrize("channel_axis", [1, -1], ids=["NCHW", "NHWC"])
def test_a_nan_or_inf_spoils_its_instance_and_channel_only(rng, implementation, bad, channel_axis):
    x = rng.normal(size=(3, 4, 5, 6)).astype(np.float32)
    x[1, 2, 3, 4] = bad  # instance (1, 2); channel 2
    params, stats = _init(4, rng)
    x_in = x if channel_axis == 1 else np.moveaxis(x, 1, -1)
    y, new = F.instance_norm_apply(params, stats, x_in, channel_axis=channel_axis, implementation=implementation)
    y = np.asarray(y) if channel_axis == 1 else np.moveaxis(np.asarray(y), -1, 1)
    assert np.isnan(y[1, 2]).all()
    clean = np.ones(x.shape[:2], bool)
    clean[1, 2] = False
    want = reference(np.where(np.isfinite(x), x, 0), params["weight"], params["bias"])[0]
    np.testing.assert_allclose(y[clean], want[clean], rtol=1e-5, atol=2e-5)
    assert np.isnan(new["running_mean"][2]) and np.isnan(new["running_var"][2])
    others = [0, 1, 3]
    rm, rv = reference_running_stats(x[:, others], np.asarray(stats["running_mean"])[others],
                                     np.asarray(stats["running_var"])[others], momentum=0.1)
    np.testing.assert_allclose(np.asarray(new["running_mean"])[others], rm, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(new["running_var"])[others], rv, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("implementation", PATHS)
def test_eps_zero_on_a_constant_instance_gives_the_bias_and_a_finite_gradient(rng, implementation):
    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)
    x[0, 1] = 7.25  # constant: variance 0
    params, _ = _init(3, rng)
    g = rng.normal(size=x.shape).astype(np.float32)

    def loss(x, p):
        return jnp.sum(F.instance_norm_apply(p, None, x, eps=0.0, implementation=implementation)[0] * g)

    y, _ = F.instance_norm_apply(params, None, x, eps=0.0, implementation=implementation)
    np.testing.assert_array_equal(np.asarray(y[0, 1]), np.full((4, 4), params["bias"][1], np.float32))
    # PyTorch's rule too (invstd = 0 where var + eps == 0): its output without affine is 0 there.
    torch_y = torch_instance_norm(x, eps=0.0)["y"]
    np.testing.assert_array_equal(torch_y[0, 1], 0.0)
    dx, dp = jax.grad(loss, argnums=(0, 1))(x, params)
    assert all(np.isfinite(np.asarray(v)).all() for v in (dx, *dp.values()))
    np.testing.assert_array_equal(np.asarray(dx[0, 1]), 0.0)  # y = bias there, whatever x
    np.testing.assert_allclose(dp["bias"][1], g[:, 1].sum(), rtol=1e-5)
    # The other instances are ordinary: eps = 0 changes nothing else (jax.grad of the jnp reference there).
    np.testing.assert_allclose(y[1], reference(x, params["weight"], params["bias"], eps=0.0)[0][1],
                               rtol=1e-5, atol=2e-5)
    want_dx = jax.grad(lambda x: jnp.sum(ref_instance_norm(x, params["weight"], params["bias"], eps=0.0)[0] * g))(x)
    ordinary = np.ones(x.shape[:2], bool)
    ordinary[0, 1] = False
    np.testing.assert_allclose(np.asarray(dx)[ordinary], np.asarray(want_dx)[ordinary], rtol=1e-4, atol=1e-5)


def test_eps_zero_with_zero_running_variance_in_eval_gives_the_bias(rng):
    params, stats = _init(3, rng)
    stats["running_var"] = jnp.asarray([0.0, 1.0, 0.0])
    x = rng.normal(size=(2, 3, 4)).astype(np.float32)
    y, _ = F.instance_norm_apply(params, stats, x, training=False, eps=0.0)
    for c in (0, 2):
        np.testing.assert_array_equal(np.asarray(y[:, c]), np.full((2, 4), params["bias"][c], np.float32))
    grad = jax.grad(lambda x: jnp.sum(F.instance_norm_apply(params, stats, x, training=False, eps=0.0)[0]))(x)
    # dy/dx = r w: r = 0 in channels 0 and 2, 1 / sqrt(1) in channel 1.
    want = np.broadcast_to((np.asarray(params["weight"]) * [0.0, 1.0, 0.0])[None, :, None], x.shape)
    np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-6)


@pytest.mark.parametrize("channels_last", [False, True], ids=["NCL", "NLC"])
def test_padded_items_with_no_or_one_valid_element(rng, channels_last):
    """An item with no valid element normalizes to its bias, gets no gradient and teaches the running
    statistics nothing; an item with one valid element contributes its mean, not a variance."""
    x = rng.normal(size=(4, 3, 10)).astype(np.float32) * 3 + 2
    lengths = np.array([10, 0, 1, 6])
    mask = np.arange(10)[None, None, :] < lengths[:, None, None]
    params, stats = _init(3, rng)
    g = rng.normal(size=x.shape).astype(np.float32)
    if channels_last:
        x_in, m_in, g_in, axis = np.moveaxis(x, 1, -1), np.moveaxis(mask, 1, -1), np.moveaxis(g, 1, -1), -1
    else:
        x_in, m_in, g_in, axis = x, mask, g, 1

    def loss(x, p):
        y, new = F.instance_norm_apply(p, stats, x, mask=m_in, channel_axis=axis)
        return jnp.sum(y * g_in), (y, new)

    (_, (y, new)), (dx, dp) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(x_in, params)
    if channels_last:
        y, dx = np.moveaxis(np.asarray(y), -1, 1), np.moveaxis(np.asarray(dx), -1, 1)
    np.testing.assert_array_equal(np.asarray(y[1]), np.broadcast_to(params["bias"][:, None], (3, 10)))
    np.testing.assert_array_equal(np.asarray(dx[1]), 0.0)
    # Every other item against jax.grad of the masked jnp reference (float64).
    with jax.enable_x64(True):
        def ref_loss(x, p):
            y = ref_instance_norm(x, p["weight"], p["bias"], mask=jnp.asarray(mask))[0]
            return jnp.sum(y * g), y

        p64 = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        (_, want_y), (want_dx, want_dp) = jax.value_and_grad(ref_loss, argnums=(0, 1), has_aux=True)(
            jnp.asarray(x, jnp.float64), p64)
    valid = [0, 2, 3]
    np.testing.assert_allclose(np.where(mask, np.asarray(y), 0)[valid], np.where(mask, want_y, 0)[valid],
                               rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(dx)[valid], np.asarray(want_dx)[valid], rtol=1e-4, atol=1e-5)
    for k in dp:
        np.testing.assert_allclose(np.asarray(dp[k]), np.asarray(want_dp[k]), rtol=1e-4, atol=1e-5)
    # The one-element item: its valid element is its mean, so it normalizes to the bias there.
    np.testing.assert_allclose(np.asarray(y[2, :, 0]), params["bias"], rtol=1e-6, atol=1e-6)
    # Running statistics: means of items 0, 2, 3; variances of items 0 and 3 only.
    mean = [x[n, :, :lengths[n]].mean(axis=-1) for n in (0, 2, 3)]
    var = [x[n, :, :lengths[n]].var(axis=-1, ddof=1) for n in (0, 3)]
    want_mean = 0.9 * np.asarray(stats["running_mean"]) + 0.1 * np.mean(mean, axis=0)
    want_var = 0.9 * np.asarray(stats["running_var"]) + 0.1 * np.mean(var, axis=0)
    np.testing.assert_allclose(new["running_mean"], want_mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new["running_var"], want_var, rtol=1e-5, atol=1e-6)


def test_a_batch_of_only_padding_leaves_the_running_statistics(rng):
    params, stats = _init(2, rng)
    x = rng.normal(size=(2, 2, 5)).astype(np.float32)
    y, new = F.instance_norm_apply(params, stats, x, mask=np.zeros((2, 1, 5), bool))
    np.testing.assert_array_equal(np.asarray(y), np.broadcast_to(params["bias"][:, None], (2, 2, 5)))
    for key in ("running_mean", "running_var"):
        np.testing.assert_array_equal(np.asarray(new[key]), np.asarray(stats[key]))
    assert int(new["num_batches_tracked"]) == 1  # a training call, counted


@pytest.mark.parametrize("shape", [(0, 3, 4, 4), (2, 3, 0, 4), (2, 3, 0)], ids=["N=0", "H=0", "L=0"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_empty_inputs_give_empty_outputs_and_change_nothing(rng, shape, training):
    params, stats = _init(3, rng)
    y, new = jax.jit(lambda x: F.instance_norm_apply(params, stats, x, training=training))(jnp.ones(shape))
    assert y.shape == shape and y.dtype == jnp.float32
    assert all(np.array_equal(new[k], stats[k]) for k in stats)
    norm = {2: nn.InstanceNorm1d, 1: nn.InstanceNorm2d}[4 - len(shape) + 1 if len(shape) == 4 else 2](3)
    out = norm(jnp.ones(shape))
    assert out.shape == shape and int(norm.num_batches_tracked.numpy()) == 0
    torch_y = torch_instance_norm(np.ones(shape, np.float32))["y"]  # PyTorch: an empty output too
    assert torch_y.shape == shape


def test_momentum_as_an_array_is_checked_when_concrete():
    params, stats = F.instance_norm_init(2)
    x = jnp.arange(12.0).reshape(1, 2, 6)
    for bad in (np.float32(1.5), jnp.asarray(-0.1)):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\]"):
            F.instance_norm_apply(params, stats, x, momentum=bad)
    good = F.instance_norm_apply(params, stats, x, momentum=np.float32(0.25))[1]
    traced = jax.jit(lambda m: F.instance_norm_apply(params, stats, x, momentum=m)[1])(jnp.float32(0.25))
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(traced[key], good[key], rtol=1e-6)


def test_the_batch_count_saturates_instead_of_wrapping():
    params, stats = F.instance_norm_init(2)
    top = jnp.iinfo(jnp.int32).max
    stats["num_batches_tracked"] = jnp.asarray(top - 1, jnp.int32)
    x = jnp.arange(12.0).reshape(1, 2, 6)
    for _ in range(3):
        _, stats = F.instance_norm_apply(params, stats, x, momentum=None)
        assert int(stats["num_batches_tracked"]) == top
    assert np.isfinite(np.asarray(stats["running_mean"])).all()
