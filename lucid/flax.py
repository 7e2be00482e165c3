"""lucid's instance norm as a Flax NNX module: :class:`InstanceNorm`.

Install with ``pip install "lucid-jax[flax]"``. Importing :mod:`lucid` does not import
Flax; importing this module does.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

try:
    from flax import nnx
except ImportError as e:  # the optional dependency is missing
    raise ImportError(
        'lucid.flax needs Flax (NNX); install it with: pip install "lucid-jax[flax]"'
    ) from e

from .nn import _checks
from .nn import functional as F

__all__ = ["InstanceNorm"]

_STAT_KEYS = ("running_mean", "running_var", "num_batches_tracked")


class InstanceNorm(nnx.Module):
    r"""Instance normalization with running statistics, as an ``nnx.Module``.

    Every ``(sample, channel)`` of an ``(N, ..., C)`` input (any ``channel_axis``) is
    normalized by its own mean and biased variance over the other axes, then scaled by
    ``weight`` and shifted by ``bias``. In training the running statistics are updated;
    with ``use_running_average`` they replace the instance statistics. The numbers are
    those of :func:`lucid.nn.functional.instance_norm_apply` with the same arguments
    (this module holds state and calls it): accuracy far from zero, masks,
    channels-last input without a transpose, the native CPU kernel.

    State follows ``nnx.BatchNorm``: ``weight`` and ``bias`` are ``nnx.Param``;
    ``running_mean``, ``running_var`` and ``num_batches_tracked`` are ``nnx.BatchStat``,
    so ``nnx.state(model, nnx.BatchStat)``, ``nnx.jit``, ``nnx.grad`` and
    ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` treat them as they treat BatchNorm's.
    ``model.eval()`` / ``model.train()`` (and ``nnx.view(model, use_running_average=...)``)
    set ``use_running_average``. The stored statistics carry no gradient.

    **Momentum is lucid's (PyTorch's) convention**, the weight of the new batch:
    ``r = (1 - momentum) * r + momentum * batch``, default ``0.1``. Flax's
    ``nnx.BatchNorm(momentum=0.99)`` is the weight of the old value,
    ``r = momentum * r + (1 - momentum) * batch``: Flax's ``m`` is lucid's ``1 - m``.
    ``momentum=None`` is the cumulative average (``1 / num_batches_tracked``). The
    batch value of the variance is the mean of the *unbiased* instance variances.

    Args:
        num_features: the number of channels ``C``.
        channel_axis: the channel axis of the input; ``-1`` (features last, Flax's
            convention) by default, ``1`` for ``(N, C, *spatial)``. Not 0 (the batch).
        eps: added to the variance for numerical stability.
        momentum: weight of the new batch in the running statistics, in [0, 1], or
            ``None`` for the cumulative average.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics; without them, evaluation uses
            instance statistics too.
        use_running_average: normalize with the running statistics (and leave them
            unchanged) instead of the instance statistics.
        axis_name: name(s) of mapped axes (``shard_map``, ``pmap``) that
            split the batch: the running statistics average over the whole batch. Used
            in training only (evaluation updates nothing), as in ``nnx.BatchNorm``.
        dtype: dtype of the parameters and running statistics (default float32). The
            output has the input's dtype; statistics are computed in at least float32.
        rngs: accepted for the signature of Flax's layers and unused: the
            initialization is deterministic.

    Raises:
        TypeError, ValueError: a bad setting (as ``instance_norm_apply`` checks it);
            at call time, a bad input or an input whose channel axis does not have
            ``num_features`` entries. A failed call changes no state.

    Example:
        >>> import jax.numpy as jnp
        >>> from flax import nnx
        >>> import lucid.flax
        >>> norm = lucid.flax.InstanceNorm(3)                  # channels last
        >>> x = jnp.arange(2 * 4 * 4 * 3, dtype=jnp.float32).reshape(2, 4, 4, 3)
        >>> y = norm(x)                                         # training: updates the running stats
        >>> int(norm.num_batches_tracked[...]), y.shape
        (1, (2, 4, 4, 3))
        >>> norm.eval()                                         # use_running_average=True
        >>> y = norm(x)
        >>> sorted(nnx.state(norm, nnx.BatchStat))
        ['num_batches_tracked', 'running_mean', 'running_var']
    """

    def __init__(
        self,
        num_features: int,
        *,
        channel_axis: int = -1,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        use_running_average: bool = False,
        axis_name: Hashable | tuple | None = None,
        dtype: Any = None,
        rngs: nnx.Rngs | None = None,
    ) -> None:
        del rngs  # ones and zeros need no randomness
        if isinstance(channel_axis, bool) or not isinstance(channel_axis, int):
            raise TypeError(f"channel_axis must be an int, got {channel_axis!r}.")
        num_features, eps, momentum, affine, track_running_stats = _checks.check_layer_settings(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
        params, stats = F.instance_norm_init(
            num_features, affine=affine, track_running_stats=track_running_stats,
            dtype=jnp.float32 if dtype is None else dtype,
        )
        # nnx.data(None) keeps an absent variable a data attribute, as nnx's own layers do.
        self.weight = nnx.Param(params["weight"]) if affine else nnx.data(None)
        self.bias = nnx.Param(params["bias"]) if affine else nnx.data(None)
        for key in _STAT_KEYS:
            setattr(self, key, nnx.BatchStat(stats[key]) if track_running_stats else nnx.data(None))
        self.num_features = int(num_features)
        self.channel_axis = channel_axis
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.use_running_average = _checks.check_bool(use_running_average, "use_running_average")
        self.axis_name = axis_name

    def __call__(
        self, x: ArrayLike, *, mask: ArrayLike | None = None, use_running_average: bool | None = None
    ) -> jax.Array:
        """Normalize ``x``; in training, update the running statistics.

        Args:
            x: input with a batch axis first, ``num_features`` channels on
                ``channel_axis`` and at least one more (spatial) axis; any float dtype.
            mask: boolean, broadcastable to ``x``, ``True`` where an element is valid:
                the instance and running statistics use valid elements only.
            use_running_average: overrides the attribute for this call.

        Returns:
            The normalized ``x``, same shape and dtype.

        Raises:
            TypeError, ValueError: as :func:`lucid.nn.functional.instance_norm_apply`,
                or the channel axis does not have ``num_features`` entries. Nothing is
                updated then.
        """
        if use_running_average is None:
            use_running_average = self.use_running_average
        training = not _checks.check_bool(use_running_average, "use_running_average")
        x = _checks.check_input(x)
        _checks.check_channel_count(x, _checks.check_channel_axis(self.channel_axis, x.ndim), self.num_features)
        params = {} if not self.affine else {"weight": self.weight[...], "bias": self.bias[...]}
        stats = {} if not self.track_running_stats else {k: getattr(self, k)[...] for k in _STAT_KEYS}
        y, new_stats = F.instance_norm_apply(
            params, stats, x, training=training, momentum=self.momentum, eps=self.eps,
            channel_axis=self.channel_axis, mask=mask, axis_name=self.axis_name if training else None,
        )
        if training:
            for key, value in new_stats.items():
                # Running statistics are buffers: no gradient flows into them.
                getattr(self, key)[...] = jax.lax.stop_gradient(value)
        return y

    def set_view(self, use_running_average: bool | None = None) -> None:
        """Used by ``nnx.view(model, use_running_average=...)``."""
        if use_running_average is not None:
            self.use_running_average = _checks.check_bool(use_running_average, "use_running_average")
