"""The validators of lucid's inputs, shared by the functional API and the modules.

Every check runs on Python values, shapes and dtypes only, so under
``jax.jit`` it raises at trace time, before anything is computed or stored.
Each message says what was expected, what came, and (where there is one) the
way out.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Hashable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import as_array, is_traced

PARAM_KEYS = ("weight", "bias")
STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


def check_keys(given: Any, known: tuple[str, ...] | Mapping, what: str, *, required: Any = (),
               strict: bool = True, hint: str = "") -> tuple[list[str], list[str]]:
    """``given``'s keys against ``known``: ``(missing, unexpected)``.

    ``missing`` lists the ``required`` keys absent from ``given``,
    ``unexpected`` the keys of ``given`` not in ``known``. Under ``strict``
    either raises ``ValueError``; a non-mapping ``given`` always raises
    ``TypeError``.
    """
    if not isinstance(given, Mapping):
        raise TypeError(f"{what} must be a mapping from names to arrays, got {type(given).__name__}.")
    missing = [k for k in required if k not in given]
    unexpected = [k for k in given if k not in known]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{what} does not match: missing keys {missing}, unexpected keys {unexpected} "
            f"(expected keys {list(known)}){hint}."
        )
    return missing, unexpected


def check_bool(value: Any, what: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        hint = " (under jax.jit, mark it static: static_argnames=...)" if isinstance(value, jax.Array) else ""
        raise TypeError(f"{what} must be a Python bool, got {type(value).__name__}{hint}.")
    return bool(value)


def check_num_features(num_features: Any) -> int:
    if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}.")
    return int(num_features)


def check_float_dtype(dtype: Any, what: str = "dtype") -> jnp.dtype:
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"{what} must be a floating-point dtype, got {jnp.dtype(dtype)}.")
    return jnp.dtype(dtype)


def _array(value: Any, what: str) -> jax.Array:
    array = as_array(value, what)
    # A jax.Array (a tracer included) passes through as the same object: under
    # jax.vjp, a new tracer here would make reverse mode save a copy of x.
    return array if isinstance(array, jax.Array) else jnp.asarray(array)


def _check_float(value: jax.Array, what: str) -> None:
    if not jnp.issubdtype(value.dtype, jnp.floating):
        raise TypeError(
            f"{what} must have a floating-point dtype, got {value.dtype}; "
            f"convert it first, e.g. with .astype(jnp.float32)."
        )


def check_input(x: Any) -> jax.Array:
    """An ``(N, C, *spatial)`` floating-point array."""
    x = _array(x, "input")
    _check_float(x, "input")
    if x.ndim < 3:
        raise ValueError(
            f"instance norm expects input of shape (N, C, *spatial) with at least one "
            f"spatial axis (3 or more dims), got shape {tuple(x.shape)} ({x.ndim}D). "
            f"For a single unbatched sample add a batch axis: x[None]."
        )
    return x


def check_channel_axis(channel_axis: Any, ndim: int) -> int:
    """The channel axis as a non-negative int, never the batch axis 0."""
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, numbers.Integral):
        raise TypeError(f"channel_axis must be an int, got {channel_axis!r}.")
    if not -ndim <= channel_axis < ndim:
        raise ValueError(f"channel_axis={channel_axis} is out of range for a {ndim}D input.")
    axis = int(channel_axis) % ndim
    if axis == 0:
        raise ValueError("channel_axis cannot be 0: axis 0 is the batch axis.")
    return axis


def _check_channel_vector(value: Any, what: str, num_channels: int) -> jax.Array:
    value = _array(value, what)
    _check_float(value, what)
    if tuple(value.shape) != (num_channels,):
        raise ValueError(
            f"{what} must have shape ({num_channels},), one value per channel of the "
            f"input, got shape {tuple(value.shape)}."
        )
    return value


def check_params(params: Any, num_channels: int) -> dict[str, jax.Array]:
    """``{"weight", "bias"}``, either optional, each of shape ``(C,)``."""
    if params is None:
        return {}
    check_keys(params, PARAM_KEYS, "params")
    return {k: _check_channel_vector(v, f"params[{k!r}]", num_channels) for k, v in params.items()}


def check_stats(stats: Any, num_channels: int) -> dict[str, jax.Array]:
    """Both running statistics of shape ``(C,)`` (and an optional integer batch count), or none."""
    if stats is None:
        return {}
    check_keys(stats, STAT_KEYS, "stats", required=("running_mean", "running_var") if stats else ())
    if not stats:
        return {}
    out = {k: _check_channel_vector(stats[k], f"stats[{k!r}]", num_channels) for k in ("running_mean", "running_var")}
    if "num_batches_tracked" in stats:
        tracked = _array(stats["num_batches_tracked"], "stats['num_batches_tracked']")
        if tracked.shape != () or not jnp.issubdtype(tracked.dtype, jnp.integer):
            raise ValueError(
                f"stats['num_batches_tracked'] must be an integer scalar, got dtype "
                f"{tracked.dtype} and shape {tuple(tracked.shape)}."
            )
        out["num_batches_tracked"] = tracked
    return out


def check_momentum(momentum: Any) -> Any:
    """``None``, a float in [0, 1], or a (traced) float scalar."""
    if momentum is None:
        return None
    if isinstance(momentum, bool):
        raise TypeError("momentum must be a number in [0, 1] or None, got a bool.")
    if isinstance(momentum, numbers.Real):
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum}.")
        return float(momentum)
    momentum = _array(momentum, "momentum")
    if momentum.shape != () or not jnp.issubdtype(momentum.dtype, jnp.floating):
        raise TypeError(f"momentum must be a float scalar, got dtype {momentum.dtype} and shape {momentum.shape}.")
    if not is_traced(momentum):  # a concrete JAX or NumPy scalar is checked like a number
        check_momentum(float(momentum))
    return momentum


def check_eps(eps: Any) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a Python number, got {type(eps).__name__}.")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps}.")
    return float(eps)


def check_mask(mask: Any, shape: tuple[int, ...]) -> jax.Array | None:
    """``None``, or a boolean array that broadcasts to ``shape``."""
    if mask is None:
        return None
    mask = _array(mask, "mask")
    if mask.dtype != jnp.bool_:
        raise TypeError(f"mask must be a boolean array (True = valid), got dtype {mask.dtype}.")
    try:
        broadcast = np.broadcast_shapes(tuple(mask.shape), shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the input shape {tuple(shape)}.")
    return mask


def axis_size(axis_name: Hashable | tuple | None) -> int:
    """The number of devices along mapped axis name(s) (1 for ``None``)."""
    if axis_name is None:
        return 1
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return math.prod(jax.lax.axis_size(n) for n in names)


def check_axis_name(axis_name: Any, what: str) -> None:
    """A named axis must be bound by an enclosing ``shard_map``/``pmap``."""
    try:
        axis_size(axis_name)
    except NameError as e:
        raise ValueError(
            f"{what}={axis_name!r} is not a mapped axis here. Pass the name(s) of mesh axes only "
            f"inside jax.shard_map (or jax.pmap) over those axes; under plain jax.jit with sharded "
            f"inputs, leave {what}=None: the compiler reduces across devices by itself."
        ) from e


def check_spatial_size(shape: tuple[int, ...], spatial_axes: tuple[int, ...], spatial_axis_name) -> None:
    """More than one spatial element per instance, or none (an empty input gives an empty output)."""
    size = math.prod(shape[a] for a in spatial_axes) * axis_size(spatial_axis_name)
    if size == 1:
        raise ValueError(
            f"Expected more than 1 spatial element when using instance statistics "
            f"(training, or no running statistics), got input shape {tuple(shape)}. "
            f"The variance of a single element is undefined."
        )


def check_layer_settings(num_features: Any, *, eps: Any, momentum: Any, affine: Any,
                         track_running_stats: Any) -> tuple[int, float, float | None, bool, bool]:
    """A layer's settings (``InstanceNorm*d``, ``lucid.flax``, ``lucid.equinox``), checked when it is
    built: ``(num_features, eps, momentum, affine, track_running_stats)``. A layer keeps ``momentum``
    as a static setting, so it must be a Python number or ``None``."""
    if momentum is not None and (isinstance(momentum, bool) or not isinstance(momentum, numbers.Real)):
        raise TypeError(f"momentum must be a number in [0, 1] or None, got {type(momentum).__name__}.")
    return (check_num_features(num_features), check_eps(eps), check_momentum(momentum),
            check_bool(affine, "affine"), check_bool(track_running_stats, "track_running_stats"))


def check_channel_count(x: jax.Array, channel_axis: int, num_features: int, hint: str = "") -> None:
    """A ``ValueError`` unless axis ``channel_axis`` of ``x`` has ``num_features`` entries."""
    if x.shape[channel_axis] != num_features:
        raise ValueError(
            f"expected {num_features} channels on axis {channel_axis} of the input, got shape "
            f"{tuple(x.shape)}.{hint}"
        )
