"""lucid's FFI handlers called directly, as any program may (their targets are registered globally).

Every buffer is checked against ``x`` before the kernels touch memory: a
mismatch is an ``InvalidArgument`` error, never a write past a buffer.
Empty inputs are defined (statistics of an empty instance are NaN, as the
formulas over an empty set give; the backward's sums are 0). Run under
AddressSanitizer too (tools/sanitize.sh), where an overflow would abort.
"""

from __future__ import annotations

import pathlib
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import np_instance_norm

import lucid.nn.functional as F
from lucid.nn import _native

S = jax.ShapeDtypeStruct
F32, BF16 = jnp.float32, jnp.bfloat16
X_SHAPE = (1, 2, 3, 5)  # the kernels' (P, N, C, M): statistics P*N*C = 6, weight and bias P*C = 3


def _forward(x, w, b, out, channels_last=0):
    call = jax.ffi.ffi_call(_native._FORWARD, tuple(S(shape, dtype) for shape, dtype in out))
    return call(x, w, b, eps=np.float32(1e-5), channels_last=np.int64(channels_last))


def _backward(x, gy, stats, w, cotangents, out, channels_last=0):
    call = jax.ffi.ffi_call(_native._BACKWARD, tuple(S(shape, dtype) for shape, dtype in out))
    return call(x, gy, *stats, w, *cotangents, channels_last=np.int64(channels_last))


def _good_forward_outputs(shape=X_SHAPE, dtype=F32):
    stat = (shape[:3], F32)
    return [(shape, dtype), stat, stat, stat]


def _arrays(rng, shape=X_SHAPE, dtype=F32):
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32) + 1.0, dtype)
    c = shape[2]
    return x, jnp.asarray(rng.normal(size=c), F32), jnp.asarray(rng.normal(size=c), F32)


def test_the_handlers_are_loaded():
    assert _native.AVAILABLE, F.native_kernel_status()


def test_a_direct_call_with_matching_buffers_computes_instance_norm(rng):
    x, w, b = _arrays(rng)
    y, mean, residual, var = _forward(x, w, b, _good_forward_outputs())
    x64 = np.asarray(x, np.float64)
    np.testing.assert_allclose(y[0], np_instance_norm(x64[0], np.asarray(w), np.asarray(b)), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(mean, np.float64) + residual, x64.mean(-1), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, x64.var(-1), rtol=1e-5, atol=1e-6)


FORWARD_MISMATCHES = {  # which output (or input) differs, and the error it must give
    "y-size": (lambda o: o.__setitem__(0, ((1, 2, 3, 4), F32)), "y must have x's dtype and size"),
    "y-dtype": (lambda o: o.__setitem__(0, (X_SHAPE, BF16)), "y must have x's dtype and size"),
    "y-larger": (lambda o: o.__setitem__(0, ((1, 2, 3, 50), F32)), "y must have x's dtype and size"),
    "mean-size": (lambda o: o.__setitem__(1, ((1, 2, 2), F32)), "P\\*N\\*C"),
    "var-larger": (lambda o: o.__setitem__(3, ((1, 2, 30), F32)), "P\\*N\\*C"),
    "residual-dtype": (lambda o: o.__setitem__(2, ((1, 2, 3), jnp.float16)), "Wrong buffer dtype"),
}


@pytest.mark.parametrize("case", sorted(FORWARD_MISMATCHES))
def test_forward_rejects_outputs_that_do_not_match_x(rng, case):
    x, w, b = _arrays(rng)
    out = _good_forward_outputs()
    change, message = FORWARD_MISMATCHES[case]
    change(out)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(_forward(x, w, b, out))


def test_forward_rejects_inputs_that_do_not_match_x(rng):
    x, w, b = _arrays(rng)
    out = _good_forward_outputs()
    for args, message in [
        ((x, w[:2], b), "weight and bias must have P\\*C"),
        ((x, w, jnp.concatenate([b, b])), "weight and bias must have P\\*C"),
        ((x, w.astype(jnp.float16), b), "Wrong buffer dtype"),
    ]:
        with pytest.raises(jax.errors.JaxRuntimeError, match=message):
            jax.block_until_ready(_forward(*args, out))
    with pytest.raises(jax.errors.JaxRuntimeError, match="float32 or bfloat16"):
        jax.block_until_ready(_forward(x.astype(jnp.float16), w, b, _good_forward_outputs(dtype=jnp.float16)))
    with pytest.raises(jax.errors.JaxRuntimeError, match="at least 3 dims"):
        jax.block_until_ready(_forward(x[0, 0], w, b, [((3, 5), F32), ((3,), F32), ((3,), F32), ((3,), F32)]))


def _good_backward(rng, shape=X_SHAPE, dtype=F32):
    x, w, _ = _arrays(rng, shape, dtype)
    gy = jnp.asarray(rng.normal(size=shape), dtype)
    stat = jnp.asarray(rng.uniform(0.5, 1.5, size=shape[:3]), F32)
    return dict(x=x, gy=gy, stats=[stat, 0 * stat, stat], w=w, cotangents=[stat, stat],
                out=[(shape, dtype), (shape[:3], F32), (shape[:3], F32)])


BACKWARD_MISMATCHES = {
    "gy-size": (lambda a: a.__setitem__("gy", a["gy"][..., :4]), "gy must have x's dtype and size"),
    "gy-dtype": (lambda a: a.__setitem__("gy", a["gy"].astype(BF16)), "gy must have x's dtype and size"),
    "gx-larger": (lambda a: a["out"].__setitem__(0, ((1, 2, 3, 50), F32)), "gx must have x's dtype and size"),
    "gx-dtype": (lambda a: a["out"].__setitem__(0, (X_SHAPE, BF16)), "gx must have x's dtype and size"),
    "g1-larger": (lambda a: a["out"].__setitem__(1, ((1, 2, 30), F32)), "P\\*N\\*C"),
    "g2-smaller": (lambda a: a["out"].__setitem__(2, ((1, 2, 1), F32)), "P\\*N\\*C"),
    "rstd-size": (lambda a: a["stats"].__setitem__(2, a["stats"][2][..., :2]), "P\\*N\\*C"),
    "gvar-size": (lambda a: a["cotangents"].__setitem__(1, jnp.ones((7,), F32)), "P\\*N\\*C"),
    "weight-size": (lambda a: a.__setitem__("w", jnp.ones((4,), F32)), "weight must have P\\*C"),
    "mean-dtype": (lambda a: a["stats"].__setitem__(0, a["stats"][0].astype(jnp.float16)), "Wrong buffer dtype"),
}


@pytest.mark.parametrize("case", sorted(BACKWARD_MISMATCHES))
def test_backward_rejects_buffers_that_do_not_match_x(rng, case):
    args = _good_backward(rng)
    jax.block_until_ready(_backward(**args))  # the unchanged call runs
    change, message = BACKWARD_MISMATCHES[case]
    change(args)
    with pytest.raises(jax.errors.JaxRuntimeError, match=message):
        jax.block_until_ready(_backward(**args))


@pytest.mark.parametrize("channels_last", [0, 1])
def test_instances_without_elements_have_nan_statistics_and_zero_sums(rng, channels_last):
    """M == 0: the mean and variance over an empty set are 0/0 (NaN), as in NumPy and the XLA formulas;
    the backward's sums over it are 0. Nothing else is written (there is nothing else)."""
    shape = (1, 2, 0, 3) if channels_last else (1, 2, 3, 0)
    x = jnp.zeros(shape, F32)
    w = jnp.ones((3,), F32)
    stat = ((1, 2, 3), F32)
    y, mean, residual, var = _forward(x, w, w, [(shape, F32), stat, stat, stat], channels_last)
    assert y.shape == shape
    with np.errstate(invalid="ignore"), pytest.warns(RuntimeWarning):
        want_mean, want_var = np.mean(np.zeros((1, 2, 3, 0)), -1), np.var(np.zeros((1, 2, 3, 0)), -1)
    for got, want in ((mean, want_mean), (residual, want_mean), (var, want_var)):
        np.testing.assert_array_equal(got, want)  # NaN everywhere
    ones = jnp.ones((1, 2, 3), F32)
    gx, g1, g2 = _backward(x, x, [ones, ones, ones], w, [ones, ones], [(shape, F32), stat, stat], channels_last)
    assert gx.shape == shape
    np.testing.assert_array_equal(g1, np.zeros((1, 2, 3)))
    np.testing.assert_array_equal(g2, np.zeros((1, 2, 3)))


@pytest.mark.parametrize("shape", [(1, 0, 3, 5), (1, 2, 0, 5), (0, 2, 3, 5), (2, 3, 0, 4, 5)],
                         ids=["no-batch", "no-channels", "no-leading", "empty-leading-axis"])
def test_empty_batches_are_calls_that_write_nothing(shape):
    x = jnp.zeros(shape, F32)
    p = int(np.prod(shape[:-3]))
    w = jnp.ones((p * shape[-2],), F32)
    stat = (shape[:-1], F32)
    y, *stats = _forward(x, w, w, [(shape, F32), stat, stat, stat])
    assert y.shape == shape and all(s.shape == shape[:-1] for s in stats)
    gx, g1, g2 = _backward(x, x, [jnp.zeros(shape[:-1], F32)] * 3, w, [jnp.zeros(shape[:-1], F32)] * 2,
                           [(shape, F32), stat, stat])
    assert gx.shape == shape and g1.size == g2.size == 0


def test_empty_inputs_whose_other_dims_multiply_past_int64_are_rejected():
    """P*C would overflow: an error, not a size that wraps around to match a small buffer. (XLA itself
    refuses shapes whose leading dims alone overflow, so P cannot be tried here.)"""
    shape = (2**40, 0, 2**40, 2**40)
    x = jnp.zeros(shape, F32)
    one = ((1,), F32)
    with pytest.raises(jax.errors.JaxRuntimeError, match="too large"):
        jax.block_until_ready(_forward(x, jnp.ones((1,), F32), jnp.ones((1,), F32), [(shape, F32), one, one, one]))


def test_the_libraries_export_the_handlers_only():
    """Each instruction-set library keeps every other symbol (libstdc++'s included) to itself, so no two
    copies of one function, built for different instruction sets, can stand in for each other."""
    directory = _native._library_dir()
    libraries = sorted(directory.glob(f"{_native._LIBRARY_STEM}_*.so"))
    assert len(libraries) == len(F.native_kernel_status().isas) >= 1
    for library in libraries:
        names = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout.split()[2::3]
        want = {"LucidInstanceNormForward", "LucidInstanceNormBackward"}
        if "_baseline" in pathlib.Path(library).name:
            want.add("LucidCpuSupports")
        assert set(names) == want, library
