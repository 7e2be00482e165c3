"""The hand-derived derivative rules: against jax.grad/jax.jvp of a plain jnp
reference, against PyTorch (test_functional.py), and with check_grads in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from oracles import ref_instance_norm

import lucid.nn.functional as F

MODES = ["train", "eval", "masked"]


def _problem(rng, mode, shape=(2, 3, 4, 5), dtype=np.float32):
    c = shape[1]
    x = (rng.normal(size=shape) * 2 + 1).astype(dtype)
    params = {"weight": rng.normal(size=c).astype(dtype), "bias": rng.normal(size=c).astype(dtype)}
    stats = {"running_mean": rng.normal(size=c).astype(dtype), "running_var": rng.uniform(0.5, 2, size=c).astype(dtype)}
    mask = None
    if mode == "masked":
        mask = rng.uniform(size=(shape[0], 1) + shape[2:]) < 0.7
        mask[..., 0] = True
        mask = jnp.asarray(mask)
    return jax.tree.map(jnp.asarray, (x, params, stats)) + (mask,)


def _lucid(mode, mask):
    training = mode != "eval"

    def f(x, params, stats):
        y, new = F.instance_norm_apply(params, stats, x, training=training, mask=mask)
        return y, new

    return f


def _reference(mode, mask):
    training = mode != "eval"

    def f(x, params, stats):
        y, mean, var, count = ref_instance_norm(
            x, params["weight"], params["bias"], stats["running_mean"], stats["running_var"],
            training=training, mask=mask)
        if not training:
            return y, stats
        unbiased = var * count / jnp.maximum(count - 1, 1)
        new = {"running_mean": 0.9 * stats["running_mean"] + 0.1 * mean.mean(axis=(0, 2, 3)),
               "running_var": 0.9 * stats["running_var"] + 0.1 * unbiased.mean(axis=(0, 2, 3))}
        return y, new

    return f


@pytest.mark.parametrize("mode", MODES)
def test_vjp_matches_autodiff_of_the_reference(rng, mode):
    """Reverse mode, including cotangents flowing into the updated running statistics."""
    x, params, stats, mask = _problem(rng, mode)
    reference_out = _reference(mode, mask)(x, params, stats)
    ct = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), reference_out)
    out, pullback = jax.vjp(_lucid(mode, mask), x, params, stats)
    ref_out, ref_pullback = jax.vjp(_reference(mode, mask), x, params, stats)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out)):
        np.testing.assert_allclose(a, b, atol=2e-5)
    for a, b in zip(jax.tree.leaves(pullback(ct)), jax.tree.leaves(ref_pullback(ct))):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_jvp_matches_autodiff_of_the_reference(rng, mode):
    x, params, stats, mask = _problem(rng, mode)
    tangents = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), (x, params, stats))
    out, dout = jax.jvp(_lucid(mode, mask), (x, params, stats), tangents)
    ref_out, ref_dout = jax.jvp(_reference(mode, mask), (x, params, stats), tangents)
    for a, b in zip(jax.tree.leaves((out, dout)), jax.tree.leaves((ref_out, ref_dout))):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_check_grads_float64_second_order(rng, mode):
    with jax.enable_x64(True):
        x, params, stats, mask = _problem(rng, mode, shape=(2, 2, 3, 4), dtype=np.float64)
        def f(x, w, b, rm, rv):
            return _lucid(mode, mask)(x, {"weight": w, "bias": b}, {"running_mean": rm, "running_var": rv})

        args = (x, params["weight"], params["bias"], stats["running_mean"], stats["running_var"])
        check_grads(f, args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_higher_order_transformations_match_the_reference(rng):
    x, params, _, _ = _problem(rng, "train", shape=(2, 2, 3, 3))
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    def loss(fn):
        return lambda x: jnp.sum(jnp.tanh(fn(x)) * g)

    ours = loss(lambda x: F.instance_norm_apply(params, {}, x)[0])
    ref = loss(lambda x: ref_instance_norm(x, params["weight"], params["bias"])[0])
    for transform in (jax.hessian, lambda f: jax.grad(lambda x: jnp.sum(jax.grad(f)(x) ** 2)),
                      lambda f: jax.jacfwd(jax.grad(f))):
        np.testing.assert_allclose(jax.jit(transform(ours))(x), jax.jit(transform(ref))(x), atol=2e-4, rtol=1e-3)
    jac = jax.jacfwd(lambda x: F.instance_norm_apply(params, {}, x)[0])(x)
    jac_ref = jax.jacrev(lambda x: ref_instance_norm(x, params["weight"], params["bias"])[0])(x)
    np.testing.assert_allclose(jac, jac_ref, atol=2e-5)


def test_vmap_checkpoint_and_jit_agree_with_the_reference(rng):
    x, params, stats, _ = _problem(rng, "train", shape=(3, 2, 2, 4, 5))  # a leading vmapped axis

    def loss(x, params):
        y, new = F.instance_norm_apply(params, stats, x)
        return jnp.sum((y ** 2 * jnp.arange(y.size).reshape(y.shape)) % 3) + new["running_var"].sum()

    def ref_loss(x, params):
        y, _, var, count = ref_instance_norm(x, params["weight"], params["bias"])
        unbiased = (var * count / (count - 1)).mean(axis=(0, 2, 3))
        iota = jnp.arange(y.size).reshape(y.shape)
        return jnp.sum((y ** 2 * iota) % 3) + jnp.sum(0.9 * stats["running_var"] + 0.1 * unbiased)

    expected = jax.vmap(jax.grad(ref_loss, argnums=(0, 1)), in_axes=(0, None))(x, params)
    for wrap in (lambda f: f, jax.checkpoint, jax.jit):
        got = jax.vmap(jax.grad(wrap(loss), argnums=(0, 1)), in_axes=(0, None))(x, params)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_reverse_mode_keeps_only_small_residuals(rng, mode):
    """Besides the inputs, the pullback holds O(N*C) statistics, never a second x-sized array."""
    x, params, stats, mask = _problem(rng, mode, shape=(4, 3, 16, 16))
    _, pullback = jax.vjp(lambda x, p: _lucid(mode, mask)(x, p, stats)[0], x, params)
    inputs = {id(a) for a in jax.tree.leaves((x, params, stats, mask))}
    leaves = [leaf for leaf in jax.tree.leaves(pullback) if hasattr(leaf, "shape")]
    extra = [leaf for leaf in leaves if id(leaf) not in inputs]
    big = [leaf.shape for leaf in extra if leaf.size > x.shape[0] * x.shape[1]]
    assert big == [], f"input-sized residuals: {big}"
    assert any(leaf is x for leaf in leaves)  # x itself is reused, not copied


def test_gradient_of_summed_output_is_zero(rng):
    """d/dx sum(instance_norm(x)) = 0 whatever x (with weight 1, bias 0)."""
    x = jnp.asarray(rng.normal(size=(2, 3, 7, 5)) * 10, jnp.float32)
    g = jax.grad(lambda x: F.instance_norm(x).sum())(x)
    np.testing.assert_allclose(g, 0.0, atol=1e-5)


def test_bfloat16_gradients_are_float32_accurate_then_rounded(rng):
    x = jnp.asarray(rng.normal(size=(2, 3, 8, 8)), jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    dx = jax.grad(lambda x: jnp.sum((F.instance_norm(x) * g).astype(jnp.float32)))(x)
    assert dx.dtype == jnp.bfloat16
    x32 = x.astype(jnp.float32)
    def ref_loss(x):
        y = ref_instance_norm(x)[0].astype(jnp.bfloat16).astype(jnp.float32)
        return jnp.sum(y * g.astype(jnp.float32))

    ref = jax.grad(ref_loss)(x32)
    np.testing.assert_allclose(dx.astype(jnp.float32), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("training", [True, False])
def test_gradients_stay_accurate_far_from_zero(rng, training):
    """Regression: the backward must centre on the mean without cancellation (mean/std = 1e4)."""
    shape = (2, 3, 32, 32)
    x = (rng.normal(size=shape) + 1e4).astype(np.float32)
    w = rng.normal(size=3).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)
    rm = (1e4 + rng.normal(size=3)).astype(np.float32)
    rv = rng.uniform(0.5, 2, size=3).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    stats = {"running_mean": rm, "running_var": rv}

    def ours(x, w, b):
        return jnp.sum(F.instance_norm_apply({"weight": w, "bias": b}, stats, x, training=training)[0] * g)

    def ref(x, w, b):
        return jnp.sum(ref_instance_norm(x, w, b, jnp.asarray(rm, x.dtype), jnp.asarray(rv, x.dtype),
                                         training=training)[0] * g)

    got = jax.grad(ours, argnums=(0, 1, 2))(x, w, b)
    with jax.enable_x64(True):
        expected = jax.grad(ref, argnums=(0, 1, 2))(*(np.asarray(a, np.float64) for a in (x, w, b)))
        expected = [np.asarray(e) for e in expected]
    for a, e in zip(got, expected):
        np.testing.assert_allclose(a, e, atol=1e-4 * np.abs(e).max(), rtol=0)


_VIEW_FORMS = [
    ((2, 3, 8, 64, 80), 1, "split"),   # a long channels-first row, cut into segments
    ((2, 8, 64, 80, 3), -1, "tile"),   # channels-last, positions folded into the last axis
    ((2, 3, 40, 40), 1, "merged"),     # spatial axes merged into one row
]
_UNIT_AXES = [                         # no axis of size 1 in the view
    ((1, 3, 8, 64, 80), 1, "split"),   # a batch of one
    ((2, 1, 40, 40), 1, "merged"),     # one channel
    ((1, 64, 80, 1), -1, "merged"),    # one item, one channel, channels-last
    ((1, 64, 80, 3), -1, "tile"),
]


@pytest.mark.parametrize("shape, channel_axis, form, masked",
                         [(*f, m) for f in _VIEW_FORMS for m in (False, True)]
                         + [(*f, i == 0) for i, f in enumerate(_UNIT_AXES)])
def test_compact_views_keep_values_and_derivatives(rng, shape, channel_axis, form, masked):
    """The XLA path's sums run over a compact view of x (lucid/nn/_stats.py): each form, with and without
    a mask, gives the reference's output, pullback, and gradient of a gradient (the tangent map's own
    derivative), in float64 so that the sums' order cannot hide behind float32 rounding."""
    from lucid.nn import _stats
    axis = channel_axis % len(shape)
    spatial = tuple(range(2, len(shape))) if axis == 1 else tuple(range(1, len(shape) - 1))
    with jax.enable_x64(True):
        x = jnp.asarray(rng.normal(size=shape) * 3 + 50, jnp.float64).at[(0,) * len(shape)].set(400.0)
        config = _stats.NormConfig(spatial, None, 1e-5)
        view = _stats._compact_view(x, config)
        assert view is not None
        assert {"split": view.split > 1, "tile": view.tile > 1, "merged": view.split == view.tile == 1}[form]
        view_shape = _stats._to_view(x, x.shape, config, view).shape
        assert 1 not in view_shape and view_shape[view.reduce_axes[0]] > 1
        c = shape[axis]
        w, b = (jnp.asarray(rng.normal(size=c), jnp.float64) for _ in range(2))
        g = jnp.asarray(rng.normal(size=shape), jnp.float64)
        mask = None
        if masked:
            mshape = tuple(1 if a == axis else n for a, n in enumerate(shape))
            mask = jnp.asarray(rng.uniform(size=mshape) < 0.6).at[(0,) * len(shape)].set(True)

        def ours(x, w, b):
            with F.pure_xla():
                return F.instance_norm_apply({"weight": w, "bias": b}, {}, x, mask=mask, channel_axis=channel_axis)[0]

        def ref(x, w, b):
            return ref_instance_norm(x, w, b, mask=mask, channel_axis=channel_axis)[0]

        def grad_norm(f):
            def loss(x, w, b):
                return jnp.sum(jnp.sin(f(x, w, b)) * g)

            return lambda x, w, b: jnp.sum(jax.grad(loss)(x, w, b) ** 2)

        for f, r in ((ours, ref), (grad_norm(ours), grad_norm(ref))):
            out, pullback = jax.vjp(jax.jit(f), x, w, b)
            ref_out, ref_pullback = jax.vjp(jax.jit(r), x, w, b)
            ct = g if out.ndim else jnp.ones_like(out)
            np.testing.assert_allclose(out, ref_out, rtol=1e-9, atol=1e-9 * float(jnp.abs(ref_out).max()))
            for a, e in zip(pullback(ct), ref_pullback(ct)):
                np.testing.assert_allclose(a, e, rtol=0, atol=1e-8 * float(jnp.abs(e).max()))
