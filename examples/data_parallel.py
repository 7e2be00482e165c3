"""Data-parallel training of a small network with instance norm, on every device.

The story: images from many scanners, each with its own gain and offset, and
a classifier that must not care. Instance norm removes each image's own
brightness and contrast. We train on all devices at once (8 CPU devices made
from this host unless XLA_FLAGS already sets a count, or the accelerators
there are), each device holding its share of every batch:

* ``jax.shard_map`` runs the step on every device; the loss is the mean over
  the whole batch (``lax.psum`` of the per-device sums), so the gradients are
  the whole batch's gradients, the same on every device.
* the second instance norm tracks running statistics (like PyTorch's
  ``InstanceNorm2d(track_running_stats=True)``) and gets ``axis_name="data"``:
  they are averaged over the whole batch, across devices, so every device holds
  identical values, the ones training on one device would give.

It checks that one data-parallel step gives the numbers of one device, shows
a progress bar, evaluates on held-out scans with instance statistics and with
the running statistics, saves a plot of the loss as ``data_parallel_loss.png``
in ``--out`` (default: the current directory), and ends with a JSON line of
its numbers.

Run: ``python examples/data_parallel.py [--steps N] [--out DIR]``.
On a cluster, start one process per host with ``--distributed`` (see the README).
"""

from __future__ import annotations

import os

# Eight CPU devices from this host, set before jax is imported; flags the user
# already chose (for example another device count) win.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import lucid.nn.functional as F

SIZE = 16  # images are SIZE x SIZE, one channel
CLASSES = 4  # the quadrant whose stripes run the other way
POOLED = 4  # the head sees a POOLED x POOLED grid of averaged features
PER_DEVICE = 8  # images per device in every batch

Params = dict
Stats = dict


# --------------------------------------------------------------------------
# Data: striped scans from scanners with random gain and offset
# --------------------------------------------------------------------------


def make_images(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` noisy scans of shape ``(n, 1, SIZE, SIZE)`` and their labels: horizontal
    stripes everywhere but in one quadrant, where they run vertically; the label
    is that quadrant.

    Every scan gets its own gain (0.2 to 5) and offset (-20 to 20): the raw
    intensities say nothing about the label.
    """
    labels = rng.integers(0, CLASSES, n)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    half = SIZE // 2
    odd = (rows[None] // half == (labels // 2)[:, None, None]) & (cols[None] // half == (labels % 2)[:, None, None])
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    images = np.sin(np.where(odd, cols[None], rows[None]) * (np.pi / 2) + phase)
    images = images + 0.3 * rng.normal(size=(n, SIZE, SIZE))
    gain = np.exp(rng.uniform(np.log(0.2), np.log(5.0), n))[:, None, None]
    offset = rng.uniform(-20, 20, n)[:, None, None]
    return (gain * images + offset)[:, None].astype(np.float32), labels.astype(np.int32)


# --------------------------------------------------------------------------
# The network: conv -> instance norm -> relu, twice, then average and classify
# --------------------------------------------------------------------------


def init_model(rng: np.random.Generator) -> tuple[Params, Stats]:
    """Parameters and running statistics as plain dicts (optax and checkpoints take them as they are)."""

    def he(shape: tuple[int, ...]) -> np.ndarray:
        fan_in = int(np.prod(shape[1:]))
        return (rng.normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    norm1, _ = F.instance_norm_init(8, track_running_stats=False)  # always instance statistics
    norm2, stats2 = F.instance_norm_init(16)  # also tracks running statistics
    params = {
        "conv1": he((8, 1, 3, 3)), "norm1": norm1,
        "conv2": he((16, 8, 3, 3)), "norm2": norm2,
        "head": {"w": he((CLASSES, 16 * POOLED**2)).T.copy(), "b": np.zeros(CLASSES, np.float32)},
    }
    return params, {"norm2": stats2}


def _conv(x: jax.Array, w: jax.Array, stride: int) -> jax.Array:
    return lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def forward(params: Params, stats: Stats, x: jax.Array, *, training: bool,
            axis_name: str | None = None) -> tuple[jax.Array, Stats]:
    """Logits of shape ``(N, CLASSES)`` and the new running statistics.

    ``axis_name`` names the mapped axis that splits the batch (inside
    ``shard_map``): the running statistics are averaged across it.
    """
    h = _conv(x, params["conv1"], 1)
    h, _ = F.instance_norm_apply(params["norm1"], None, h, training=training)
    h = jax.nn.relu(h)
    h = _conv(h, params["conv2"], 2)
    h, stats2 = F.instance_norm_apply(params["norm2"], stats["norm2"], h, training=training, axis_name=axis_name)
    h = jax.nn.relu(h)
    window = (1, 1, h.shape[2] // POOLED, h.shape[3] // POOLED)
    h = lax.reduce_window(h, 0.0, lax.add, window, window, "VALID") / (window[2] * window[3])
    h = h.reshape(h.shape[0], -1)
    return h @ params["head"]["w"] + params["head"]["b"], {"norm2": stats2}


def loss_and_stats(params: Params, stats: Stats, x: jax.Array, labels: jax.Array,
                   axis_name: str | None = None) -> tuple[jax.Array, Stats]:
    """Mean cross-entropy over the whole batch, on one device or across ``axis_name``."""
    logits, new_stats = forward(params, stats, x, training=True, axis_name=axis_name)
    total = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    count = labels.shape[0]
    if axis_name is not None:
        # Sums over devices: the loss, and so the gradient, of the whole batch.
        total, count = lax.psum(total, axis_name), count * lax.axis_size(axis_name)
    return total / count, new_stats


# --------------------------------------------------------------------------
# Training, one program for all devices
# --------------------------------------------------------------------------


def make_train_step(mesh: jax.sharding.Mesh, optimizer: optax.GradientTransformation) -> Callable:
    """A jitted step: every device runs ``device_step`` on its share of the batch.

    The parameters, optimizer state and running statistics are replicated
    (``P()``); with ``shard_map``'s default ``check_vma=True``, JAX proves when
    tracing that the gradients and running statistics are the same on every
    device, else the ``P()`` output specs would be an error.
    """

    def device_step(params, stats, x, labels):
        (loss, new_stats), grads = jax.value_and_grad(loss_and_stats, has_aux=True)(
            params, stats, x, labels, axis_name="data")
        return loss, grads, new_stats

    step_on_devices = jax.shard_map(device_step, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")),
                                    out_specs=(P(), P(), P()))

    @jax.jit
    def train_step(params, opt_state, stats, x, labels):
        loss, grads, stats = step_on_devices(params, stats, x, labels)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, stats, loss, grads

    return train_step


@jax.jit
def accuracies(params: Params, stats: Stats, x: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Evaluation; ``jax.jit`` alone splits it over the devices of the sharded batch.

    Returns the accuracy with instance statistics in every layer, as in
    training, and with the running statistics in the second layer (PyTorch's
    evaluation mode with ``track_running_stats=True``).
    """

    def accuracy(stats: Stats) -> jax.Array:
        logits, _ = forward(params, stats, x, training=False)
        return jnp.mean(jnp.argmax(logits, axis=-1) == labels)

    return accuracy({"norm2": {}}), accuracy(stats)


def global_batch(sharding: NamedSharding, rng: np.random.Generator, n_global: int) -> tuple[jax.Array, jax.Array]:
    """This process makes its own share of the batch; together they form one global array.

    On one host the share is the whole batch; on a cluster each host makes (or
    loads) only the images of its own devices.
    """
    images, labels = make_images(rng, n_global // jax.process_count())
    return (jax.make_array_from_process_local_data(sharding, images),
            jax.make_array_from_process_local_data(sharding, labels))


def check_against_one_device(train_step: Callable, params: Params, opt_state: optax.OptState, stats: Stats,
                             x: jax.Array, labels: jax.Array) -> float:
    """Largest difference between one data-parallel step and the same step on one device."""
    _, _, dp_stats, dp_loss, dp_grads = train_step(params, opt_state, stats, x, labels)
    on_one = jax.device_put(jax.tree.map(np.asarray, (params, stats, x, labels)), jax.devices()[0])
    (loss, one_stats), grads = jax.jit(jax.value_and_grad(loss_and_stats, has_aux=True))(*on_one)
    pairs = [(dp_loss, loss)] + list(zip(jax.tree.leaves((dp_grads, dp_stats)), jax.tree.leaves((grads, one_stats))))
    return max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)))) for a, b in pairs)


def in_sync(tree: Stats) -> bool:
    """Whether every device holds bit-identical copies of every array of ``tree``."""
    for leaf in jax.tree.leaves(tree):
        shards = [np.asarray(s.data) for s in leaf.addressable_shards]
        if not all(np.array_equal(shards[0], s) for s in shards[1:]):
            return False
    return True


def save_plot(losses: list[float], path: Path) -> None:
    """The loss of every step, on a log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(np.arange(1, len(losses) + 1), losses, lw=1.2)
    ax.set(xlabel="step", ylabel="cross-entropy (whole batch)", yscale="log",
           title=f"Data-parallel training on {jax.device_count()} devices")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the loss plot (default: .)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run: jax.distributed.initialize() before anything else")
    parser.add_argument("--coordinator", help="with --distributed: HOST:PORT of process 0 "
                        "(default: detected from Slurm, Open MPI, Kubernetes or Cloud TPU)")
    parser.add_argument("--num-processes", type=int, help="with --distributed: how many processes (default: detected)")
    parser.add_argument("--process-id", type=int, help="with --distributed: this process, 0 to N-1 (default: detected)")
    args = parser.parse_args()
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    if args.distributed:
        # Whatever is not given is read from the cluster's environment.
        jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)

    args.out.mkdir(parents=True, exist_ok=True)
    n_devices = jax.device_count()
    mesh = jax.make_mesh((n_devices,), ("data",))
    split = NamedSharding(mesh, P("data"))
    n_global = PER_DEVICE * n_devices
    lead = jax.process_index() == 0
    if lead:
        print(f"{n_devices} devices ({jax.devices()[0].platform}, {jax.process_count()} process(es)), "
              f"batch of {n_global}: {PER_DEVICE} images per device")

    rng = np.random.default_rng(1000 + jax.process_index())
    params, stats = init_model(np.random.default_rng(0))  # the same on every process
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, args.steps))
    # Replicated on every device, as the step returns them: one compilation serves every step.
    params, opt_state, stats = jax.device_put((params, optimizer.init(params), stats), NamedSharding(mesh, P()))
    train_step = make_train_step(mesh, optimizer)

    x, labels = global_batch(split, rng, n_global)
    gap = None
    if jax.process_count() == 1:
        gap = check_against_one_device(train_step, params, opt_state, stats, x, labels)
        print(f"one data-parallel step vs the same step on one device: max |difference| = {gap:.2e}")

    losses = []
    progress = tqdm(range(args.steps), desc="training", unit="step", disable=not lead)
    for _ in progress:
        params, opt_state, stats, loss, _ = train_step(params, opt_state, stats, x, labels)
        losses.append(float(loss))
        progress.set_postfix(loss=f"{losses[-1]:.4f}")
        x, labels = global_batch(split, rng, n_global)

    test_x, test_labels = global_batch(split, rng, 32 * n_devices)
    acc_instance, acc_running = map(float, accuracies(params, stats, test_x, test_labels))
    if lead:
        synced = in_sync(stats)
        print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
        print(f"running statistics identical on all {len(jax.local_devices())} local devices: {synced}")
        print(f"held-out accuracy (chance: {1 / CLASSES:.2f}): {acc_instance:.3f} with instance statistics, "
              f"{acc_running:.3f} with the running statistics")
        plot = args.out / "data_parallel_loss.png"
        save_plot(losses, plot)
        print(f"saved {plot.resolve()}")
        print(json.dumps({
            "devices": n_devices, "processes": jax.process_count(), "batch": n_global, "steps": args.steps,
            "one_device_gap": gap, "stats_in_sync": synced, "losses": losses,
            "accuracy_instance_stats": acc_instance, "accuracy_running_stats": acc_running, "plot": str(plot),
        }))


if __name__ == "__main__":
    main()
