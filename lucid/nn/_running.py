"""The running-statistics update (the rule is stated once, in README's semantics table)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax


def update_running_stats(
    stats: dict,
    mean: jax.Array,
    var: jax.Array,
    count: jax.Array,
    momentum,
    axis_name,
    channel_axis: int,
) -> dict:
    """PyTorch's rule, with ``momentum=None`` as the cumulative moving average.

    ``running_mean = (1 - m) running_mean + m * mean_n(mean)`` and
    ``running_var = (1 - m) running_var + m * mean_n(var * M / (M - 1))``, the
    batch averages taken over the whole batch, across ``axis_name`` devices.
    ``M`` is each instance's valid count (clamped so that ``M - 1 >= 1``).
    """
    cdt = mean.dtype
    unbiased = var * count / jnp.maximum(count - 1, 1)
    # Reduce everything but the channel axis: (N, ..., C, ...) -> (C,)
    other = tuple(a for a in range(mean.ndim) if a != channel_axis)
    sum_mean = jnp.sum(mean, axis=other)
    sum_var = jnp.sum(jnp.broadcast_to(unbiased, mean.shape), axis=other)
    n = jnp.asarray(math.prod(mean.shape[a] for a in other), cdt)
    if axis_name is not None:
        sum_mean, sum_var, n = lax.psum((sum_mean, sum_var, n), axis_name)
    tracked = stats.get("num_batches_tracked")
    new = {}
    if tracked is not None:
        # Saturating at the dtype's largest value rather than wrapping to a negative count.
        new["num_batches_tracked"] = tracked + (tracked < jnp.iinfo(tracked.dtype).max).astype(tracked.dtype)
    if momentum is None:
        factor = 1.0 / new["num_batches_tracked"].astype(cdt)
    else:
        factor = jnp.asarray(momentum, cdt)
    rm, rv = stats["running_mean"], stats["running_var"]
    new["running_mean"] = ((1 - factor) * rm.astype(cdt) + factor * (sum_mean / n)).astype(rm.dtype)
    new["running_var"] = ((1 - factor) * rv.astype(cdt) + factor * (sum_var / n)).astype(rv.dtype)
    return {key: new[key] for key in stats}
