"""The benchmark cases and lucid's functions under test, shared by ``run.py`` and ``hlo.py``.

A case is a logical ``(N, C, *spatial)`` shape, a dtype and a layout. Every
implementation gets the same values: inputs are drawn once in float32 and
rounded to the case's dtype, so a bfloat16 case feeds bit-identical numbers to
lucid, PyTorch and Flax.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import lucid.nn.functional as F

#: An input at least this large no longer fits the per-core caches: the time is
#: memory traffic, and the ``x copy`` targets apply.
LARGE_BYTES = 16 * 2**20


@dataclass(frozen=True)
class Case:
    """One benchmark problem.

    Attributes:
        shape: the logical ``(N, C, *spatial)`` shape.
        dtype: the input's dtype name (``"float32"`` or ``"bfloat16"``);
            weight, bias and statistics stay float32.
        channels_last: store the input as ``(N, *spatial, C)`` and normalize it
            with ``channel_axis=-1``.
    """

    shape: tuple[int, ...]
    dtype: str = "float32"
    channels_last: bool = False

    @property
    def array_shape(self) -> tuple[int, ...]:
        """The shape of the array lucid receives."""
        n, c, *spatial = self.shape
        return (n, *spatial, c) if self.channels_last else self.shape

    @property
    def channel_axis(self) -> int:
        return -1 if self.channels_last else 1

    @property
    def num_channels(self) -> int:
        return self.shape[1]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * jnp.dtype(self.dtype).itemsize

    @property
    def large(self) -> bool:
        return self.nbytes >= LARGE_BYTES

    @property
    def label(self) -> str:
        """A short name such as ``8x64x128x128 bf16`` or ``8x64x128x128 NHWC``."""
        tags = [{"float32": "", "bfloat16": "bf16"}.get(self.dtype, self.dtype)]
        if self.channels_last:
            tags.append("NHWC" if len(self.shape) == 4 else "channels-last")
        return " ".join(["x".join(map(str, self.shape)), *filter(None, tags)])


FULL_CASES: tuple[Case, ...] = (
    Case((8, 64, 128, 128)),
    Case((32, 256, 32, 32)),
    Case((64, 512, 8, 8)),
    Case((2, 16, 48, 64, 64)),
    Case((16, 80, 4000)),
    Case((8, 64, 128, 128), dtype="bfloat16"),
    Case((8, 64, 128, 128), channels_last=True),
)

#: Tiny cases that between them take every path (1D, 2D, 3D, bfloat16,
#: channels-last): the smoke run checks the whole pipeline in seconds.
QUICK_CASES: tuple[Case, ...] = (
    Case((2, 8, 64)),
    Case((2, 4, 4, 8, 8), dtype="bfloat16"),
    Case((2, 8, 16, 16), channels_last=True),
)


class Inputs(NamedTuple):
    """One case's data as float32 NumPy arrays, in the logical ``(N, C, *spatial)`` layout.

    ``x`` and the cotangent ``g`` are already rounded to the case's dtype.
    """

    x: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    g: np.ndarray


def make_inputs(case: Case, seed: int = 0) -> Inputs:
    """Random input, affine parameters and output cotangent for ``case``."""
    rng = np.random.default_rng(seed)

    def rounded(a: np.ndarray) -> np.ndarray:
        return np.array(jnp.asarray(a, case.dtype).astype(jnp.float32))  # a writable copy

    x = rounded((rng.standard_normal(case.shape, np.float32) * 2 + 0.5).astype(np.float32))
    g = rounded(rng.standard_normal(case.shape, np.float32))
    weight = (1 + 0.5 * rng.standard_normal(case.num_channels)).astype(np.float32)
    bias = rng.standard_normal(case.num_channels).astype(np.float32)
    return Inputs(x, weight, bias, g)


def to_layout(case: Case, a: np.ndarray) -> np.ndarray:
    """A logical ``(N, C, *spatial)`` array in the layout lucid receives for ``case``."""
    return np.ascontiguousarray(np.moveaxis(a, 1, -1)) if case.channels_last else a


def lucid_arrays(case: Case, inputs: Inputs) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """``(x, weight, bias, g)`` as device arrays in lucid's layout; ``x`` and ``g`` in the case dtype."""
    x, g = (jnp.asarray(to_layout(case, a), case.dtype) for a in (inputs.x, inputs.g))
    return x, jnp.asarray(inputs.weight), jnp.asarray(inputs.bias), g


def lucid_forward(case: Case) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
    """lucid's forward ``(x, weight, bias) -> y`` for ``case``, not yet jitted.

    The reference signature ``F.instance_norm`` for channels-first input; the
    pure ``instance_norm_apply`` with ``channel_axis=-1`` for channels-last.
    """
    if not case.channels_last:
        return lambda x, w, b: F.instance_norm(x, weight=w, bias=b)

    def forward(x: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
        y, _ = F.instance_norm_apply({"weight": w, "bias": b}, {}, x, channel_axis=-1)
        return y

    return forward


def lucid_forward_backward(case: Case) -> Callable[..., tuple[jax.Array, Any]]:
    """``(x, weight, bias, g) -> (y, (dx, dweight, dbias))``, not yet jitted.

    The output and the pullback of the fixed cotangent ``g`` to every input:
    what a training step needs from the layer, and what PyTorch's
    ``y = instance_norm(...); y.backward(g)`` computes.
    """
    forward = lucid_forward(case)

    def forward_backward(x: jax.Array, w: jax.Array, b: jax.Array, g: jax.Array) -> tuple[jax.Array, Any]:
        y, pullback = jax.vjp(forward, x, w, b)
        return y, pullback(g)

    return forward_backward
