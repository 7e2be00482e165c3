"""Train a small conv net in Equinox with ``lucid.equinox.InstanceNorm`` (a stateful layer).

The task is ``functional_training.py``'s (its data generator is imported from there): four
stripe textures in noisy 16x16 images whose contrast varies 2500-fold and whose brightness
shifts by up to 20. The network is an ``eqx.Module`` written for one ``(C, H, W)`` image, as
Equinox layers are: ``eqx.nn.Conv2d`` layers, each followed by lucid's instance norm, and an
``eqx.nn.Linear`` head; ``eqx.nn.make_with_state`` builds it with its ``eqx.nn.State`` of
running statistics. A batch is ``jax.vmap(model, axis_name="batch")``: the layers are built
with that ``axis_name``, so the running statistics average over the whole batch. Optax's Adam
trains it in an ``eqx.filter_jit`` step; ``eqx.nn.inference_mode`` then evaluates held-out
images with the running statistics and, for comparison, the training-mode model evaluates
them with each image's own statistics. The loss curve is saved as ``equinox_layer_loss.png``.

Run: ``python examples/equinox_layer.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import time
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
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

import lucid.equinox
import lucid.nn.functional as F

AXIS = "batch"  # the vmap axis the layers average their running statistics over


class Net(eqx.Module):
    """Input norm, then ``TRUNK``'s conv / instance norm / relu blocks, mean and max pooling, a linear head."""

    input_norm: lucid.equinox.InstanceNorm
    convs: tuple[eqx.nn.Conv2d, ...]
    norms: tuple[lucid.equinox.InstanceNorm, ...]
    head: eqx.nn.Linear

    def __init__(self, key: jax.Array):
        keys = jax.random.split(key, len(TRUNK) + 1)
        # Each image normalized by its own brightness and contrast, at eval too: no running statistics.
        self.input_norm = lucid.equinox.InstanceNorm(1, affine=False, track_running_stats=False, axis_name=AXIS)
        # No conv bias: the instance norm right after it would subtract it back out.
        self.convs = tuple(
            eqx.nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, use_bias=False, key=k)
            for (c_in, c_out, stride), k in zip(TRUNK, keys)
        )
        self.norms = tuple(lucid.equinox.InstanceNorm(c_out, axis_name=AXIS) for _, c_out, _ in TRUNK)
        self.head = eqx.nn.Linear(2 * TRUNK[-1][1], len(CLASSES), key=keys[-1])

    def __call__(self, x: jax.Array, state: eqx.nn.State) -> tuple[jax.Array, eqx.nn.State]:
        """Logits of one ``(1, H, W)`` image, and the state with updated running statistics."""
        h, state = self.input_norm(x, state)
        for conv, norm in zip(self.convs, self.norms):
            h, state = norm(conv(h), state)
            h = jax.nn.relu(h)
        return self.head(jnp.concatenate([h.mean(axis=(1, 2)), h.max(axis=(1, 2))])), state


def batched(model: Net) -> Net:
    return jax.vmap(model, axis_name=AXIS, in_axes=(0, None), out_axes=(0, None))


optimizer = optax.adam(LEARNING_RATE)


@eqx.filter_jit
def train_step(model: Net, state: eqx.nn.State, opt_state: optax.OptState, x: jax.Array, labels: jax.Array):
    """One Adam step: the new model, state (running statistics) and optimizer state, the loss and accuracy."""

    def objective(model: Net) -> tuple[jax.Array, tuple[eqx.nn.State, jax.Array]]:
        logits, new_state = batched(model)(x, state)
        loss, accuracy = loss_and_accuracy(logits, labels)
        return loss, (new_state, accuracy)

    (loss, (state, accuracy)), grads = eqx.filter_value_and_grad(objective, has_aux=True)(model)
    updates, opt_state = optimizer.update(grads, opt_state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state, opt_state, loss, accuracy


@eqx.filter_jit
def evaluate(model: Net, state: eqx.nn.State, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits, _ = batched(model)(x, state)  # in training mode the new state is dropped
    return loss_and_accuracy(logits, labels)


def train(steps: int, seed: int = 0) -> tuple[Net, eqx.nn.State, np.ndarray, np.ndarray]:
    model, state = eqx.nn.make_with_state(Net)(jax.random.key(seed))
    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))

    def step(x: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        nonlocal model, state, opt_state
        model, state, opt_state, loss, accuracy = train_step(model, state, opt_state, x, labels)
        return loss, accuracy

    losses, accuracies = training_loop(steps, np.random.default_rng(seed), step)
    return model, state, losses, accuracies


def eval_matches_functional(model: Net, state: eqx.nn.State, x: jax.Array) -> bool:
    """The first trunk norm in inference mode gives ``instance_norm_apply``'s numbers on the whole batch."""
    norm = model.norms[0]
    h = jax.vmap(lambda x: model.convs[0](model.input_norm(x, state, inference=True)[0]))(x)
    y, _ = jax.vmap(norm, in_axes=(0, None), out_axes=(0, None))(h, state)
    params = {"weight": norm.weight, "bias": norm.bias}
    expected, _ = F.instance_norm_apply(params, state.get(norm.state_index), h, training=False)
    return bool(jnp.array_equal(y, expected))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_cli(__doc__.split("\n\n")[0], argv)
    start = time.perf_counter()
    model, state, losses, accuracies = train(args.steps)
    x_eval, labels_eval = make_batch(np.random.default_rng(12345), EVAL_SIZE)
    instance = evaluate(model, state, x_eval, labels_eval)
    inference_model = eqx.nn.inference_mode(model)  # every InstanceNorm uses its running statistics
    metrics = eval_metrics(evaluate(inference_model, state, x_eval, labels_eval), instance)
    extra = {
        "num_batches_tracked": int(state.get(model.norms[0].state_index)["num_batches_tracked"]),
        "eval_matches_functional": eval_matches_functional(inference_model, state, x_eval[:64]),
    }
    return finish(losses, accuracies, metrics, args.out / "equinox_layer_loss.png", start=start, extra=extra,
                  running="running statistics (inference_mode)",
                  title="Stripe textures, Equinox with lucid.equinox.InstanceNorm")


if __name__ == "__main__":
    main()
