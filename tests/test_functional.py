"""The functional API against PyTorch and a float64 NumPy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from oracles import np_instance_norm, ref_instance_norm, torch_instance_norm

import lucid
import lucid.nn.functional as F

SHAPES = {"1d": (3, 4, 7), "2d": (2, 3, 5, 6), "3d": (2, 3, 3, 4, 5)}


def _inputs(rng, shape, affine=True):
    c = shape[1]
    x = (rng.normal(size=shape) * 2.5 + 1.5).astype(np.float32)
    w = rng.normal(size=c).astype(np.float32) if affine else None
    b = rng.normal(size=c).astype(np.float32) if affine else None
    rm = rng.normal(size=c).astype(np.float32)
    rv = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    return x, w, b, rm, rv


# ---------------------------------------------------------------- seed examples


def test_seed_module_example_has_the_errata_numbers():
    """The reference page's (1, 2, 2, 3) example, with the corrected output (ERRATA 1)."""
    x = jnp.array([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]]])
    params, stats = F.instance_norm_init(2)
    y, _ = F.instance_norm_apply(params, stats, x)
    expected = np_instance_norm(x)
    np.testing.assert_allclose(y, expected, atol=1e-6)
    # and the ERRATA's printed values, to four decimals
    row = np.array([[-1.4638, -0.8783, -0.2928], [0.2928, 0.8783, 1.4638]])
    np.testing.assert_allclose(np.asarray(y[0, 0]), row, atol=1e-4)
    np.testing.assert_allclose(np.asarray(y[0, 1]), row, atol=1e-4)
    # ERRATA 2: the gradient of output.sum() is zero everywhere.
    grad = jax.grad(lambda x: F.instance_norm_apply(params, stats, x)[0].sum())(x)
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)


def test_seed_functional_example():
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    out = F.instance_norm(x, jnp.zeros(2), jnp.ones(2), jnp.ones(2), jnp.zeros(2), training=True)
    np.testing.assert_allclose(out, np_instance_norm(x), atol=1e-6)
    np.testing.assert_allclose(out, torch_instance_norm(np.asarray(x))["y"], atol=1e-6)


# ---------------------------------------------------------------- PyTorch parity


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_matches_torch_outputs_grads_and_running_stats(rng, kind, affine, training):
    x, w, b, rm, rv = _inputs(rng, SHAPES[kind], affine)
    g = rng.normal(size=x.shape).astype(np.float32)
    expected = torch_instance_norm(x, w, b, rm, rv, training=training, grad_out=g)
    params = {} if not affine else {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    stats = {"running_mean": jnp.asarray(rm), "running_var": jnp.asarray(rv)}

    def loss(x, params):
        y, new = F.instance_norm_apply(params, stats, x, training=training)
        return jnp.sum(y * g), (y, new)

    (_, (y, new)), (dx, dparams) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(jnp.asarray(x), params)
    np.testing.assert_allclose(y, expected["y"], atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(dx, expected["dx"], atol=2e-5, rtol=1e-4)
    if affine:
        np.testing.assert_allclose(dparams["weight"], expected["dw"], atol=5e-5, rtol=1e-4)
        np.testing.assert_allclose(dparams["bias"], expected["db"], atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(new["running_mean"], expected["running_mean"], atol=1e-6)
    np.testing.assert_allclose(new["running_var"], expected["running_var"], atol=1e-6)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_running_stats_over_several_steps_match_torch(rng, kind):
    shape = SHAPES[kind]
    params, stats = F.instance_norm_init(shape[1])
    trm, trv = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    for step in range(4):
        x = (rng.normal(size=shape) * (step + 1) + step).astype(np.float32)
        _, stats = F.instance_norm_apply(params, stats, x, momentum=0.3)
        out = torch_instance_norm(x, None, None, trm, trv, momentum=0.3)
        trm, trv = out["running_mean"], out["running_var"]
    np.testing.assert_allclose(stats["running_mean"], trm, atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], trv, rtol=1e-5)
    assert int(stats["num_batches_tracked"]) == 4
    # eval with those statistics
    x = rng.normal(size=shape).astype(np.float32)
    y, same = F.instance_norm_apply(params, stats, x, training=False)
    expected = torch_instance_norm(x, np.ones(shape[1], np.float32), np.zeros(shape[1], np.float32),
                                   trm, trv, training=False)
    np.testing.assert_allclose(y, expected["y"], atol=2e-5)
    assert same is not stats and all(same[k] is stats[k] for k in stats)


def test_momentum_none_is_the_cumulative_average(rng):
    """ERRATA 3: after k steps the running stats are the plain average of the k batch stats."""
    params, stats = F.instance_norm_init(3, affine=False)
    means, vars_ = [], []
    for _ in range(5):
        x = rng.normal(loc=rng.normal(), scale=rng.uniform(0.5, 3), size=(4, 3, 6, 5)).astype(np.float32)
        _, stats = F.instance_norm_apply(params, stats, x, momentum=None)
        x64 = x.astype(np.float64)
        means.append(x64.mean(axis=(2, 3)).mean(axis=0))
        vars_.append(x64.var(axis=(2, 3), ddof=1).mean(axis=0))
    np.testing.assert_allclose(stats["running_mean"], np.mean(means, axis=0), atol=1e-5)
    np.testing.assert_allclose(stats["running_var"], np.mean(vars_, axis=0), rtol=1e-5)


def test_functional_without_running_stats_in_eval_uses_instance_stats(rng):
    x, w, b, _, _ = _inputs(rng, SHAPES["2d"])
    y = F.instance_norm(x, weight=w, bias=b, training=False)
    np.testing.assert_allclose(y, np_instance_norm(x, w, b), atol=2e-5)


def test_eval_returns_stats_unchanged(rng):
    params, stats = F.instance_norm_init(3)
    stats = {**stats, "running_mean": jnp.arange(3.0)}
    _, new = F.instance_norm_apply(params, stats, rng.normal(size=(2, 3, 4)).astype(np.float32), training=False)
    for k in stats:
        np.testing.assert_array_equal(new[k], stats[k])


# ---------------------------------------------------------------- layout and masks


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("training", [True, False])
def test_channels_last_equals_transposed_channels_first(rng, kind, training):
    x, w, b, rm, rv = _inputs(rng, SHAPES[kind])
    params = {"weight": w, "bias": b}
    stats = {"running_mean": rm, "running_var": rv, "num_batches_tracked": jnp.array(3, jnp.int32)}
    y1, s1 = F.instance_norm_apply(params, stats, x, training=training)
    x_last = np.moveaxis(x, 1, -1)
    y2, s2 = F.instance_norm_apply(params, stats, x_last, training=training, channel_axis=-1)
    # a few ulps: sums run in another order
    np.testing.assert_allclose(np.moveaxis(np.asarray(y2), -1, 1), y1, rtol=1e-6, atol=1e-6)
    for k in stats:
        np.testing.assert_allclose(s1[k], s2[k], rtol=1e-5)


def test_channels_last_has_no_transpose_in_the_compiled_forward(rng):
    x = jnp.asarray(rng.normal(size=(2, 6, 7, 4)).astype(np.float32))
    params, _ = F.instance_norm_init(4)
    f = jax.jit(lambda p, x: F.instance_norm_apply(p, {}, x, channel_axis=-1)[0])
    hlo = f.lower(params, x).compile().as_text()
    assert "transpose(" not in hlo


def test_mask_normalizes_each_item_as_if_alone_and_unpadded(rng):
    lengths = [7, 3, 5]
    n, c, length = len(lengths), 4, 9
    x = np.zeros((n, c, length), np.float32)
    items = [(rng.normal(size=(c, ln)) * 3 + 2).astype(np.float32) for ln in lengths]
    for i, item in enumerate(items):
        x[i, :, : item.shape[1]] = item
    mask = np.arange(length)[None, None, :] < np.array(lengths)[:, None, None]
    params, stats = F.instance_norm_init(c)
    params = {k: jnp.asarray(rng.normal(size=c), jnp.float32) for k in ("weight", "bias")}
    y, new = F.instance_norm_apply(params, stats, x, mask=mask)
    for i, item in enumerate(items):
        alone = np_instance_norm(item[None], params["weight"], params["bias"])[0]
        np.testing.assert_allclose(y[i, :, : item.shape[1]], alone, atol=2e-5)
    # running statistics use the valid counts too (unbiased with each item's own length)
    mean = np.mean([item.astype(np.float64).mean(axis=1) for item in items], axis=0)
    var = np.mean([item.astype(np.float64).var(axis=1, ddof=1) for item in items], axis=0)
    np.testing.assert_allclose(new["running_mean"], 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(new["running_var"], 0.9 + 0.1 * var, rtol=1e-6)


def test_mask_with_padding_at_the_start_stays_accurate(rng):
    """The shift must come from valid data: padding zeros at the front of a 1e4-offset signal."""
    x = (rng.normal(size=(1, 2, 64)) + 1e4).astype(np.float32)
    x[..., :16] = 0.0
    mask = np.arange(64)[None, None, :] >= 16
    y = F.instance_norm_apply({}, {}, x, mask=mask)[0]
    np.testing.assert_allclose(y[..., 16:], np_instance_norm(x[..., 16:]), atol=1e-4)


def test_fully_masked_instance_gives_bias_not_nan(rng):
    x = rng.normal(size=(2, 3, 5)).astype(np.float32)
    mask = np.ones((2, 1, 5), bool)
    mask[1] = False
    params = {"weight": jnp.ones(3), "bias": jnp.array([1.0, 2.0, 3.0])}
    y, _ = F.instance_norm_apply(params, {}, x, mask=mask)
    assert np.isfinite(np.asarray(y)).all()


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("hw", [4, 16, 64, 128])
def test_no_cancellation_far_from_zero(rng, hw):
    x = (rng.normal(size=(2, 4, hw, hw)) + 1e4).astype(np.float32)
    y = F.instance_norm(x)
    np.testing.assert_allclose(y, np_instance_norm(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_input_keeps_its_dtype_with_float32_statistics(rng, dtype):
    x = jnp.asarray((rng.normal(size=(2, 3, 16, 16)) * 4 + 50).astype(np.float32)).astype(dtype)
    params, stats = F.instance_norm_init(3)
    y, new = F.instance_norm_apply(params, stats, x)
    assert y.dtype == dtype
    assert new["running_mean"].dtype == jnp.float32
    # the reference normalizes the same (rounded) low-precision values in float64
    expected = np_instance_norm(np.asarray(x.astype(jnp.float32)))
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-3
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected, atol=tol * 4)
    # output rounding is the only low-precision step: error within one output ulp
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32)), expected.astype(dtype).astype(np.float64), atol=tol)


def test_float64_under_x64(rng):
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=(2, 3, 8, 8)) + 1e8)
        params, stats = F.instance_norm_init(3, dtype=jnp.float64)
        y, new = F.instance_norm_apply(params, stats, x)
        assert y.dtype == jnp.float64 and new["running_var"].dtype == jnp.float64
        np.testing.assert_allclose(y, np_instance_norm(np.asarray(x)), atol=1e-8)


def test_constant_input_gives_bias_not_nan():
    x = jnp.full((2, 3, 4, 4), 7.0)
    params = {"weight": jnp.array([1.0, 2.0, 3.0]), "bias": jnp.array([0.5, -1.0, 2.0])}
    y, stats = F.instance_norm_apply(params, F.instance_norm_init(3)[1], x)
    np.testing.assert_allclose(y, np.broadcast_to(params["bias"][None, :, None, None], x.shape), atol=1e-6)
    grads = jax.grad(lambda x, p: F.instance_norm_apply(p, {}, x)[0].sum() ** 2, argnums=(0, 1))(x, params)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


# ---------------------------------------------------------------- init


def test_init_matches_torch_state_dict_layout():
    import torch

    params, stats = F.instance_norm_init(5)
    module = torch.nn.InstanceNorm2d(5, affine=True, track_running_stats=True)
    torch_state = module.state_dict()
    assert set(params) | set(stats) == set(torch_state)
    for k, v in {**params, **stats}.items():
        np.testing.assert_array_equal(np.asarray(v), torch_state[k].numpy())
    assert F.instance_norm_init(5, affine=False, track_running_stats=False) == ({}, {})


# ---------------------------------------------------------------- errors

X = jnp.ones((2, 3, 4))
STATS = {"running_mean": jnp.zeros(3), "running_var": jnp.ones(3)}
BAD_CALLS = [
    ("2D input", lambda: F.instance_norm(jnp.ones((2, 3))), ValueError, "at least one spatial"),
    ("one spatial element", lambda: F.instance_norm(jnp.ones((2, 3, 1, 1))), ValueError, "spatial"),
    ("integer input", lambda: F.instance_norm(jnp.ones((2, 3, 4), jnp.int32)), TypeError, "floating"),
    ("bool input", lambda: F.instance_norm(jnp.ones((2, 3, 4), bool)), TypeError, "floating"),
    ("weight shape", lambda: F.instance_norm(X, weight=jnp.ones(4)), ValueError, r"\(3,\)"),
    ("bias shape", lambda: F.instance_norm(X, bias=jnp.ones((3, 1))), ValueError, r"\(3,\)"),
    ("running_mean shape", lambda: F.instance_norm(X, jnp.ones(2), jnp.ones(3)), ValueError, "running_mean"),
    ("running_var alone", lambda: F.instance_norm(X, None, jnp.ones(3)), ValueError, "both"),
    ("channel_axis range", lambda: F.instance_norm_apply({}, {}, X, channel_axis=3), ValueError, "channel_axis"),
    ("channel_axis batch", lambda: F.instance_norm_apply({}, {}, X, channel_axis=0), ValueError, "batch"),
    ("mask shape", lambda: F.instance_norm_apply({}, {}, X, mask=jnp.ones((2, 3, 5), bool)), ValueError, "broadcast"),
    ("mask dtype", lambda: F.instance_norm_apply({}, {}, X, mask=jnp.ones((2, 3, 4))), TypeError, "boolean"),
    ("momentum range", lambda: F.instance_norm(X, momentum=1.5), ValueError, "momentum"),
    ("eps", lambda: F.instance_norm(X, eps=-1.0), ValueError, "eps"),
    ("unknown param key", lambda: F.instance_norm_apply({"gamma": jnp.ones(3)}, {}, X), ValueError, "gamma"),
    ("cumulative without count", lambda: F.instance_norm_apply({}, STATS, X, momentum=None), ValueError,
     "num_batches_tracked"),
    ("unknown implementation", lambda: F.instance_norm_apply({}, {}, X, implementation="cuda"), ValueError,
     "implementation"),
    ("unknown implementation in eval", lambda: F.instance_norm_apply({}, STATS, X, training=False,
                                                                     implementation="cuda"), ValueError,
     "implementation"),
    ("a lucid.Tensor to the pure API",
     lambda: F.instance_norm_apply({}, {}, lucid.Tensor(np.ones((2, 3, 4)), requires_grad=True)),
     TypeError, "must be an array, got Tensor"),
]


@pytest.mark.parametrize("name,call,error,match", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_input_raises_a_clear_error(name, call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_errors_are_raised_at_trace_time_under_jit():
    traced = []

    @jax.jit
    def f(x, w):
        traced.append(True)
        return F.instance_norm(x, weight=w)

    with pytest.raises(ValueError, match=r"\(3,\)"):
        f(jnp.ones((2, 3, 4)), jnp.ones(4))
    with pytest.raises(ValueError, match="spatial"):
        f(jnp.ones((2, 3, 1)), jnp.ones(3))
    assert len(traced) == 2  # raised while tracing, nothing was compiled or run
    np.testing.assert_allclose(f(jnp.arange(24.0).reshape(2, 3, 4), jnp.ones(3)).sum(), 0.0, atol=1e-5)


def test_single_spatial_element_is_fine_with_running_stats_in_eval():
    params, stats = F.instance_norm_init(3)
    y, _ = F.instance_norm_apply(params, stats, jnp.full((2, 3, 1), 2.0), training=False)
    np.testing.assert_allclose(y, 2.0 / np.sqrt(1 + 1e-5), rtol=1e-6)


def test_ref_oracle_agrees_with_numpy_oracle(rng):
    """The jnp reference used for derivative tests is itself checked against float64 NumPy."""
    x, w, b, _, _ = _inputs(rng, SHAPES["2d"])
    np.testing.assert_allclose(ref_instance_norm(jnp.asarray(x), w, b)[0], np_instance_norm(x, w, b), atol=2e-5)


# ---------------------------------------------------------------- friction: jit, torch tensors


def test_traced_training_under_jit_says_to_mark_it_static(rng):
    x, w, b, rm, rv = _inputs(rng, SHAPES["2d"])
    params, stats = {"weight": w, "bias": b}, {"running_mean": rm, "running_var": rv}
    with pytest.raises(TypeError, match=r"training must be a Python bool.*mark it static: static_argnames"):
        jax.jit(F.instance_norm_apply)(params, stats, x, training=True)
    for training in (True, False):
        y, new = jax.jit(F.instance_norm_apply, static_argnames="training")(params, stats, x, training=training)
        expected = torch_instance_norm(x, w, b, rm, rv, training=training)
        np.testing.assert_allclose(y, expected["y"], atol=3e-5)
        np.testing.assert_allclose(new["running_mean"], expected["running_mean"], atol=1e-6)


def test_torch_tensors_are_read_as_arrays(rng):
    """torch.Tensor inputs (requiring grad or not) are converted through NumPy: the results are JAX
    arrays equal to PyTorch's own instance norm on the same tensors."""
    x, w, b, rm, rv = _inputs(rng, SHAPES["2d"])
    expected = torch_instance_norm(x, w, b, rm, rv, training=True, momentum=0.2)
    tx, tw, tb = (torch.tensor(v, requires_grad=True) for v in (x, w, b))
    trm, trv = torch.tensor(rm), torch.tensor(rv)
    y, new = F.instance_norm_apply({"weight": tw, "bias": tb}, {"running_mean": trm, "running_var": trv}, tx,
                                   momentum=0.2)
    assert isinstance(y, jax.Array) and isinstance(new["running_mean"], jax.Array)
    np.testing.assert_allclose(y, expected["y"], atol=3e-5)
    np.testing.assert_allclose(new["running_var"], expected["running_var"], rtol=1e-6)
    np.testing.assert_array_equal(trm.numpy(), rm)  # pure: the torch tensors are only read
    out = F.instance_norm(tx, weight=tw, bias=tb)  # no running statistics: nothing to update
    np.testing.assert_allclose(out, torch_instance_norm(x, w, b)["y"], atol=3e-5)
    eval_out = F.instance_norm(tx, trm, trv, tw, tb, training=False)  # read-only use of running statistics
    np.testing.assert_allclose(eval_out, torch_instance_norm(x, w, b, rm, rv, training=False)["y"], atol=3e-5)
    # Training would update running statistics in place, which lucid cannot do to a torch tensor:
    # refused with the way out, nothing changed.
    with pytest.raises(TypeError, match=r"lucid\.Tensor\(running_mean\).*instance_norm_apply"):
        F.instance_norm(tx, trm, trv, tw, tb, training=True)
    np.testing.assert_array_equal(trm.numpy(), rm)
