"""Adversarial data for instance norm: outliers at the first, middle or last position, sparse
post-ReLU maps, far offsets, clusters, a narrow spread under one far element.

The rows the accuracy tests (``tests/test_adversarial.py``, ``tests/test_native.py``)
and the benchmark's accuracy table (``benchmarks/run.py``) use, and the float64
reference they are measured against (NumPy only). Values are float64; callers
round them to the dtype under test.
"""

from __future__ import annotations

import numpy as np

SHAPES = {"1d": (2, 3, 4000), "2d": (2, 3, 256, 256), "3d": (2, 3, 16, 32, 32)}


def _at(x: np.ndarray, where: str, value: float) -> np.ndarray:
    """``x`` with ``value`` at the first, middle or last spatial element of every instance."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    flat[..., {"first": 0, "middle": flat.shape[-1] // 2 + 3, "last": -1}[where]] = value
    return x


def _hot(value: float, where: str):
    return lambda rng, shape: _at(rng.standard_normal(shape), where, value)


def _sparse_relu(value: float, where: str):
    """A post-ReLU activation map with 1% non-zero elements, and one hot element."""
    def make(rng, shape):
        x = np.maximum(rng.standard_normal(shape), 0) * (rng.uniform(size=shape) < 0.01)
        return _at(x, where, value)
    return make


def _offset(rng, shape):
    return rng.standard_normal(shape) + 1e4


def _clusters(rng, shape):
    return rng.standard_normal(shape) + np.where(rng.uniform(size=shape) < 0.5, 1e4, -1e4)


def _narrow_spread(rng, shape):
    """Spread 1e-3 around 1.0, the first element at -50."""
    return _at(1.0 + 1e-3 * rng.standard_normal(shape), "first", -50.0)


ROWS = {
    "hot-300-first": _hot(300.0, "first"),
    "hot-300-middle": _hot(300.0, "middle"),
    "hot-300-last": _hot(300.0, "last"),
    "hot-500-first": _hot(500.0, "first"),
    "sparse-relu-1000-first": _sparse_relu(1000.0, "first"),
    "sparse-relu-1000-middle": _sparse_relu(1000.0, "middle"),
    "offset-1e4": _offset,
    "clusters-1e4": _clusters,
    "spread-1e-3-first-minus-50": _narrow_spread,
}
#: The narrow spread is a 64x64 image in 2D, as measured in the benchmark's table.
SHAPE_OF_ROW = {("spread-1e-3-first-minus-50", "2d"): (2, 3, 64, 64)}


def make_data(row: str, dims: str, seed: int = 0):
    """``(x, weight, bias, g)`` as float64, channels-first; ``g`` is the output cotangent."""
    rng = np.random.default_rng(seed)
    shape = SHAPE_OF_ROW.get((row, dims), SHAPES[dims])
    x = ROWS[row](rng, shape)
    c = shape[1]
    w, b = rng.normal(size=c) + 0.5, rng.normal(size=c)
    return x, w, b, rng.standard_normal(shape)


def reference_output_and_gradient(x, w, b, g, eps: float = 1e-5):
    """float64 output and input gradient (for the output cotangent ``g``) of instance norm on
    ``(N, C, *spatial)`` data: ``dx = w r (g - mean(g) - xhat mean(g xhat))``, ``r = 1/sqrt(var + eps)``."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    axes = tuple(range(2, x.ndim))
    channel = (1, -1) + (1,) * (x.ndim - 2)
    w, b = np.asarray(w, np.float64).reshape(channel), np.asarray(b, np.float64).reshape(channel)
    mean = x.mean(axis=axes, keepdims=True)
    r = 1 / np.sqrt(x.var(axis=axes, keepdims=True) + eps)
    xhat = (x - mean) * r
    dx = w * r * (g - g.mean(axis=axes, keepdims=True) - xhat * (g * xhat).mean(axis=axes, keepdims=True))
    return xhat * w + b, dx
