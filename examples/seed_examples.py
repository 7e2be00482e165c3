"""The reference pages' two examples, with their correct results.

``--steps N`` repeats the module example's training call N times (default 1, the
reference page's single call), to show the running statistics approaching the
batch's own (``1 - 0.9**N`` of the way, with momentum 0.1); the output and its
gradient are the same at every call. ``--out DIR`` receives ``seed_examples.json``
with every printed number; the last line printed is the same JSON.

Run: ``python examples/seed_examples.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

import lucid.nn.functional as F


def module_example(steps: int) -> dict:
    """``InstanceNorm2d(num_features=2)`` on the ``(1, 2, 2, 3)`` input, trained ``steps`` times."""
    x = jnp.array([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]]])
    params, stats = F.instance_norm_init(2)

    def forward(x, stats):
        return F.instance_norm_apply(params, stats, x, training=True)

    for _ in tqdm(range(steps), desc="training calls", unit="call"):
        (y, new_stats), pullback = jax.vjp(forward, x, stats)
        # The gradient of output.sum(): ones for y, nothing for the new statistics.
        grad, _ = pullback((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new_stats)))
        stats = new_stats
    return {"output": y, "input_grad": grad, "running_stats": stats}


def functional_example() -> dict:
    """``F.instance_norm`` on the ``(1, 2, 2)`` input with the reference page's arguments."""
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    return {"output": F.instance_norm(x, jnp.zeros(2), jnp.ones(2), jnp.ones(2), jnp.zeros(2), training=True)}


def to_json(tree: dict) -> dict:
    return jax.tree.map(lambda v: np.asarray(v).tolist(), tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1,
                        help="training calls of the module example (default: 1, as on the reference page)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for seed_examples.json (default: .)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    np.set_printoptions(precision=4, suppress=True)

    module = module_example(args.steps)
    print("InstanceNorm2d(num_features=2) on the (1, 2, 2, 3) input:")
    print(np.asarray(module["output"]))
    print("gradient of output.sum() with respect to the input (zero up to rounding):")
    print(np.asarray(module["input_grad"]))
    print(f"running statistics after {args.steps} training call(s):")
    print({k: np.asarray(v) for k, v in module["running_stats"].items()})

    functional = functional_example()
    print("\nF.instance_norm on the (1, 2, 2) input:")
    print(np.asarray(functional["output"]))

    report = {"steps": args.steps, "module": to_json(module), "functional": to_json(functional)}
    path = args.out / "seed_examples.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"saved {path}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
