"""A standalone check of lucid's native kernel, for a fresh process: an installed wheel, an emulated
CPU, a library that fails to load.

Runs a small jitted forward and backward through lucid (the kernel where it
is enabled) and compares them with a float64 NumPy reference; prints one JSON
line: where lucid was imported from, the kernel's status, whether the
compiled program calls the kernel, and the largest errors. With
``--require-kernel`` (and ``--isa NAME``) it exits 1 unless the kernel (that
path) ran and matched.
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--require-kernel", action="store_true", help="fail unless the kernel ran and matched")
    parser.add_argument("--isa", help="with --require-kernel: the instruction-set path that must run")
    args = parser.parse_args()
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
    result = {
        "lucid": lucid.__file__,
        "enabled": status.enabled,
        "loaded": status.loaded,
        "isa": status.isa,
        "cpu_isas": list(status.cpu_isas),
        "problem": status.problem,
        "uses_kernel": all(f"lucid_instance_norm_{t}" in compiled.as_text() for t in ("forward", "backward")),
        "y_error": float(np.max(np.abs(np.asarray(y, np.float64) - want_y))),
        "gx_error": float(np.max(np.abs(np.asarray(gx, np.float64) - want_gx))),
    }
    print(json.dumps(result))
    matched = result["y_error"] < 1e-4 and result["gx_error"] < 1e-4
    if args.require_kernel and not (matched and result["uses_kernel"] and args.isa in (None, status.isa)):
        print(f"native_smoke: the kernel did not run{f' its {args.isa} path' if args.isa else ''} or "
              f"did not match NumPy: {status!r}", file=sys.stderr)
        return 1
    return 0 if matched else 1


if __name__ == "__main__":
    sys.exit(main())
