"""Property-based cases: random shapes, dtypes, momenta, modes and masks against
the float64 NumPy reference."""

import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from oracles import reference, reference_running_stats

import lucid.nn.functional as F

SETTINGS = settings(max_examples=30, deadline=None, derandomize=True)


@st.composite
def problems(draw):
    n = draw(st.integers(1, 3))
    c = draw(st.integers(1, 4))
    spatial = tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3)))
    if np.prod(spatial) < 2:
        spatial = spatial[:-1] + (spatial[-1] + 1,)
    shape = (n, c) + spatial
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    offset = draw(st.sampled_from([0.0, 3.0, 1e3]))
    scale = draw(st.sampled_from([1e-2, 1.0, 30.0]))
    x = rng.normal(size=shape) * scale + offset
    return {
        "x": x,
        "weight": rng.normal(size=c),
        "bias": rng.normal(size=c),
        "running_mean": rng.normal(size=c),
        "running_var": rng.uniform(0.1, 3.0, size=c),
        "dtype": draw(st.sampled_from(["float32", "bfloat16", "float16"])),
        "training": draw(st.booleans()),
        "momentum": draw(st.sampled_from([None, 0.0, 0.1, 0.5, 1.0])),
        "channels_last": draw(st.booleans()),
        "masked": draw(st.booleans()),
        "mask_seed": seed + 1,
    }


def _expected(p, x64, mask):
    """float64 NumPy: output, new running mean and var (channels-first)."""
    stats = (p["running_mean"], p["running_var"])
    y = reference(x64, p["weight"], p["bias"], *stats, training=p["training"], mask=mask)[0]
    if not p["training"]:
        return y, *stats
    return y, *reference_running_stats(x64, *stats, momentum=p["momentum"], mask=mask)


@SETTINGS
@given(problems())
def test_matches_float64_reference(p):
    dtype = jnp.dtype(p["dtype"])
    x = jnp.asarray(p["x"], jnp.float32).astype(dtype)
    x64 = np.asarray(x.astype(jnp.float32), np.float64)  # the values lucid actually sees
    mask = None
    if p["masked"]:
        mrng = np.random.default_rng(p["mask_seed"])
        mask = mrng.uniform(size=(x.shape[0], 1) + x.shape[2:]) < 0.6
        mask.reshape(x.shape[0], -1)[:, :2] = True  # at least two valid elements per instance
    y_ref, rm_ref, rv_ref = _expected(p, x64, mask)

    params = {"weight": jnp.asarray(p["weight"], jnp.float32), "bias": jnp.asarray(p["bias"], jnp.float32)}
    stats = {"running_mean": jnp.asarray(p["running_mean"], jnp.float32),
             "running_var": jnp.asarray(p["running_var"], jnp.float32),
             "num_batches_tracked": jnp.zeros((), jnp.int32)}
    kwargs = dict(training=p["training"], momentum=p["momentum"])
    if p["channels_last"]:
        x_in = jnp.moveaxis(x, 1, -1)
        m_in = None if mask is None else np.moveaxis(mask, 1, -1)
        y, new = F.instance_norm_apply(params, stats, x_in, channel_axis=-1, mask=m_in, **kwargs)
        y = jnp.moveaxis(y, -1, 1)
    else:
        y, new = F.instance_norm_apply(params, stats, x, mask=mask, **kwargs)

    assert y.dtype == dtype and y.shape == x.shape
    ulp = {"float32": 1e-5, "bfloat16": 1.6e-2, "float16": 2e-3}[p["dtype"]]
    tol = ulp * (1 + np.abs(y_ref))
    err = np.abs(np.asarray(y.astype(jnp.float32), np.float64) - y_ref)
    assert (err <= tol * 4).all(), float((err / tol).max())
    np.testing.assert_allclose(new["running_mean"], rm_ref, rtol=1e-4, atol=1e-4 * (1 + np.abs(rm_ref).max()))
    np.testing.assert_allclose(new["running_var"], rv_ref, rtol=1e-4, atol=1e-5)
    assert int(new["num_batches_tracked"]) == int(p["training"])

