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
from adversarial_data import ROWS, reference_output_and_gradient
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_instance_norm, ref_instance_norm, torch_instance_norm

import lucid.nn.functional as F
from lucid.nn import _native


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


# --------------------------------------------------------------------------
# The kernel's statistics on adversarial data, and its edge rules
# --------------------------------------------------------------------------

_NCHW_SPATIAL = {"1d": (16384,), "2d": (128, 128), "3d": (8, 32, 32)}


#: The kinds of adversarial data, by their rows in adversarial_data.ROWS.
_ROW_OF = {"hot-first": "hot-300-first", "sparse": "sparse-relu-1000-first", "offset": "offset-1e4",
           "clusters": "clusters-1e4", "narrow": "spread-1e-3-first-minus-50", "hot-500": "hot-500-first"}


def _adversarial(kind, shape, rng):
    """float32 data on which statistics taken around a poorly chosen shift (or in one sweep) cancel."""
    return ROWS[_ROW_OF[kind]](rng, shape).astype(np.float32)


ADVERSARIAL = {  # kind: {dims: (N, C, *spatial)}
    **{kind: {d: (2, 3, *s) for d, s in _NCHW_SPATIAL.items()}
       for kind in ("hot-first", "sparse", "offset", "clusters")},
    "narrow": {"1d": (2, 3, 4096), "2d": (2, 3, 64, 64), "3d": (2, 3, 16, 16, 16)},
    "hot-500": {"1d": (2, 3, 4000), "2d": (2, 3, 40, 100), "3d": (2, 3, 10, 20, 20)},
}


def _float64_reference(x, w, b, g, eps=1e-5):
    """Output, input gradient (cotangent g of the output) and the batch-averaged unbiased variance, in float64."""
    y, gx = reference_output_and_gradient(x, w, b, g, eps)
    m = np.prod(x.shape[2:])
    unbiased = (x.astype(np.float64).var(axis=tuple(range(2, x.ndim))) * m / (m - 1)).mean(0)
    return y, gx, unbiased


def _lucid_through_kernel(x, w, b, g, channels_last, dtype=jnp.float32):
    """lucid's output, input gradient and running variance (momentum 1: the batch's), in the logical layout;
    asserts that the forward and backward kernels compute them."""
    axis = -1 if channels_last else 1

    def to_layout(a):
        return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if channels_last else a

    params = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}
    stats = F.instance_norm_init(x.shape[1])[1]

    def forward(x):
        return F.instance_norm_apply(params, stats, x, channel_axis=axis, momentum=1.0)

    def run(x, g):
        (y, new_stats), pullback = jax.vjp(forward, x)
        return y, pullback((g, jax.tree.map(jnp.zeros_like, new_stats)))[0], new_stats["running_var"]

    xl, gl = jnp.asarray(to_layout(x), dtype), jnp.asarray(to_layout(g), dtype)
    assert _uses_kernel(run, xl, gl) and _uses_kernel(run, xl, gl, target="backward")
    y, gx, running_var = jax.jit(run)(xl, gl)
    y, gx = (np.asarray(v, np.float64) for v in (y, gx))
    if channels_last:
        y, gx = np.moveaxis(y, -1, 1), np.moveaxis(gx, -1, 1)
    return y, gx, np.asarray(running_var, np.float64)


def _scaled_error(got, want):
    return np.max(np.abs(got - want)) / np.max(np.abs(want))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("dims", ["1d", "2d", "3d"])
@pytest.mark.parametrize("kind", sorted(ADVERSARIAL))
def test_kernel_statistics_are_exact_on_adversarial_data(rng, kind, dims, channels_last):
    """Hot pixels, sparse maps, far offsets, clusters and narrow spreads: the output to 1e-6 of its scale,
    the input gradient to 1e-5 of its scale, the running variance to 1e-5, against float64 NumPy; and
    PyTorch's output and gradient agree with lucid's to within PyTorch's own error."""
    shape = ADVERSARIAL[kind][dims]
    x = _adversarial(kind, shape, rng)
    c = shape[1]
    w = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    want_y, want_gx, want_var = _float64_reference(x, w, b, g)
    y, gx, running_var = _lucid_through_kernel(x, w, b, g, channels_last)
    assert _scaled_error(y, want_y) <= 1e-6
    assert _scaled_error(gx, want_gx) <= 1e-5
    np.testing.assert_allclose(running_var, want_var, rtol=1e-5)
    if not channels_last:
        torch_out = torch_instance_norm(x, w, b, grad_out=g)
        for got, want, theirs in ((y, want_y, torch_out["y"]), (gx, want_gx, torch_out["dx"])):
            theirs = theirs.astype(np.float64)
            scale = np.max(np.abs(want))
            assert np.max(np.abs(got - theirs)) <= np.max(np.abs(theirs - want)) + 1e-6 * scale


# Row lengths that take each path of the kernel's reductions: one short row (a group of them summed
# together), a row of whole blocks, and rows with a partial last block (multiples of 16 and of 8 elements
# are the AVX-512 and AVX2 block sizes).
_HOT_LENGTHS = (9, 37, 64, 256, 1024, 1000, 4099)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("m", _HOT_LENGTHS)
def test_a_hot_pixel_anywhere_costs_no_accuracy(rng, m, channels_last):
    """One value 1e3 in N(0, 1) at the first, last, a middle and a block-boundary position, one instance
    each, and in a sparse map: the statistics stay exact whichever block or lane it falls in."""
    positions = sorted({0, m - 1, m // 2, min(m - 1, 512), min(m - 1, 31)})
    n, c = 2, len(positions) + 1
    x = rng.standard_normal((n, c, m))
    for ch, p in enumerate(positions):
        x[:, ch, p] = 1e3
    x[:, -1] = np.abs(x[:, -1]) * (rng.random((n, m)) < 0.02)  # sparse, hot in the middle
    x[:, -1, m // 3] = 1e3
    x = x.astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    want_y, want_gx, want_var = _float64_reference(x, w, b, g)
    y, gx, running_var = _lucid_through_kernel(x, w, b, g, channels_last)
    assert _scaled_error(y, want_y) <= 1e-6
    assert _scaled_error(gx, want_gx) <= 1e-5
    np.testing.assert_allclose(running_var, want_var, rtol=1e-5)


@pytest.mark.parametrize("m", [9, 37, 64, 200, 256])
def test_short_rows_with_a_far_first_element_take_the_second_pass(rng, m):
    """Short rows are summed around their first element when that is near their mean, and summed again
    around the mean otherwise. Here the first element is the one far value of a row offset by 1e4 (so
    (x0 - mean)^2 is about m times the variance): centred on it, the float sums would lose
    digits the targets need."""
    x = rng.standard_normal((4, 5, m)) + 1e4
    x[:, :, 0] += 300.0
    x[1, 2] = rng.standard_normal(m) + 1e4  # a row that passes the first test, among rows that fail it
    x = x.astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(5)).astype(np.float32)
    b = rng.standard_normal(5).astype(np.float32)
    g = rng.standard_normal(x.shape).astype(np.float32)
    want_y, want_gx, want_var = _float64_reference(x, w, b, g)
    y, gx, running_var = _lucid_through_kernel(x, w, b, g, channels_last=False)
    assert _scaled_error(y, want_y) <= 1e-6
    assert _scaled_error(gx, want_gx) <= 1e-5
    np.testing.assert_allclose(running_var, want_var, rtol=1e-5)


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("kind", ["hot-first", "sparse", "offset", "narrow"])
def test_bfloat16_statistics_are_exact_too(rng, kind, channels_last):
    """bfloat16 input is exact in float: the statistics (running variance) keep float32's bound; the
    output and input gradient, rounded to bfloat16, are within its precision (2^-8) of the scale."""
    shape = (2, 3, 64, 64)
    x = np.asarray(jnp.asarray(_adversarial(kind, shape, rng), jnp.bfloat16).astype(jnp.float32))
    c = shape[1]
    w = (1 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    g = np.asarray(jnp.asarray(rng.standard_normal(shape), jnp.bfloat16).astype(jnp.float32))
    want_y, want_gx, want_var = _float64_reference(x, w, b, g)
    y, gx, running_var = _lucid_through_kernel(x, w, b, g, channels_last, dtype=jnp.bfloat16)
    assert _scaled_error(y, want_y) <= 2**-8
    assert _scaled_error(gx, want_gx) <= 2**-7
    np.testing.assert_allclose(running_var, want_var, rtol=1e-5)


def _kernel_forward(x, eps, channels_last, w=None, b=None):
    """The forward kernel called directly on its (P, N, C, M) / (P, N, M, C) layout: y, mean + residual, var."""
    c = x.shape[3] if channels_last else x.shape[2]
    w = jnp.ones(c, jnp.float32) if w is None else w
    b = jnp.zeros(c, jnp.float32) if b is None else b
    call = jax.jit(lambda x, w, b: _native.forward_call(x, w, b, eps=eps, channels_last=channels_last))
    y, mean, residual, var = call(x, w, b)
    return (np.asarray(y, np.float64), np.asarray(mean, np.float64) + np.asarray(residual, np.float64),
            np.asarray(var, np.float64))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("layout", ["short-rows", "long-rows", "nhwc"])
def test_nan_and_inf_poison_their_own_instance_only(rng, layout, dtype):
    """A NaN or an infinity makes its instance's mean and variance NaN (never a clamped 0); the neighbours
    in the same group of short rows, the same vector of channels or the same slab are untouched."""
    channels_last = layout == "nhwc"
    m = {"short-rows": 9, "long-rows": 1000, "nhwc": 300}[layout]
    n, c = 2, 40  # channels-last: two whole vectors of channels (AVX2: five) and a tail of 8
    x = (rng.standard_normal((n, c, m)) * 2 + 3).astype(np.float32)
    bad = {(0, 3): np.nan, (0, 5): np.inf, (1, 17): -np.inf, (1, 38): np.nan}
    for (i, ch), v in bad.items():
        x[i, ch, m // 2] = v
    x = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32))
    xl = np.moveaxis(x, 1, -1) if channels_last else x
    y, mean, var = _kernel_forward(jnp.asarray(xl[None], dtype), 1e-5, int(channels_last))
    y = np.moveaxis(y[0], -1, 1) if channels_last else y[0]
    mean, var = mean[0], var[0]
    poisoned = np.zeros((n, c), bool)
    for key in bad:
        poisoned[key] = True
    assert np.all(np.isnan(mean[poisoned])) and np.all(np.isnan(var[poisoned]))
    clean = np.where(np.isfinite(x), x, 0.0).astype(np.float64)
    want_mean, want_var = clean.mean(-1), clean.var(-1)
    np.testing.assert_allclose(mean[~poisoned], want_mean[~poisoned], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var[~poisoned], want_var[~poisoned], rtol=1e-6)
    assert np.all(np.isnan(y[poisoned]))
    want_y = (clean - want_mean[..., None]) / np.sqrt(want_var[..., None] + 1e-5)
    tol = 2**-7 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(y[~poisoned], want_y[~poisoned], rtol=tol, atol=tol * np.max(np.abs(want_y)))


@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("m", [9, 1000])
def test_eps_zero_constant_instance_normalizes_to_its_bias(rng, m, channels_last):
    """var + eps = 0 gives r = 0 (as PyTorch's invstd): y is the bias exactly, through the public API."""
    n, c = 2, 3
    x = rng.standard_normal((n, c, m)).astype(np.float32)
    x[0, 1] = 7.25  # constant instances, among normal ones
    x[1, 2] = -3.0
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    axis = -1 if channels_last else 1
    xl = np.ascontiguousarray(np.moveaxis(x, 1, -1)) if channels_last else x
    params = {"weight": jnp.asarray(w), "bias": jnp.asarray(b)}

    def forward(x):
        return F.instance_norm_apply(params, None, x, channel_axis=axis, eps=0.0)[0]

    assert _uses_kernel(forward, xl)
    y = np.asarray(jax.jit(forward)(xl))
    y = np.moveaxis(y, -1, 1) if channels_last else y
    assert np.all(y[0, 1] == b[1]) and np.all(y[1, 2] == b[2])
    with np.errstate(invalid="ignore"):  # the reference's 0/0 on the constant instances, not compared
        want = np_instance_norm(x, w, b, eps=0.0)
    ok = np.ones((n, c), bool)
    ok[0, 1] = ok[1, 2] = False
    np.testing.assert_allclose(y[ok], want[ok], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("m", [9, 1000])
def test_backward_kernel_with_zero_rstd_stays_finite(rng, m, channels_last, dtype):
    """With r = 0 (var + eps = 0), the backward kernel's gx is the mean's and variance's own part,
    gm/M + 2 gv (x - mean)/M, finite, and g2 = 0: no coefficient divides by r."""
    n, c = 2, 3
    x = np.array(jnp.asarray(rng.standard_normal((n, c, m)), dtype).astype(jnp.float32))
    x[0, 1] = 4.0  # a constant instance, and the others given r = 0 as well
    gy = np.asarray(jnp.asarray(rng.standard_normal(x.shape), dtype).astype(jnp.float32))
    gm, gv = rng.standard_normal((n, c)).astype(np.float32), rng.standard_normal((n, c)).astype(np.float32)
    mean64 = x.astype(np.float64).mean(-1)
    mean = mean64.astype(np.float32)
    residual = (mean64 - mean).astype(np.float32)
    w = rng.standard_normal(c).astype(np.float32)
    rstd = np.zeros((n, c), np.float32)
    xl, gyl = (np.ascontiguousarray(np.moveaxis(v, 1, -1)) if channels_last else v for v in (x, gy))
    call = jax.jit(lambda *a: _native.backward_call(*a, channels_last=int(channels_last)))
    gx, g1, g2 = call(*(jnp.asarray(v[None], dtype) for v in (xl, gyl)),
                      *(jnp.asarray(v[None]) for v in (mean, residual, rstd)), jnp.asarray(w),
                      *(jnp.asarray(v[None]) for v in (gm, gv)))
    gx = np.asarray(gx[0], np.float64)
    gx = np.moveaxis(gx, -1, 1) if channels_last else gx
    want = (gm[..., None] + 2 * gv[..., None] * (x - mean64[..., None])) / m
    assert np.all(np.isfinite(gx))
    tol = 2**-7 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(gx, want, rtol=tol, atol=tol * np.max(np.abs(want)))
    np.testing.assert_allclose(np.asarray(g1[0]), gy.astype(np.float64).sum(-1), rtol=1e-5, atol=1e-4)
    assert np.all(np.asarray(g2) == 0)
