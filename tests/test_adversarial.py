"""Statistics on adversarial data: outliers anywhere, sparse maps, clusters, far offsets.

Every case runs on the pure-XLA path (``pure_xla()``: what GPU/TPU, export,
masks and sharded programs run) and on the default path (lucid's native CPU
kernel), against float64 NumPy (``jax.grad`` of the plain ``jnp`` reference in
float64 for masked gradients) and against PyTorch. The targets, relative to
the scale (largest magnitude) of the reference: the output within 1e-6, the
input gradient within 1e-5, the unbiased running variance within 1e-5 of
itself. A statistic taken around one element far from the mean (a hot first
pixel) fails them by orders of magnitude; both paths meet them everywhere.
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from adversarial_data import ROWS, SHAPES, make_data, reference_output_and_gradient
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import ref_instance_norm, torch_instance_norm

import lucid.nn.functional as F

EPS = 1e-5
Y_TOL, DX_TOL, RV_TOL = 1e-6, 1e-5, 1e-5  # float32 targets, relative to the reference's scale



# --------------------------------------------------------------------------
# Oracles and lucid
# --------------------------------------------------------------------------


def _numpy_reference(x, w, b, g):
    """float64 output, input gradient, running mean and unbiased running variance (momentum 1)."""
    y, dx = reference_output_and_gradient(x, w, b, g, EPS)
    axes = tuple(range(2, x.ndim))
    m = np.prod([x.shape[a] for a in axes])
    rm = x.mean(axis=axes).mean(axis=0)
    rv = (x.var(axis=axes) * m / (m - 1)).mean(axis=0)
    return {"y": y, "dx": dx, "running_mean": rm, "running_var": rv}


def _lucid(x, w, b, g, *, pure_xla: bool, dtype=jnp.float32, channel_axis: int = 1, mask=None):
    """lucid's output, input gradient and running statistics (momentum 1), as float64, channels-first.

    ``x``, ``g`` (and ``mask``) are channels-first; with ``channel_axis=-1``
    lucid receives them channels-last.
    """
    def to_layout(a):
        return None if a is None else np.moveaxis(a, 1, channel_axis)

    pdt = jnp.promote_types(dtype, jnp.float32)  # weight, bias and statistics
    stats = {"running_mean": jnp.zeros(len(w), pdt), "running_var": jnp.ones(len(w), pdt)}

    def forward(x, w, b):
        y, new = F.instance_norm_apply({"weight": w, "bias": b}, stats, x, momentum=1.0,
                                       channel_axis=channel_axis, mask=to_layout(mask))
        return y, (new["running_mean"], new["running_var"])

    def step(x, w, b, g):
        (y, running), pullback = jax.vjp(forward, x, w, b)
        dx = pullback((g, jax.tree.map(jnp.zeros_like, running)))[0]
        return y, dx, running

    args = jnp.asarray(to_layout(x), dtype), jnp.asarray(w, pdt), jnp.asarray(b, pdt), jnp.asarray(to_layout(g), dtype)
    with F.pure_xla() if pure_xla else contextlib.nullcontext():
        y, dx, (rm, rv) = jax.jit(step)(*args)

    def back(a):
        return np.moveaxis(np.asarray(a.astype(jnp.promote_types(a.dtype, jnp.float32)), np.float64), channel_axis, 1)

    return {"y": back(y), "dx": back(dx), "running_mean": np.asarray(rm, np.float64),
            "running_var": np.asarray(rv, np.float64)}


def _torch(x, w, b, g):
    c = len(w)
    out = torch_instance_norm(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32),
                              np.zeros(c, np.float32), np.ones(c, np.float32), momentum=1.0,
                              grad_out=g.astype(np.float32))
    return {k: np.asarray(out[k], np.float64) for k in ("y", "dx", "running_mean", "running_var")}


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    """The largest error relative to the reference's scale (absolute where that scale is 0: an all-zero gradient)."""
    return float(np.abs(got - want).max() / (np.abs(want).max() or 1.0))


def _assert_targets(got, want, *, y_tol=Y_TOL, dx_tol=DX_TOL, rv_tol=RV_TOL, torch=None):
    """The targets against the float64 reference; against PyTorch, agreement within
    PyTorch's own error plus lucid's target (PyTorch is itself off by up to 1e-4 at mean 1e4)."""
    assert _rel(got["y"], want["y"]) <= y_tol, ("y", _rel(got["y"], want["y"]))
    assert _rel(got["dx"], want["dx"]) <= dx_tol, ("dx", _rel(got["dx"], want["dx"]))
    rv_err = np.abs(got["running_var"] - want["running_var"]) / want["running_var"]
    assert (rv_err <= rv_tol).all(), ("running_var", rv_err.max())
    spread = np.sqrt(want["running_var"])
    rm_err = (np.abs(got["running_mean"] - want["running_mean"]) / (np.abs(want["running_mean"]) + spread)).max()
    assert rm_err <= y_tol, ("running_mean", rm_err)
    if torch is not None:
        for key, tol in (("y", y_tol), ("dx", dx_tol)):
            scale = np.abs(want[key]).max()
            torch_err = np.abs(torch[key] - want[key]).max()
            assert np.abs(got[key] - torch[key]).max() <= tol * scale + torch_err, (key, "vs PyTorch")


# --------------------------------------------------------------------------
# The rows of the accuracy table, in 1D, 2D and 3D, on both paths
# --------------------------------------------------------------------------

CASES = [(row, dims) for row in ROWS for dims in SHAPES]

@pytest.mark.parametrize("row, dims", CASES, ids=[f"{r}-{d}" for r, d in CASES])
def test_xla_path_meets_the_targets(row, dims):
    x, w, b, g = make_data(row, dims)
    x32, g32 = (a.astype(np.float32).astype(np.float64) for a in (x, g))  # the values lucid sees
    want = _numpy_reference(x32, w.astype(np.float32), b.astype(np.float32), g32)
    got = _lucid(x32, w, b, g32, pure_xla=True)
    _assert_targets(got, want, torch=_torch(x32, w, b, g32))


@pytest.mark.parametrize("row", ["hot-300-first", "hot-300-last", "sparse-relu-1000-first", "offset-1e4",
                                 "clusters-1e4", "spread-1e-3-first-minus-50"])
def test_xla_path_meets_the_targets_channels_last(row):
    """``channel_axis=-1``: the statistics run over the channels-last array itself."""
    x, w, b, g = make_data(row, "2d")
    x32, g32 = (a.astype(np.float32).astype(np.float64) for a in (x, g))
    want = _numpy_reference(x32, w.astype(np.float32), b.astype(np.float32), g32)
    _assert_targets(_lucid(x32, w, b, g32, pure_xla=True, channel_axis=-1), want)


@pytest.mark.parametrize("row, dims, layout", [
    *((r, d, "NCHW") for r, d in CASES),
    *((r, "2d", "NHWC") for r in ("hot-300-first", "hot-300-last", "offset-1e4")),
], ids=lambda v: str(v))
def test_default_path_meets_the_targets(row, dims, layout):
    """The same rows through lucid's native CPU kernel (the default on CPU)."""
    x, w, b, g = make_data(row, dims)
    x32, g32 = (a.astype(np.float32).astype(np.float64) for a in (x, g))
    want = _numpy_reference(x32, w.astype(np.float32), b.astype(np.float32), g32)
    got = _lucid(x32, w, b, g32, pure_xla=False, channel_axis=-1 if layout == "NHWC" else 1)
    _assert_targets(got, want, torch=_torch(x32, w, b, g32))


# --------------------------------------------------------------------------
# bfloat16 and float16: statistics in float32, output and gradient rounded once
# --------------------------------------------------------------------------

#: The output and the input gradient are rounded to the input dtype: within
#: one ulp of it of the reference's scale (2**-8 for bfloat16, 2**-10 for float16).
LOW_PRECISION = {"bfloat16": 2.0**-8, "float16": 2.0**-10}
LOW_PRECISION_ROWS = ["hot-300-first", "hot-300-middle", "hot-300-last", "sparse-relu-1000-first", "clusters-1e4"]
@pytest.mark.parametrize("path", ["xla", "default"])
@pytest.mark.parametrize("dtype", list(LOW_PRECISION))
@pytest.mark.parametrize("row", LOW_PRECISION_ROWS)
def test_low_precision_inputs(row, dtype, path):
    """float16 never takes the kernel: both of its paths are the XLA path."""
    x, w, b, g = make_data(row, "2d")
    x_in, g_in = (np.asarray(jnp.asarray(a, dtype).astype(jnp.float32), np.float64) for a in (x, g))
    want = _numpy_reference(x_in, w.astype(np.float32), b.astype(np.float32), g_in)
    got = _lucid(x_in, w, b, g_in, pure_xla=path == "xla", dtype=jnp.dtype(dtype))
    ulp = LOW_PRECISION[dtype]
    _assert_targets(got, want, y_tol=ulp, dx_tol=ulp)


# --------------------------------------------------------------------------
# Masks: padding at the start, outliers in and out of it, items with 0 or 1 valid elements
# --------------------------------------------------------------------------


def _masked_reference(x, w, b, g, mask):
    """float64 output and input gradient (``jax.grad`` of the ``jnp`` reference) with a mask."""
    with jax.enable_x64(True):
        def loss(x):
            y = ref_instance_norm(jnp.asarray(x), jnp.asarray(w), jnp.asarray(b), mask=jnp.asarray(mask))[0]
            return jnp.sum(y * g), y

        dx, y = jax.grad(loss, has_aux=True)(np.asarray(x, np.float64))
        return np.asarray(y), np.asarray(dx)


@pytest.mark.parametrize("hot", ["in-padding", "first-valid"])
def test_masked_padding_at_the_start_with_outliers(hot):
    """Item n is valid from row ``starts[n]`` on: a hot value in the padding must not
    touch the statistics, one on the first valid element must not spoil them;
    items with one valid element and with none are included."""
    rng = np.random.default_rng(3)
    shape = (4, 3, 64, 48)
    x = rng.standard_normal(shape) + 1e3
    starts = [16, 40, 63, 64]  # item 2: the last row only, then one element of it; item 3: nothing valid
    mask = np.arange(64)[None, None, :, None] >= np.asarray(starts)[:, None, None, None]
    mask = np.broadcast_to(mask, (4, 1, 64, 48)).copy()
    mask[2, :, 63, 1:] = False
    for n, start in enumerate(starts):
        if hot == "in-padding":
            x[n, :, start - 1, 0] = 1e4
        elif start < 64:
            x[n, :, start, 0] = -3e3
    x = x.astype(np.float32).astype(np.float64)
    w, b = rng.normal(size=3) + 0.5, rng.normal(size=3)
    g = rng.standard_normal(shape).astype(np.float32).astype(np.float64)
    want_y, want_dx = _masked_reference(x, w.astype(np.float32), b.astype(np.float32), g, mask)
    got = _lucid(x, w, b, g, pure_xla=True, mask=mask)  # masks always take the XLA path
    for n in range(4):  # relative to each item's own scale (an empty item's output is its bias)
        assert _rel(got["y"][n], want_y[n]) <= Y_TOL, ("y", n)
        assert _rel(got["dx"][n], want_dx[n]) <= DX_TOL, ("dx", n)
    for n in (0, 1):  # items of whole valid rows: as PyTorch normalizes them alone, unpadded
        valid = (slice(n, n + 1), slice(None), slice(starts[n], None))
        alone = _torch(x[valid], w, b, g[valid])["y"]
        want = want_y[valid]
        scale, torch_err = np.abs(want).max(), np.abs(alone - want).max()
        assert np.abs(got["y"][valid] - alone).max() <= Y_TOL * scale + torch_err, n


# --------------------------------------------------------------------------
# Split spatial axes: sums combined across devices, both passes
# --------------------------------------------------------------------------


def _split_problem(row):
    x, w, b, g = make_data(row, "2d")
    x, g = x[:, :, :64, :16], g[:, :, :64, :16]  # 64 rows: 8 bands of 8, the hot pixel in the first band
    x32, g32 = (a.astype(np.float32).astype(np.float64) for a in (x, g))
    return x32, w, b, g32, _numpy_reference(x32, w.astype(np.float32), b.astype(np.float32), g32)


@pytest.mark.parametrize("row", ["hot-300-first", "offset-1e4", "clusters-1e4"])
def test_spatial_axis_name_inside_shard_map(row):
    x, w, b, g, want = _split_problem(row)
    mesh = jax.make_mesh((8,), ("s",))
    spec = P(None, None, "s")

    def body(x, g):
        def forward(x):
            return F.instance_norm_apply({"weight": w.astype(np.float32), "bias": b.astype(np.float32)}, {}, x,
                                         spatial_axis_name="s")[0]

        y, pullback = jax.vjp(forward, x)
        return y, pullback(g)[0]

    run = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(spec, spec), out_specs=(spec, spec)))
    y, dx = run(*(jax.device_put(jnp.asarray(a, jnp.float32), NamedSharding(mesh, spec)) for a in (x, g)))
    assert _rel(np.asarray(y, np.float64), want["y"]) <= Y_TOL
    assert _rel(np.asarray(dx, np.float64), want["dx"]) <= DX_TOL


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=str)
def test_spatial_axis_sharded_under_jit(axis_type):
    x, w, b, g, want = _split_problem("hot-300-first")
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    params = {"weight": jnp.asarray(w, jnp.float32), "bias": jnp.asarray(b, jnp.float32)}

    def step(x, g):
        y, pullback = jax.vjp(lambda x: F.instance_norm_apply(params, {}, x)[0], x)
        return y, pullback(g)[0]

    with jax.set_mesh(mesh):
        xs, gs = jax.device_put((jnp.asarray(x, jnp.float32), jnp.asarray(g, jnp.float32)),
                                NamedSharding(mesh, P(None, None, "d")))
        y, dx = jax.jit(step)(xs, gs)
    assert _rel(np.asarray(y, np.float64), want["y"]) <= Y_TOL
    assert _rel(np.asarray(dx, np.float64), want["dx"]) <= DX_TOL


def test_float64_under_x64_stays_exact_around_a_hot_pixel():
    x, w, b, g = make_data("hot-300-first", "2d")
    want = _numpy_reference(x, w, b, g)
    with jax.enable_x64(True):
        got = _lucid(x, w, b, g, pure_xla=False, dtype=jnp.float64)  # float64 always takes the XLA path
    _assert_targets(got, want, y_tol=1e-13, dx_tol=1e-12, rv_tol=1e-12)


# --------------------------------------------------------------------------
# Outliers anywhere
# --------------------------------------------------------------------------


@st.composite
def outlier_problems(draw):
    n, c = draw(st.integers(1, 2)), draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 12), min_size=1, max_size=3)))
    if np.prod(spatial) < 3:  # two elements always normalize to -1, 1: their gradient is 0, all rounding
        spatial = spatial[:-1] + (spatial[-1] + 2,)
    shape = (n, c) + spatial
    rng = np.random.default_rng(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 100.0]))
    offset = draw(st.sampled_from([0.0, 1.0, 1e3, -1e4]))
    x = rng.standard_normal(shape) * scale + offset
    if draw(st.booleans()):  # a sparse map: most elements at the offset
        x = np.where(rng.uniform(size=shape) < 0.9, offset, x)
    flat = x.reshape(n, c, -1)
    size = flat.shape[-1]
    for _ in range(draw(st.integers(1, 3))):
        position = draw(st.integers(0, size - 1))
        flat[..., position] = offset + draw(st.sampled_from([-1.0, 1.0])) * draw(
            st.sampled_from([10.0, 300.0, 1e4])) * scale
    return {"x": x, "weight": rng.normal(size=c) + 0.5, "bias": rng.normal(size=c),
            "g": rng.standard_normal(shape), "channels_last": draw(st.booleans())}


@settings(max_examples=30, deadline=None, derandomize=True)
@given(outlier_problems())
def test_xla_path_meets_the_targets_with_outliers_anywhere(p):
    x32, g32 = (p[k].astype(np.float32).astype(np.float64) for k in ("x", "g"))
    w, b = p["weight"].astype(np.float32), p["bias"].astype(np.float32)
    want = _numpy_reference(x32, w.astype(np.float64), b.astype(np.float64), g32)
    got = _lucid(x32, w, b, g32, pure_xla=True, channel_axis=-1 if p["channels_last"] else 1)
    _assert_targets(got, want)
