"""The running-statistics update (the rule is stated once, in README's semantics table)."""

from __future__ import annotations

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
    ``M`` is each instance's valid count: an instance with none (all padding)
    is left out of both averages, one with a single valid element out of the
    variance's; a channel with nothing to average keeps its statistic.
    """
    cdt = mean.dtype
    # An instance with a NaN or an infinity has no mean either (inf - inf): its channel's statistics go NaN.
    mean = jnp.where(jnp.isnan(var), jnp.nan, mean)
    count = jnp.broadcast_to(count, mean.shape)
    has_mean, has_var = count >= 1, count >= 2
    unbiased = var * count / jnp.maximum(count - 1, 1)
    # Reduce everything but the channel axis: (N, ..., C, ...) -> (C,)
    other = tuple(a for a in range(mean.ndim) if a != channel_axis)
    sums = tuple(jnp.sum(v, axis=other) for v in (
        jnp.where(has_mean, mean, 0), jnp.where(has_var, unbiased, 0), has_mean.astype(cdt), has_var.astype(cdt)))
    if axis_name is not None:
        sums = lax.psum(sums, axis_name)
    sum_mean, sum_var, n_mean, n_var = sums
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

    def blend(running, total, n):
        # No instance to average (n == 0): a factor of 0 keeps the statistic exactly.
        fresh = factor * (n > 0).astype(cdt)
        return ((1 - fresh) * running.astype(cdt) + fresh * (total / jnp.maximum(n, 1))).astype(running.dtype)

    new["running_mean"] = blend(rm, sum_mean, n_mean)
    new["running_var"] = blend(rv, sum_var, n_var)
    return {key: new[key] for key in stats}
