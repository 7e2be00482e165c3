"""Settings checks shared by lucid's layers for other module systems (``lucid.flax``, ``lucid.equinox``).

The layers are thin: the numbers come from :func:`lucid.nn.functional.instance_norm_apply`
and the initial arrays from :func:`lucid.nn.functional.instance_norm_init`. What they add
is checked here once, with the functional API's own checks, so that a bad setting fails
when the layer is built rather than at its first call.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax

from .nn import functional as F


def check_flag(value: Any, name: str) -> bool:
    """``value`` if it is a bool, else a ``TypeError`` naming the setting."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}.")
    return value


def init_layer(
    num_features: int, *, eps: Any, momentum: Any, affine: Any, track_running_stats: Any, dtype: Any
) -> tuple[dict, dict, float, float | None]:
    """Check a layer's settings; return ``(params, stats, eps, momentum)``.

    ``params``/``stats`` are :func:`~lucid.nn.functional.instance_norm_init`'s pytrees
    (either empty when its flag is off); ``momentum`` must be a Python number (a layer
    keeps it as a static setting) or ``None``.
    """
    check_flag(affine, "affine")
    check_flag(track_running_stats, "track_running_stats")
    eps = F._check_eps(eps)
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got {type(momentum).__name__}.")
    momentum = F._check_momentum(momentum)
    params, stats = F.instance_norm_init(
        num_features, affine=affine, track_running_stats=track_running_stats, dtype=dtype
    )
    return params, stats, eps, momentum


def check_channel_count(x: jax.Array, channel_axis: int, num_features: int, hint: str = "") -> None:
    """A ``ValueError`` unless axis ``channel_axis`` of ``x`` has ``num_features`` entries.

    Needed when a layer has neither parameters nor running statistics: then nothing
    else ties the input's channels to ``num_features``.
    """
    if x.shape[channel_axis] != num_features:
        raise ValueError(
            f"expected {num_features} channels on axis {channel_axis} of the input, got shape "
            f"{tuple(x.shape)}.{hint}"
        )
