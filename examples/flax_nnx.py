"""Train a small conv net in Flax NNX with ``lucid.flax.InstanceNorm`` (channels last).

The task is ``functional_training.py``'s (its data generator is imported from there): four
stripe textures in noisy 16x16 images whose contrast varies 2500-fold and whose brightness
shifts by up to 20. The network is an ``nnx.Module`` in Flax's layout (NHWC): ``nnx.Conv``
layers, each followed by lucid's instance norm with running statistics (``nnx.BatchStat``),
and an ``nnx.Linear`` head. ``nnx.Optimizer`` with optax's Adam trains the ``nnx.Param``s in
an ``nnx.jit`` step, which also updates the running statistics. ``model.eval()`` then
evaluates held-out images with the running statistics; for comparison, a clone evaluates
them with each image's own statistics. The loss curve is saved as ``flax_nnx_loss.png``.

Run: ``python examples/flax_nnx.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from functional_training import (
    CLASSES,
    EVAL_SIZE,
    LEARNING_RATE,
    TRUNK,
    eval_metrics,
    finish,
    loss_and_accuracy,
    make_batch,
    parse_cli,
    training_loop,
)

import lucid.flax
import lucid.nn.functional as F


class Net(nnx.Module):
    """Input norm, then ``TRUNK``'s conv / instance norm / relu blocks, mean and max pooling, a linear head."""

    def __init__(self, rngs: nnx.Rngs):
        # Each image normalized by its own brightness and contrast, at eval too: no running statistics.
        self.input_norm = lucid.flax.InstanceNorm(1, affine=False, track_running_stats=False)
        # No conv bias: the instance norm right after it would subtract it back out.
        self.convs = nnx.List([
            nnx.Conv(c_in, c_out, (3, 3), strides=stride, padding="SAME", use_bias=False, rngs=rngs)
            for c_in, c_out, stride in TRUNK
        ])
        self.norms = nnx.List([lucid.flax.InstanceNorm(c_out) for _, c_out, _ in TRUNK])  # features last
        self.head = nnx.Linear(2 * TRUNK[-1][1], len(CLASSES), rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.input_norm(x)
        for conv, norm in zip(self.convs, self.norms):
            h = jax.nn.relu(norm(conv(h)))
        return self.head(jnp.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))], axis=-1))


@nnx.jit
def train_step(model: Net, optimizer: nnx.Optimizer, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One Adam step on the parameters; the calls in training mode update the running statistics."""

    def objective(model: Net) -> tuple[jax.Array, jax.Array]:
        return loss_and_accuracy(model(x), labels)

    (loss, accuracy), grads = nnx.value_and_grad(objective, has_aux=True)(model)
    optimizer.update(model, grads)
    return loss, accuracy


@nnx.jit
def evaluate(model: Net, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    return loss_and_accuracy(model(x), labels)


def train(steps: int, seed: int = 0) -> tuple[Net, np.ndarray, np.ndarray]:
    model = Net(nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adam(LEARNING_RATE), wrt=nnx.Param)
    def step(x: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        return train_step(model, optimizer, np.moveaxis(x, 1, -1), labels)  # the data come NCHW; Flax's is NHWC

    losses, accuracies = training_loop(steps, np.random.default_rng(seed), step)
    return model, losses, accuracies


def eval_matches_functional(model: Net, x: jax.Array) -> bool:
    """The first trunk norm in eval mode gives ``instance_norm_apply``'s numbers with its params and stats."""
    norm = model.norms[0]
    h = model.convs[0](model.input_norm(x))
    params = {"weight": norm.weight[...], "bias": norm.bias[...]}
    stats = {k: getattr(norm, k)[...] for k in ("running_mean", "running_var", "num_batches_tracked")}
    expected, _ = F.instance_norm_apply(params, stats, h, training=False, channel_axis=-1)
    return bool(jnp.array_equal(norm(h), expected))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_cli(__doc__.split("\n\n")[0], argv)
    start = time.perf_counter()
    model, losses, accuracies = train(args.steps)
    x_eval, labels_eval = make_batch(np.random.default_rng(12345), EVAL_SIZE)
    x_eval = jnp.asarray(np.moveaxis(x_eval, 1, -1))
    # A clone in training mode: each image's own statistics; its running statistics change, the model's do not.
    instance = evaluate(nnx.clone(model), x_eval, labels_eval)
    model.eval()  # use_running_average=True in every InstanceNorm
    metrics = eval_metrics(evaluate(model, x_eval, labels_eval), instance)
    extra = {
        "num_batches_tracked": int(model.norms[0].num_batches_tracked[...]),
        "eval_matches_functional": eval_matches_functional(model, x_eval[:64]),
    }
    return finish(losses, accuracies, metrics, args.out / "flax_nnx_loss.png", start=start, extra=extra,
                  running="running statistics (model.eval())",
                  title="Stripe textures, Flax NNX with lucid.flax.InstanceNorm")


if __name__ == "__main__":
    main()
