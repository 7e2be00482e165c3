"""Train a small conv net with lucid's functional API, every piece of state an explicit pytree.

Four stripe textures must be told apart in noisy 16x16 images whose contrast varies
2500-fold and whose brightness shifts by up to 20 from image to image: a nuisance instance
norm removes. Parameters (instance-norm ``weight``/``bias`` included) and running statistics
are dict pytrees; a ``jax.jit`` step trains the parameters with optax's Adam and returns the
new running statistics. At the end the model is evaluated on held-out images with the running
statistics (``training=False``) and, for comparison, with each image's own statistics (what
PyTorch's ``InstanceNorm2d`` uses by default), and the loss curve is saved as
``functional_training_loss.png``.

Run: ``python examples/functional_training.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # write files only: no display needed
import matplotlib.pyplot as plt
import numpy as np
import optax
from tqdm import tqdm

import lucid.nn.functional as F

Tree = dict[str, Any]

IMAGE_SIZE = 16
CLASSES = ("horizontal", "vertical", "diagonal", "checkerboard")
BATCH_SIZE = 64
EVAL_SIZE = 1024
LEARNING_RATE = 3e-3
NOISE = 1.0  # pixel noise, relative to the pattern's amplitude of 1
# (in_channels, out_channels, stride) of the conv trunk; each conv is followed by instance norm.
TRUNK = ((1, 16, 1), (16, 32, 2), (32, 32, 2))


# --------------------------------------------------------------------------
# Data: stripe textures under a random per-image brightness and contrast
# --------------------------------------------------------------------------


def make_batch(rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(N, 1, 16, 16)`` float32 and labels ``(N,)``, an index into ``CLASSES``.

    Each image is ``gain * (pattern + noise) + offset`` with the gain log-uniform in
    [0.02, 50] and the offset uniform in [-20, 20]: the raw pixel values say almost
    nothing about the class until each image is normalized by its own statistics.
    Data are made with NumPy on the host, as a data loader would, and fed to the step.
    """
    labels = rng.integers(0, len(CLASSES), batch_size)
    freq = rng.uniform(0.08, 0.22, (batch_size, 1, 1))
    phase = rng.uniform(0, 2 * math.pi, (batch_size, 2, 1, 1))
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]

    def wave(coord: np.ndarray, which: int) -> np.ndarray:
        return np.sin(2 * math.pi * freq * coord + phase[:, which])

    patterns = np.stack(
        [wave(y, 0), wave(x, 0), wave((x + y) / math.sqrt(2), 0), 2 * wave(x, 0) * wave(y, 1)], axis=1
    )  # (N, 4, H, W)
    pattern = patterns[np.arange(batch_size), labels][:, None]
    gain = np.exp(rng.uniform(math.log(0.02), math.log(50.0), (batch_size, 1, 1, 1)))
    offset = rng.uniform(-20.0, 20.0, (batch_size, 1, 1, 1))
    noise = NOISE * rng.standard_normal(pattern.shape)
    return (gain * (pattern + noise) + offset).astype(np.float32), labels.astype(np.int32)


# --------------------------------------------------------------------------
# Model: params and running statistics as two dict pytrees
# --------------------------------------------------------------------------


def conv2d(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    """``(N, C, H, W)`` x ``(O, C, kh, kw)`` -> ``(N, O, H/stride, W/stride)``, 'SAME' padding."""
    return jax.lax.conv_general_dilated(
        x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW")
    )


def init_model(rng: np.random.Generator) -> tuple[Tree, Tree]:
    """``(params, stats)``: conv weights, instance-norm params and running stats, a linear head.

    Weights are drawn with NumPy: ``jax.random`` compiles a generator for every new shape,
    a second or more each on a CPU.
    """

    def normal(shape: tuple[int, ...], std: float) -> jax.Array:
        return jnp.asarray(rng.standard_normal(shape) * std, jnp.float32)

    # The input norm has no affine params and keeps no running stats: at eval too, every
    # image is normalized by its own brightness and contrast.
    params: Tree = {"input_norm": {}}
    stats: Tree = {"input_norm": {}}
    for i, (c_in, c_out, _) in enumerate(TRUNK):
        # No conv bias: the instance norm right after it would subtract it back out.
        params[f"conv{i}"] = {"w": normal((c_out, c_in, 3, 3), math.sqrt(2 / (c_in * 9)))}
        params[f"norm{i}"], stats[f"norm{i}"] = F.instance_norm_init(c_out)
    width = TRUNK[-1][1]
    params["head"] = {
        "w": normal((2 * width, len(CLASSES)), 1 / math.sqrt(2 * width)),
        "b": jnp.zeros((len(CLASSES),)),
    }
    return params, stats


def apply_model(params: Tree, stats: Tree, x: jax.Array, *, training: bool) -> tuple[jax.Array, Tree]:
    """Logits ``(N, len(CLASSES))`` and the new running statistics."""
    new_stats: Tree = {}
    h, new_stats["input_norm"] = F.instance_norm_apply(
        params["input_norm"], stats["input_norm"], x, training=training
    )
    for i, (_, _, stride) in enumerate(TRUNK):
        h = conv2d(h, params[f"conv{i}"]["w"], stride)
        h, new_stats[f"norm{i}"] = F.instance_norm_apply(
            params[f"norm{i}"], stats[f"norm{i}"], h, training=training
        )
        h = jax.nn.relu(h)
    # Mean and max pooling: instance norm pins each channel's mean to its bias before the relu,
    # so the mean alone says little; the max says how peaked the response is.
    pooled = jnp.concatenate([h.mean(axis=(2, 3)), h.max(axis=(2, 3))], axis=1)
    return pooled @ params["head"]["w"] + params["head"]["b"], new_stats


def loss_and_accuracy(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, jnp.mean(jnp.argmax(logits, axis=-1) == labels)


# --------------------------------------------------------------------------
# Training and evaluation
# --------------------------------------------------------------------------

optimizer = optax.adam(LEARNING_RATE)


@jax.jit
def train_step(
    params: Tree, opt_state: optax.OptState, stats: Tree, x: jax.Array, labels: jax.Array
) -> tuple[Tree, optax.OptState, Tree, jax.Array, jax.Array]:
    """One Adam step: new params, optimizer state and running stats, the batch's loss and accuracy."""

    def objective(params: Tree) -> tuple[jax.Array, tuple[Tree, jax.Array]]:
        logits, new_stats = apply_model(params, stats, x, training=True)
        loss, accuracy = loss_and_accuracy(logits, labels)
        return loss, (new_stats, accuracy)

    (loss, (new_stats, accuracy)), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, new_stats, loss, accuracy


@jax.jit
def evaluate(params: Tree, stats: Tree, x: jax.Array, labels: jax.Array) -> dict[str, jax.Array]:
    """Loss and accuracy with running statistics (``training=False``) and, for contrast, instance statistics."""
    logits, _ = apply_model(params, stats, x, training=False)
    # training=True normalizes with each image's own statistics; the returned stats are dropped.
    logits_instance, _ = apply_model(params, stats, x, training=True)
    return eval_metrics(loss_and_accuracy(logits, labels), loss_and_accuracy(logits_instance, labels))


def eval_metrics(running: tuple[Any, Any], instance: tuple[Any, Any]) -> dict[str, Any]:
    """The report's names for (loss, accuracy) with running statistics and with instance statistics."""
    return {
        "eval_loss": running[0],
        "eval_accuracy": running[1],
        "eval_loss_instance_stats": instance[0],
        "eval_accuracy_instance_stats": instance[1],
    }


def train(steps: int, seed: int = 0) -> tuple[Tree, Tree, np.ndarray, np.ndarray]:
    """Train for ``steps`` steps; returns params, running stats, per-step losses and accuracies."""
    rng = np.random.default_rng(seed)
    params, stats = init_model(rng)
    opt_state = optimizer.init(params)

    def step(x: np.ndarray, labels: np.ndarray) -> tuple[jax.Array, jax.Array]:
        nonlocal params, opt_state, stats
        params, opt_state, stats, loss, accuracy = train_step(params, opt_state, stats, x, labels)
        return loss, accuracy

    losses, accuracies = training_loop(steps, rng, step)
    return params, stats, losses, accuracies


def training_loop(
    steps: int, rng: np.random.Generator, step: Callable[[np.ndarray, np.ndarray], tuple[jax.Array, jax.Array]]
) -> tuple[np.ndarray, np.ndarray]:
    """Feed ``steps`` fresh batches to ``step(x, labels) -> (loss, accuracy)`` under a progress bar.

    Returns the per-step losses and accuracies.
    """
    losses, accuracies = [], []
    progress = tqdm(range(steps), desc="training", unit="step")
    for i in progress:
        x, labels = make_batch(rng, BATCH_SIZE)
        loss, accuracy = step(x, labels)
        losses.append(loss)
        accuracies.append(accuracy)
        if i % 20 == 0 or i == steps - 1:  # reading a value waits for the device: only now and then
            progress.set_postfix(loss=f"{float(loss):.3f}", acc=f"{float(accuracy):.2f}")
    return np.asarray(jax.device_get(losses)), np.asarray(jax.device_get(accuracies))


def plot_loss(
    losses: np.ndarray, metrics: dict[str, float], path: Path,
    title: str = "Stripe textures under random contrast: lucid instance norm",
) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    steps = np.arange(1, len(losses) + 1)
    ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=1, label="train loss (per batch)")
    window = min(20, len(losses))
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    centred = steps[(window - 1) // 2:][: len(smooth)]
    ax.plot(centred, smooth, color="tab:blue", lw=2, label=f"train loss ({window}-step mean)")
    evals = (("eval_loss", "tab:orange", "running"), ("eval_loss_instance_stats", "tab:green", "instance"))
    for key, color, what in evals:
        ax.axhline(metrics[key], color=color, ls="--", lw=1.5, label=f"eval loss, {what} stats ({metrics[key]:.3f})")
    ax.axhline(math.log(len(CLASSES)), color="gray", ls=":", lw=1, label="chance (log 4)")
    ax.set(xlabel="step", ylabel="cross-entropy", title=title)
    ax.set_ylim(bottom=0)
    ax.legend(frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def parse_cli(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The training examples' command line: ``--steps N --out DIR`` (the output folder is created)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the plot (default: .)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def finish(
    losses: np.ndarray, accuracies: np.ndarray, metrics: dict[str, float], plot_path: Path, *, start: float,
    extra: dict[str, Any] | None = None, running: str = "running statistics", **plot_options: Any,
) -> dict[str, Any]:
    """Plot the loss, print a summary and, last, the JSON report (which is returned).

    ``metrics`` holds ``evaluate``'s four numbers, ``extra`` further report entries,
    ``running`` how the eval line names the running statistics.
    """
    metrics = {k: float(v) for k, v in metrics.items()}
    window = max(1, len(losses) // 10)
    report = {
        "steps": len(losses),
        "loss_first": float(losses[:window].mean()),
        "loss_last": float(losses[-window:].mean()),
        "train_accuracy_last": float(accuracies[-window:].mean()),
        **metrics,
        **(extra or {}),
        "seconds": round(time.perf_counter() - start, 2),
    }
    plot_loss(losses, metrics, plot_path, **plot_options)

    print(f"train loss {report['loss_first']:.3f} -> {report['loss_last']:.3f} "
          f"(mean of the first / last {window} steps), train accuracy {report['train_accuracy_last']:.3f}")
    print(f"eval on {EVAL_SIZE} held-out images, {running}: loss {metrics['eval_loss']:.3f}, "
          f"accuracy {metrics['eval_accuracy']:.3f}")
    print(f"the same images, each normalized by its own statistics: loss {metrics['eval_loss_instance_stats']:.3f}, "
          f"accuracy {metrics['eval_accuracy_instance_stats']:.3f}")
    print(f"saved {plot_path}")
    print(json.dumps(report))
    return report


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_cli(__doc__.split("\n\n")[0], argv)
    start = time.perf_counter()
    params, stats, losses, accuracies = train(args.steps)
    x_eval, labels_eval = make_batch(np.random.default_rng(12345), EVAL_SIZE)
    metrics = evaluate(params, stats, x_eval, labels_eval)
    return finish(losses, accuracies, metrics, args.out / "functional_training_loss.png", start=start)


if __name__ == "__main__":
    main()
