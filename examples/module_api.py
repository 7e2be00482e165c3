"""The stateful API, as someone porting a PyTorch model would use it.

An ``nn.InstanceNorm2d`` learns, with ``lucid.Tensor``, ``.backward()`` and PyTorch's hand-written
SGD step (``p -= lr * p.grad`` under ``no_grad``), to map images of random brightness and contrast
onto a target per-channel scale and shift; its running statistics follow along in training mode
and are used in eval mode. The state dict is saved with ``lucid.save`` (an ``.npz`` file, no
pickle), loaded into a fresh module, and, when PyTorch is installed, handed to
``torch.nn.InstanceNorm2d`` to show both give the same outputs.
Saves ``module_api_training.png``: the loss and the learned weight/bias per step.

Run: ``python examples/module_api.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # write files only: no display needed
import matplotlib.pyplot as plt
import numpy as np
from tqdm import tqdm

import lucid
import lucid.nn as nn

CHANNELS = 3
TARGET_WEIGHT = np.array([2.0, 0.5, -1.0], np.float32)
TARGET_BIAS = np.array([1.0, -2.0, 0.25], np.float32)


def make_batch(rng: np.random.Generator, n: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Images of random brightness/contrast and the target: each image normalized, then
    scaled and shifted per channel by ``TARGET_WEIGHT``/``TARGET_BIAS``."""
    base = rng.normal(size=(n, CHANNELS, 12, 12)).astype(np.float32)
    gain = rng.uniform(0.5, 5.0, size=(n, CHANNELS, 1, 1)).astype(np.float32)
    offset = rng.uniform(-3.0, 3.0, size=(n, CHANNELS, 1, 1)).astype(np.float32)
    x = base * gain + offset
    mean = x.mean(axis=(2, 3), keepdims=True)
    std = np.sqrt(x.var(axis=(2, 3), keepdims=True) + 1e-5)
    target = (x - mean) / std * TARGET_WEIGHT[:, None, None] + TARGET_BIAS[:, None, None]
    return x, target.astype(np.float32)


def train(norm: nn.InstanceNorm2d, steps: int, lr: float, seed: int = 0) -> dict[str, list]:
    """Plain SGD on the module's parameters with the Tensor tape."""
    rng = np.random.default_rng(seed)
    history: dict[str, list] = {"loss": [], "weight": [], "bias": []}
    norm.train()
    for _ in tqdm(range(steps), desc="training InstanceNorm2d", unit="step"):
        x, target = make_batch(rng)
        loss = ((norm(lucid.Tensor(x)) - lucid.Tensor(target)) ** 2).mean()
        norm.zero_grad()
        loss.backward()
        with lucid.no_grad():  # PyTorch's SGD step, in place
            for p in norm.parameters():
                p -= lr * p.grad
        history["loss"].append(loss.item())
        history["weight"].append(norm.weight.numpy().copy())
        history["bias"].append(norm.bias.numpy().copy())
    return history


def torch_outputs(state: dict, x: np.ndarray) -> dict[str, np.ndarray] | None:
    """PyTorch's InstanceNorm2d with the same state dict, in train and eval, if torch is there."""
    try:
        import torch
    except ImportError:
        return None
    module = torch.nn.InstanceNorm2d(CHANNELS, affine=True, track_running_stats=True)
    module.load_state_dict({k: torch.tensor(np.asarray(v)) for k, v in state.items()})
    with torch.no_grad():
        out = {"eval": module.eval()(torch.tensor(x)).numpy()}
        out["train"] = module.train()(torch.tensor(x)).numpy()
    return out


def plot(history: dict[str, list], path: Path) -> None:
    fig, (ax_loss, ax_params) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_loss.semilogy(history["loss"])
    ax_loss.set(title="loss (mean squared error)", xlabel="step")
    weights, biases = np.array(history["weight"]), np.array(history["bias"])
    for c in range(CHANNELS):
        line, = ax_params.plot(weights[:, c], label=f"weight[{c}]")
        ax_params.axhline(TARGET_WEIGHT[c], color=line.get_color(), ls=":", lw=0.8)
        line, = ax_params.plot(biases[:, c], ls="--", label=f"bias[{c}]")
        ax_params.axhline(TARGET_BIAS[c], color=line.get_color(), ls=":", lw=0.8)
    ax_params.set(title="learned parameters (dotted: target)", xlabel="step")
    ax_params.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    norm = nn.InstanceNorm2d(CHANNELS)
    print(norm)
    history = train(norm, args.steps, lr=0.5)
    print(f"loss {history['loss'][0]:.4f} -> {history['loss'][-1]:.4f}")
    print("weight", np.round(norm.weight.numpy(), 3), "target", TARGET_WEIGHT)
    print("bias  ", np.round(norm.bias.numpy(), 3), "target", TARGET_BIAS)
    print("running_mean", np.round(norm.running_mean.numpy(), 3),
          "after", int(norm.num_batches_tracked.numpy()), "batches")

    path = args.out / "module_api_state.npz"
    lucid.save(norm.state_dict(), path)
    fresh = nn.InstanceNorm2d(CHANNELS)
    fresh.load_state_dict(lucid.load(path))
    x, _ = make_batch(np.random.default_rng(1), n=4)
    y_eval = fresh.eval()(lucid.Tensor(x)).numpy()
    same = bool(np.array_equal(y_eval, norm.eval()(lucid.Tensor(x)).numpy()))
    print(f"saved {path.name} and loaded it into a fresh module: identical eval output: {same}")

    report = {"first_loss": history["loss"][0], "last_loss": history["loss"][-1], "reload_identical": same}
    theirs = torch_outputs(lucid.load(path), x)
    if theirs is not None:
        y_train = fresh.train()(lucid.Tensor(x)).numpy()
        report["torch_max_abs_diff"] = float(max(np.abs(y_eval - theirs["eval"]).max(),
                                                 np.abs(y_train - theirs["train"]).max()))
        print(f"PyTorch InstanceNorm2d with the same state dict: max |difference| "
              f"{report['torch_max_abs_diff']:.2e} (train and eval)")

    plot(history, args.out / "module_api_training.png")
    print(f"wrote {args.out / 'module_api_training.png'}")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
