"""Fast style transfer in a couple of hundred jit-compiled steps, with instance norm in every layer.

A small image-transformation network (convolutions, instance norm with affine parameters,
residual blocks) learns to repaint scikit-image's photograph of Chelsea the cat in the colours
and texture of a procedurally drawn wave pattern. The style target needs no pretrained
weights: it matches the per-channel means and standard deviations (the statistics instance
norm works with) of fixed random convolution features of the style image, while a content
loss on the same features keeps the cat recognisable. Saves the input, the stylized output,
a side-by-side panel and the loss curves as PNG files.

Run: ``python examples/style_transfer.py [--steps N] [--out DIR]``
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # write files only: no display needed
import matplotlib.pyplot as plt
import numpy as np
import optax
import skimage.data
import skimage.transform
from tqdm import tqdm

import lucid.nn.functional as F

Tree = dict[str, Any]

HEIGHT = 96  # the photo is downscaled to this height, keeping its aspect ratio
WIDTH = 32  # channels of the transformation network's residual trunk
LEARNING_RATE = 1e-2
CONTENT_WEIGHT = 1.0
STYLE_WEIGHT = 10.0
TV_WEIGHT = 1e-2
# Colours of the style image, RGB in [0, 1]: deep blue, teal, cream, gold, rust.
PALETTE = np.array(
    [[0.07, 0.12, 0.32], [0.10, 0.45, 0.55], [0.95, 0.90, 0.75], [0.95, 0.70, 0.15], [0.70, 0.25, 0.10]]
)


# --------------------------------------------------------------------------
# Images: a photograph shipped inside scikit-image and a drawn style
# --------------------------------------------------------------------------


def content_image(height: int = HEIGHT) -> np.ndarray:
    """Chelsea the cat, ``(3, height, width)`` float32 in [0, 1]; read from scikit-image's wheel."""
    photo = skimage.data.chelsea()  # (300, 451, 3) uint8, bundled: no download
    width = round(photo.shape[1] * height / photo.shape[0])
    small = skimage.transform.resize(photo, (height, width), anti_aliasing=True)
    return small.transpose(2, 0, 1).astype(np.float32)


def style_image(size: int = 96, supersample: int = 4) -> np.ndarray:
    """Wavy bands of ``PALETTE`` colours, ``(3, size, size)`` float32 in [0, 1].

    Drawn ``supersample`` times larger and downscaled, so band edges are anti-aliased.
    """
    big = size * supersample
    y, x = np.mgrid[:big, :big] / big
    field = 7 * (x + 0.35 * np.sin(2 * math.pi * 2 * y) + 0.15 * np.sin(2 * math.pi * 5 * (x + y)))
    colours = PALETTE[np.floor(field).astype(int) % len(PALETTE)]
    small = skimage.transform.resize(colours, (size, size), anti_aliasing=True)
    return small.transpose(2, 0, 1).astype(np.float32)


# --------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------


def conv2d(x: jax.Array, w: jax.Array, stride: int = 1) -> jax.Array:
    """``(N, C, H, W)`` x ``(O, C, k, k)`` -> ``(N, O, H/stride, W/stride)``, zero 'SAME' padding.

    Zero rather than reflection padding: on a CPU the reflection's gradient more than
    doubles the compile time of the training step.
    """
    return jax.lax.conv_general_dilated(x, w, (stride, stride), "SAME", dimension_numbers=("NCHW", "OIHW", "NCHW"))


def conv_init(rng: np.random.Generator, c_in: int, c_out: int, k: int) -> jax.Array:
    """He-normal ``(c_out, c_in, k, k)`` weights.

    Drawn with NumPy: ``jax.random`` compiles a generator for every new shape, a second or
    more each on a CPU, and this example has a dozen shapes.
    """
    w = rng.standard_normal((c_out, c_in, k, k)) * math.sqrt(2 / (c_in * k * k))
    return jnp.asarray(w, jnp.float32)


def channel_stats(features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-channel mean and standard deviation over space: ``(N, C)`` each.

    These are the statistics instance norm removes from a feature map and its affine
    parameters set anew: a style network learns its style in them.
    """
    return features.mean(axis=(2, 3)), jnp.sqrt(features.var(axis=(2, 3)) + 1e-5)


def avg_pool2(x: jax.Array) -> jax.Array:
    """Mean over 2x2 blocks: ``(N, C, H, W)`` -> ``(N, C, H // 2, W // 2)``."""
    n, c, h, w = x.shape
    return x[:, :, : h // 2 * 2, : w // 2 * 2].reshape(n, c, h // 2, 2, w // 2, 2).mean(axis=(3, 5))


# --------------------------------------------------------------------------
# The transformation network: conv -> instance norm -> relu, residual blocks
# --------------------------------------------------------------------------

# (name, in channels, out channels, kernel, stride) of every conv followed by an instance norm.
LAYERS = (
    ("enc0", 3, WIDTH // 2, 5, 1),
    ("enc1", WIDTH // 2, WIDTH, 3, 2),
    ("res0a", WIDTH, WIDTH, 3, 1),
    ("res0b", WIDTH, WIDTH, 3, 1),
    ("res1a", WIDTH, WIDTH, 3, 1),
    ("res1b", WIDTH, WIDTH, 3, 1),
    ("dec0", WIDTH, WIDTH // 2, 3, 1),  # still at half resolution: a quarter of the cost
)
STRIDES = {name: stride for name, *_, stride in LAYERS}


def init_network(rng: np.random.Generator) -> Tree:
    """Params: ``{name: {"conv": (O, C, k, k), "norm": {"weight", "bias"}}}`` and an output conv."""
    params: Tree = {}
    for name, c_in, c_out, k, _ in LAYERS:
        # Instance norm without running statistics: a style network always normalizes each image
        # by its own statistics, at training and at inference alike.
        norm, _ = F.instance_norm_init(c_out, affine=True, track_running_stats=False)
        # No conv bias: the instance norm right after it would subtract it back out.
        params[name] = {"conv": conv_init(rng, c_in, c_out, k), "norm": norm}
    params["out"] = {"conv": conv_init(rng, WIDTH // 2, 3, 3) * 0.1, "bias": jnp.zeros((3,))}
    return params


def conv_norm(params: Tree, name: str, x: jax.Array, relu: bool = True) -> jax.Array:
    h = conv2d(x, params[name]["conv"], STRIDES[name])
    h, _ = F.instance_norm_apply(params[name]["norm"], None, h, training=True)
    return jax.nn.relu(h) if relu else h


def stylize(params: Tree, image: jax.Array) -> jax.Array:
    """``(N, 3, H, W)`` in [0, 1] -> stylized ``(N, 3, H, W)`` in [0, 1]."""
    h = conv_norm(params, "enc0", image - 0.5)
    h = conv_norm(params, "enc1", h)  # half resolution
    for block in ("res0", "res1"):
        h = h + conv_norm(params, f"{block}b", conv_norm(params, f"{block}a", h), relu=False)
    h = conv_norm(params, "dec0", h)
    # Bilinear upsampling, then a convolution: neither the checkerboard of a strided transpose
    # nor the 2x2 blocks of nearest-neighbour upsampling.
    h = jax.image.resize(h, h.shape[:2] + image.shape[2:], "bilinear")
    out = conv2d(h, params["out"]["conv"]) + params["out"]["bias"][:, None, None]
    return jax.nn.sigmoid(out)


# --------------------------------------------------------------------------
# The loss: fixed random features stand in for a pretrained classifier
# --------------------------------------------------------------------------


def init_features(rng: np.random.Generator) -> list[jax.Array]:
    """Three fixed random 3x3 conv layers (3 -> 32 -> 32 -> 64 channels), never trained."""
    return [conv_init(rng, 3, 32, 3), conv_init(rng, 32, 32, 3), conv_init(rng, 32, 64, 3)]


def features(filters: list[jax.Array], image: jax.Array) -> list[jax.Array]:
    """The centred pixels, then feature maps at full, half and quarter resolution."""
    h = image - 0.5
    maps = [h]
    for i, w in enumerate(filters):
        h = jax.nn.relu(conv2d(avg_pool2(h) if i else h, w))
        maps.append(h)
    return maps


def style_transfer_loss(
    output: jax.Array, content_maps: list[jax.Array], style_stats: list[tuple[jax.Array, jax.Array]],
    filters: list[jax.Array],
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Content on the half-resolution map; style as the channel statistics of every map; smoothness."""
    maps = features(filters, output)
    content = jnp.mean((maps[2] - content_maps[2]) ** 2)
    style = 0.0
    for m, (mean, std) in zip(maps, style_stats):
        m_mean, m_std = channel_stats(m)
        style += jnp.mean((m_mean - mean) ** 2) + jnp.mean((m_std - std) ** 2)
    tv = jnp.mean(jnp.abs(jnp.diff(output, axis=2))) + jnp.mean(jnp.abs(jnp.diff(output, axis=3)))
    parts = {"content": CONTENT_WEIGHT * content, "style": STYLE_WEIGHT * style, "tv": TV_WEIGHT * tv}
    return sum(parts.values()), parts


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------

optimizer = optax.adam(LEARNING_RATE)


@jax.jit
def train_step(
    params: Tree, opt_state: optax.OptState, image: jax.Array, targets: Tree
) -> tuple[Tree, optax.OptState, jax.Array, dict[str, jax.Array]]:
    """One Adam step of the transformation network toward the style and content targets."""

    def objective(params: Tree) -> tuple[jax.Array, dict[str, jax.Array]]:
        return style_transfer_loss(stylize(params, image), targets["content"], targets["style"], targets["filters"])

    (loss, parts), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, parts


def make_targets(rng: np.random.Generator, content: jax.Array, style: jax.Array) -> Tree:
    """The fixed random filters and what the output should match: content maps, style statistics."""
    filters = init_features(rng)
    content_maps, style_stats = jax.jit(
        lambda c, s: (features(filters, c), [channel_stats(m) for m in features(filters, s)])
    )(content, style)
    return {"filters": filters, "content": content_maps, "style": style_stats}


def train(steps: int, content: np.ndarray, style: np.ndarray, seed: int = 0) -> tuple[Tree, dict[str, np.ndarray]]:
    """Train for ``steps`` steps; returns the params and the per-step losses: total and each weighted part."""
    rng = np.random.default_rng(seed)
    image = jnp.asarray(content)[None]
    targets = make_targets(rng, image, jnp.asarray(style)[None])
    params = init_network(rng)
    opt_state = optimizer.init(params)
    history = []
    progress = tqdm(range(steps), desc="training", unit="step")
    for i in progress:
        params, opt_state, loss, parts = train_step(params, opt_state, image, targets)
        history.append({"total": loss, **parts})
        if i % 10 == 0 or i == steps - 1:  # reading a value waits for the device: only now and then
            progress.set_postfix({k: f"{float(v):.3f}" for k, v in parts.items()})
    history = jax.device_get(history)
    return params, {k: np.array([h[k] for h in history]) for k in history[0]}


# --------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------


def to_hwc(image: np.ndarray | jax.Array) -> np.ndarray:
    return np.clip(np.asarray(image, np.float32).transpose(1, 2, 0), 0.0, 1.0)


def save_side_by_side(content: np.ndarray, style: np.ndarray, output: np.ndarray, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4), dpi=120, gridspec_kw={"width_ratios": [1.5, 1, 1.5]})
    for ax, image, title in zip(axes, (content, style, output), ("content photo", "style", "stylized output")):
        ax.imshow(to_hwc(image), interpolation="lanczos")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_loss(losses: dict[str, np.ndarray], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    steps = np.arange(1, len(losses["total"]) + 1)
    lines = (
        ("total", "total", "black", 2.0),
        ("content", "content", "tab:blue", 1.2),
        ("style", "style (channel statistics)", "tab:orange", 1.2),
        ("tv", "smoothness", "tab:gray", 1.0),
    )
    for key, label, color, width in lines:
        ax.plot(steps, losses[key], color=color, lw=width, label=label)
    ax.set(xlabel="step", ylabel="weighted loss", title="Fast style transfer with lucid instance norm")
    ax.set_yscale("log")
    ax.legend(frameon=False)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps (default: 200)")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the images (default: .)")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    content, style = content_image(), style_image()
    params, losses = train(args.steps, content, style)
    total = losses["total"]
    output = np.asarray(jax.jit(stylize)(params, jnp.asarray(content)[None])[0])

    names = ("input", "style", "output", "side_by_side", "loss")
    paths = {name: args.out / f"style_transfer_{name}.png" for name in names}
    plt.imsave(paths["input"], to_hwc(content))
    plt.imsave(paths["style"], to_hwc(style))
    plt.imsave(paths["output"], to_hwc(output))
    save_side_by_side(content, style, output, paths["side_by_side"])
    plot_loss(losses, paths["loss"])

    report = {
        "steps": args.steps,
        "image_shape": list(content.shape),
        "loss_first": float(total[0]),
        "loss_last": float(total[-1]),
        **{f"{k}_last": float(v[-1]) for k, v in losses.items() if k != "total"},
        "output_min": float(output.min()),
        "output_max": float(output.max()),
        "seconds": round(time.perf_counter() - start, 2),
    }
    print(f"loss {report['loss_first']:.4f} -> {report['loss_last']:.4f} in {args.steps} steps "
          f"on a {content.shape[1]}x{content.shape[2]} photo")
    print("saved " + ", ".join(str(p) for p in paths.values()))
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
