"""lucid's native CPU kernels against the pure-XLA path and float64 references.

The kernels (``csrc/``) compute the forward pass and the
backward pass (the transpose of the tangent map) on CPU where they apply;
every other test of the suite runs through them too. Here: that they are
built and used, that they agree with the XLA path, with float64 NumPy and with
``jax.grad`` of a ``jnp`` reference in every layout and dtype they take, under
``vmap``, ``shard_map`` and higher-order differentiation, and that they step
aside where they do not apply (masks, float16, ``implementation="xla"``,
export).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_instance_norm, ref_instance_norm

import lucid.nn.functional as F


def _uses_kernel(fn, *args, target: str = "forward") -> bool:
    return f"lucid_instance_norm_{target}" in jax.jit(fn).lower(*args).as_text()


def _apply(x, weight, bias, channel_axis=1, training=True):
    params = {} if weight is None else {"weight": weight, "bias": bias}
    stats = F.instance_norm_init(x.shape[channel_axis])[1]
    return F.instance_norm_apply(params, stats, x, channel_axis=channel_axis, training=training)


def test_the_kernel_is_built_and_used_on_cpu():
    """CI installs with a compiler: a missing kernel is a build failure, not a skip. The path running
    is the one LUCID_NATIVE_ISA asks for (CI runs these tests once per path), else the CPU's best."""
    status = F.native_kernel_status()
    assert F.native_kernel_available() and status.enabled and status.loaded and status.built, status
    assert status.problem is None and status.disabled_by is None, status
    assert status.isa == os.environ.get("LUCID_NATIVE_ISA", status.cpu_isas[-1]), status
    assert set(status.cpu_isas) <= set(status.isas) and "baseline" in status.cpu_isas
    x = jnp.ones((2, 3, 4, 5))
    assert _uses_kernel(lambda x: _apply(x, None, None)[0], x)
    with F.pure_xla():
        assert not _uses_kernel(lambda x: _apply(x, None, None)[0], x)
        assert not F.native_kernel_available()
        assert F.native_kernel_status().disabled_by == "pure_xla()"


CASES = {  # shape, channel_axis, dtype
    "2d": ((4, 6, 12, 10), 1, jnp.float32),
    "1d": ((3, 5, 37), 1, jnp.float32),
    "rows-shorter-than-a-vector": ((6, 7, 3, 3), 1, jnp.float32),
    "bf16-short-rows": ((4, 9, 5, 5), 1, jnp.bfloat16),
    "3d": ((2, 3, 4, 5, 6), 1, jnp.float32),
    "nhwc": ((3, 9, 7, 20), -1, jnp.float32),
    "nlc-wide": ((2, 33, 40), -1, jnp.float32),
    "bf16": ((2, 8, 16, 16), 1, jnp.bfloat16),
    "bf16-nhwc": ((2, 16, 16, 8), -1, jnp.bfloat16),
}


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_xla_path_and_float64(rng, case, affine):
    shape, axis, dtype = CASES[case]
    c = shape[axis]
    x = (rng.normal(size=shape) * 2.0 + 3.0).astype(np.float32)
    w = rng.normal(size=c).astype(np.float32) if affine else None
    b = rng.normal(size=c).astype(np.float32) if affine else None
    xj = jnp.asarray(x, dtype)
    run = jax.jit(lambda x, w, b: _apply(x, w, b, channel_axis=axis))
    y, stats = run(xj, w, b)
    with F.pure_xla():
        y_xla, stats_xla = jax.jit(lambda x, w, b: _apply(x, w, b, channel_axis=axis))(xj, w, b)
    assert y.dtype == dtype
    # Reference in float64 on the input as the kernel saw it (bf16-rounded for bf16).
    xs = np.moveaxis(np.asarray(xj, np.float64), axis, 1)
    want = np.moveaxis(np_instance_norm(xs, w, b), 1, axis)
    tol = dict(rtol=1e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, **tol)
    np.testing.assert_allclose(np.asarray(y, np.float64), np.asarray(y_xla, np.float64), **tol)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(stats[key], stats_xla[key], rtol=1e-5, atol=1e-6, err_msg=key)


@pytest.mark.parametrize("shape, axis, dtype", [((2, 3, 700001), 1, jnp.float32),
                                                ((8, 64, 128, 128), 1, jnp.bfloat16),
                                                ((4, 128, 128, 64), -1, jnp.float32)],
                         ids=["unaligned-rows", "bf16", "nhwc"])
def test_large_outputs_streamed_past_the_cache_are_exact(rng, shape, axis, dtype):
    """Outputs of 16 MiB and more, forward and backward, take the non-temporal store path
    (and huge-page advice), rows starting off the vector alignment included."""
    x = jnp.asarray((rng.normal(size=shape) + 2.0).astype(np.float32), dtype)
    gy = jnp.asarray(rng.normal(size=shape).astype(np.float32), dtype)
    c = shape[axis]
    w, b = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    assert x.nbytes >= 16 * 2**20
    y, gx = jax.jit(lambda x, g: _output_and_input_gradient(
        lambda x: _apply(x, w, b, channel_axis=axis)[0], x, g))(x, gy)
    want = np.moveaxis(np_instance_norm(np.moveaxis(np.asarray(x, np.float64), axis, 1), w, b), 1, axis)
    _, want_gx = _output_and_input_gradient(lambda x: ref_instance_norm(x, w, b, channel_axis=axis)[0],
                                            x.astype(jnp.float32), gy.astype(jnp.float32))
    tol = dict(rtol=1e-2, atol=2e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y, np.float64), want, **tol)
    np.testing.assert_allclose(np.asarray(gx, np.float32), want_gx, **tol)


def _lucid_output(x, w, b):
    return _apply(x, w, b)[0]


def _reference_output(x, w, b):
    return ref_instance_norm(x, w, b)[0]


def _output_and_input_gradient(fn, x, g):
    y, pull = jax.vjp(fn, x)
    return y, pull(g)[0]


def test_kernel_stays_accurate_far_from_zero(rng):
    x = (rng.normal(size=(2, 4, 32, 32)) + 1e4).astype(np.float32)
    w, b = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    y, _ = jax.jit(lambda x: _apply(x, w, b))(x)
    assert np.max(np.abs(np.asarray(y, np.float64) - np_instance_norm(x.astype(np.float64), w, b))) < 1e-4


def test_gradients_through_the_kernel_match_jax_grad_of_the_reference(rng):
    x = (rng.normal(size=(3, 4, 9, 7)) * 1.5 - 2.0).astype(np.float32)
    w, b = rng.normal(size=4).astype(np.float32), rng.normal(size=4).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)

    def loss(fn):
        return lambda x, w, b: jnp.sum(fn(x, w, b) * g)

    lucid_fn, reference = _lucid_output, _reference_output
    assert _uses_kernel(lambda x: lucid_fn(x, w, b), x)
    got = jax.jit(jax.grad(loss(lucid_fn), argnums=(0, 1, 2)))(x, w, b)
    want = jax.grad(loss(reference), argnums=(0, 1, 2))(x, w, b)
    for a, e in zip(got, want):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-5)
    # Forward mode and a second order meet the kernel's rule, never the kernel itself.
    v = rng.normal(size=x.shape).astype(np.float32)
    hvp = jax.jit(lambda *p: jax.jvp(jax.grad(loss(lucid_fn)), p, (v, np.zeros_like(w), np.zeros_like(b)))[1])(x, w, b)
    hvp_ref = jax.jvp(jax.grad(loss(reference)), (x, w, b), (v, np.zeros_like(w), np.zeros_like(b)))[1]
    np.testing.assert_allclose(hvp, hvp_ref, rtol=1e-3, atol=1e-4)


def test_vmap_gives_each_example_its_own_weights(rng):
    """Under vmap the kernel takes a leading batch over which weight and bias differ."""
    x = rng.normal(size=(5, 2, 3, 8)).astype(np.float32)
    w = rng.normal(size=(5, 3)).astype(np.float32)
    b = rng.normal(size=(5, 3)).astype(np.float32)
    fn = jax.vmap(lambda x, w, b: _apply(x, w, b)[0])
    assert _uses_kernel(fn, x, w, b)
    y = jax.jit(fn)(x, w, b)
    for i in range(5):
        np.testing.assert_allclose(y[i], np_instance_norm(x[i].astype(np.float64), w[i], b[i]), rtol=1e-5, atol=1e-5)


def test_the_xla_path_is_used_where_the_kernel_does_not_apply(rng):
    x = rng.normal(size=(2, 3, 16)).astype(np.float32)
    params, stats = F.instance_norm_init(3)
    mask = np.arange(16) < 10
    assert not _uses_kernel(lambda x: F.instance_norm_apply(params, stats, x, mask=mask)[0], x)
    assert not _uses_kernel(lambda x: F.instance_norm_apply(params, stats, x.astype(jnp.float16))[0], x)
    assert not _uses_kernel(lambda x: F.instance_norm_apply(params, stats, x, implementation="xla")[0], x)
    # (Sharded inputs: tests/test_sharding.py checks where the kernel runs on every device's block.)


def test_inside_shard_map_each_device_runs_the_kernel_on_its_block(rng):
    x = rng.normal(size=(8, 3, 6, 5)).astype(np.float32)
    params, stats = F.instance_norm_init(3)
    mesh = jax.make_mesh((8,), ("b",))
    fn = jax.shard_map(lambda x: F.instance_norm_apply(params, stats, x, axis_name="b"),
                       mesh=mesh, in_specs=P("b"), out_specs=(P("b"), P()))
    xs = jax.device_put(x, NamedSharding(mesh, P("b")))
    assert _uses_kernel(fn, xs)
    y, new_stats = jax.jit(fn)(xs)
    with F.pure_xla():
        y_one, stats_one = F.instance_norm_apply(params, stats, x)
    np.testing.assert_allclose(y, y_one, rtol=1e-5, atol=1e-5)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(new_stats[key], stats_one[key], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------
# The backward kernel
# --------------------------------------------------------------------------


def _stats_loss(fn, g, a, c):
    """A loss on the output and on the per-instance mean and variance, so the
    backward kernel gets cotangents for all three."""

    def loss(x, w, b):
        y, mean, var = fn(x, w, b)
        return jnp.sum(y.astype(jnp.float32) * g) + jnp.sum(mean * a) + jnp.sum(var * c)

    return loss


def _core(spatial_axes, kernel):
    from lucid.nn._normalize import normalize_with_instance_stats
    from lucid.nn._stats import NormConfig

    config = NormConfig(spatial_axes, None, 1e-5, kernel)
    return lambda x, w, b: normalize_with_instance_stats(x, w, b, None, config)[:3]


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_backward_kernel_matches_xla_path_and_reference_gradients(rng, case, affine):
    shape, axis, dtype = CASES[case]
    ndim, c = len(shape), shape[axis]
    spatial = tuple(range(2, ndim)) if axis == 1 else tuple(range(1, ndim - 1))
    stat_shape = tuple(1 if a in spatial else d for a, d in enumerate(shape))
    x = jnp.asarray((rng.normal(size=shape) * 2.0 + 3.0).astype(np.float32), dtype)
    channel = tuple(c if a == axis % ndim else 1 for a in range(ndim))  # broadcastable to x, as the core takes it
    w = jnp.asarray(rng.normal(size=channel).astype(np.float32)) if affine else None
    b = jnp.asarray(rng.normal(size=channel).astype(np.float32)) if affine else None
    g = rng.normal(size=shape).astype(np.float32)
    a, cc = rng.normal(size=stat_shape).astype(np.float32), rng.normal(size=stat_shape).astype(np.float32)
    argnums = (0, 1, 2) if affine else (0,)
    kernel = jax.jit(jax.grad(_stats_loss(_core(spatial, True), g, a, cc), argnums=argnums))
    assert _uses_kernel(lambda *v: kernel(*v), x, w, b, target="backward")
    got = kernel(x, w, b)
    xla = jax.jit(jax.grad(_stats_loss(_core(spatial, False), g, a, cc), argnums=argnums))(x, w, b)

    def reference(x, w, b):  # jnp in float32
        y, mean, var, _ = ref_instance_norm(x.astype(jnp.float32), w, b, channel_axis=axis)
        return y, mean, var

    want = jax.jit(jax.grad(_stats_loss(reference, g, a, cc), argnums=argnums))(x, w, b)
    tol = dict(rtol=2e-2, atol=5e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-4, atol=2e-5)
    for name, got_, xla_, want_ in zip("xwb", got, xla, want):
        assert got_.dtype == xla_.dtype, name
        np.testing.assert_allclose(np.asarray(got_, np.float64), np.asarray(xla_, np.float64), **tol, err_msg=name)
        np.testing.assert_allclose(np.asarray(got_, np.float64), np.asarray(want_, np.float64), **tol, err_msg=name)


def test_backward_kernel_compiles_without_input_sized_temporaries(rng):
    """The compiled forward+backward keeps no input-sized buffer besides its inputs and outputs."""
    x = rng.normal(size=(4, 8, 64, 64)).astype(np.float32)
    w, b = np.ones(8, np.float32), np.zeros(8, np.float32)

    def forward_backward(x, w, b, g):
        y, pullback = jax.vjp(lambda x, w, b: _apply(x, w, b)[0], x, w, b)
        return y, pullback(g)

    compiled = jax.jit(forward_backward).lower(x, w, b, x).compile()
    assert "lucid_instance_norm_backward" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 0.05 * x.nbytes


def test_backward_kernel_under_vmap_gives_per_example_gradients(rng):
    """vmap of grad: the mapped axis becomes a leading axis of the kernel, weights differ per example."""
    xs = rng.normal(size=(5, 2, 3, 4, 6)).astype(np.float32)
    ws = rng.normal(size=(5, 3)).astype(np.float32)
    b = rng.normal(size=3).astype(np.float32)

    def loss(x, w):
        return jnp.sum(_apply(x, w, b)[0] ** 3)

    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1)))
    assert _uses_kernel(per_example, xs, ws, target="backward")
    got = jax.jit(per_example)(xs, ws)
    with F.pure_xla():
        for i in range(5):
            want = jax.grad(loss, argnums=(0, 1))(xs[i], ws[i])
            for got_, want_ in zip(got, want):
                np.testing.assert_allclose(got_[i], want_, rtol=1e-4, atol=1e-4)


def test_backward_kernel_inside_shard_map_sums_replicated_weight_gradients(rng):
    x = rng.normal(size=(8, 3, 6, 5)).astype(np.float32)
    w, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    mesh = jax.make_mesh((8,), ("b",))

    def local_loss(x, g, w, b):
        return jax.lax.psum(jnp.sum(_apply(x, w, b)[0] * g), "b")

    grad = jax.shard_map(jax.grad(local_loss, argnums=(0, 2, 3)), mesh=mesh,
                         in_specs=(P("b"), P("b"), P(), P()), out_specs=(P("b"), P(), P()))
    xs, gs = (jax.device_put(v, NamedSharding(mesh, P("b"))) for v in (x, g))
    assert _uses_kernel(grad, xs, gs, w, b, target="backward")
    got = jax.jit(grad)(xs, gs, w, b)
    with F.pure_xla():
        want = jax.grad(lambda x, w, b: jnp.sum(_apply(x, w, b)[0] * g), argnums=(0, 1, 2))(x, w, b)
    for got_, want_ in zip(got, want):
        np.testing.assert_allclose(got_, want_, rtol=1e-4, atol=1e-4)


def test_backward_kernel_higher_orders_and_transposition(rng):
    """Derivatives of the backward pass meet the jnp formulas, and the pullback transposes back to the JVP."""
    x = (rng.normal(size=(2, 3, 5, 4)) * 1.5 + 1.0).astype(np.float32)
    w, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    lucid_fn, reference = _lucid_output, _reference_output

    def grad_norm(fn):
        return lambda x, w: jnp.sum(jax.grad(lambda x, w: jnp.sum(fn(x, w, b) * g), argnums=(0, 1))(x, w)[0] ** 2)

    got = jax.jit(jax.grad(grad_norm(lucid_fn), argnums=(0, 1)))(x, w)
    want = jax.jit(jax.grad(grad_norm(reference), argnums=(0, 1)))(x, w)
    for got_, want_ in zip(got, want):
        np.testing.assert_allclose(got_, want_, rtol=1e-3, atol=1e-4)
    xs, gs = x[:1, :, :2, :3], g[:1, :, :2, :3]
    hessian = jax.jit(jax.hessian(lambda x: jnp.sum(lucid_fn(x, w, b) * gs)))(xs)
    hessian_ref = jax.jit(jax.hessian(lambda x: jnp.sum(reference(x, w, b) * gs)))(xs)
    np.testing.assert_allclose(hessian, hessian_ref, rtol=1e-3, atol=1e-4)
    # Transposing the pullback (the backward kernel's primitive) gives the tangent map back.
    v = rng.normal(size=x.shape).astype(np.float32)

    @jax.jit
    def transposed_pullback(x, v):
        _, pullback = jax.vjp(lambda x: lucid_fn(x, w, b), x)
        return jax.linear_transpose(pullback, x)((v,))[0]

    assert not _uses_kernel(transposed_pullback, x, v, target="backward")  # transposed back to the tangent map
    want = jax.jvp(lambda x: reference(x, w, b), (x,), (v,))[1]
    np.testing.assert_allclose(transposed_pullback(x, v), want, rtol=1e-4, atol=1e-4)
