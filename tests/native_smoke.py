"""A standalone check of lucid's native kernel, for a fresh process: an installed wheel, an emulated
CPU, a library that fails to load.

Runs a small jitted forward and backward through lucid (the kernel where it
is enabled) and compares them with a float64 NumPy reference; prints one JSON
line: where lucid was imported from, the kernel's status, whether the
compiled program calls the kernel, and the largest errors.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import lucid
import lucid.nn.functional as F


def reference(x, w, b, g):
    """``y`` and the gradient of ``sum(g * y)`` to ``x``, in float64."""
    x, g = x.astype(np.float64), g.astype(np.float64)
    w, b = w.reshape(1, -1, 1, 1), b.reshape(1, -1, 1, 1)
    mean = x.mean(axis=(2, 3), keepdims=True)
    rstd = 1 / np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
    xhat = (x - mean) * rstd
    dxhat = g * w
    gx = rstd * (dxhat - dxhat.mean(axis=(2, 3), keepdims=True)
                 - xhat * (dxhat * xhat).mean(axis=(2, 3), keepdims=True))
    return xhat * w + b, gx


def main() -> int:
    rng = np.random.default_rng(0)
    x = (rng.normal(size=(2, 3, 6, 5)) * 2 + 1).astype(np.float32)
    g = rng.normal(size=x.shape).astype(np.float32)
    w, b = rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32)

    def step(x, w, b, g):
        y, pullback = jax.vjp(lambda x: F.instance_norm(x, weight=w, bias=b), x)
        return y, pullback(g)[0]

    compiled = jax.jit(step).lower(x, w, b, g)
    y, gx = compiled.compile()(x, w, b, g)
    want_y, want_gx = reference(x, w, b, g)
    status = F.native_kernel_status()
    print(json.dumps({
        "lucid": lucid.__file__,
        "enabled": status.enabled,
        "loaded": status.loaded,
        "isa": status.isa,
        "cpu_isas": list(status.cpu_isas),
        "problem": status.problem,
        "uses_kernel": all(f"lucid_instance_norm_{t}" in compiled.as_text() for t in ("forward", "backward")),
        "y_error": float(np.max(np.abs(np.asarray(y, np.float64) - want_y))),
        "gx_error": float(np.max(np.abs(np.asarray(gx, np.float64) - want_gx))),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
