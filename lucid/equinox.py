"""lucid's instance norm as an Equinox stateful layer: :class:`InstanceNorm`.

Install with ``pip install "lucid-jax[equinox]"``. Importing :mod:`lucid` does not import
Equinox; importing this module does.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

try:
    import equinox as eqx
except ImportError as e:  # the optional dependency is missing
    raise ImportError(
        'lucid.equinox needs Equinox; install it with: pip install "lucid-jax[equinox]"'
    ) from e

from ._arrays import as_array
from .nn import _checks
from .nn import functional as F

__all__ = ["InstanceNorm"]


class InstanceNorm(eqx.nn.StatefulLayer):
    r"""Instance normalization with running statistics, as an Equinox stateful layer.

    Each channel of one ``(C, *spatial)`` sample is normalized by its own mean and
    biased variance over the spatial axes, then scaled by ``weight`` and shifted by
    ``bias``. In training the running statistics (``running_mean``, ``running_var``,
    ``num_batches_tracked``, one ``eqx.nn.StateIndex`` holding a dict) are updated;
    in inference they replace the instance statistics. The numbers are those of
    :func:`lucid.nn.functional.instance_norm_apply` on ``x[None]`` with the same
    arguments: accuracy far from zero, the native CPU kernel.

    Build it with ``eqx.nn.make_with_state(InstanceNorm)(C)`` and call it as Equinox's
    ``BatchNorm``: on one unbatched sample, ``y, state = norm(x, state)``, and batch it
    with ``jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))``
    for a layer built with ``axis_name="batch"``: the running statistics then average
    over the whole vmapped batch (and over further named axes, e.g. ``pmap`` devices,
    when ``axis_name`` is a tuple), exactly as ``instance_norm_apply`` over
    ``(N, C, *spatial)``. ``eqx.nn.inference_mode(model)`` sets ``inference``.

    **Without** ``axis_name`` every call is a batch of one sample. Unbatched, that is
    all there is; under ``jax.vmap`` each sample updates its own copy of the running
    statistics, so the state comes out batched: ``out_axes=(0, 0)`` returns one state
    per sample, and ``out_axes=(0, None)`` fails with JAX's ``ValueError`` that the
    state is batched where ``out_axes`` says ``None``. Training a batch therefore needs
    ``axis_name``; inference does not (nothing is updated). Unlike Equinox's
    ``BatchNorm``, the instance statistics stay per sample: only the running statistics
    use the named axis.

    ``momentum`` is lucid's (PyTorch's) convention, the weight of the new batch:
    ``r = (1 - momentum) * r + momentum * batch``, default ``0.1`` (Equinox's
    ``BatchNorm(momentum=0.99)`` weights the old value); ``None`` is the cumulative
    average.

    Args:
        num_features: the number of channels ``C``.
        axis_name: the ``jax.vmap`` (or ``pmap``/``shard_map``) axis name(s) that
            batch this layer: the running statistics average across them. Used in
            training only; inference runs with or without the named axis.
        eps: added to the variance for numerical stability.
        momentum: weight of the new batch in the running statistics, in [0, 1], or
            ``None`` for the cumulative average.
        affine: learnable ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: keep running statistics; without them, inference uses
            instance statistics too (the layer stays stateful, with an empty state).
        inference: normalize with the running statistics and leave them unchanged.
        dtype: dtype of the parameters and running statistics; by default float32
            (float64 under ``jax_enable_x64``, as Equinox's layers). The output has the
            input's dtype.

    Raises:
        TypeError, ValueError: a bad setting; at call time, an input that is not one
            ``(num_features, *spatial)`` sample, or as ``instance_norm_apply``. A failed
            call changes no state.

    Example:
        >>> import equinox as eqx
        >>> import jax, jax.numpy as jnp
        >>> import lucid.equinox
        >>> norm, state = eqx.nn.make_with_state(lucid.equinox.InstanceNorm)(3, axis_name="batch")
        >>> x = jnp.arange(2 * 3 * 4 * 4, dtype=jnp.float32).reshape(2, 3, 4, 4)
        >>> batched = jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        >>> y, state = batched(x, state)
        >>> int(state.get(norm.state_index)["num_batches_tracked"]), y.shape
        (1, (2, 3, 4, 4))
        >>> y, _ = eqx.nn.inference_mode(norm)(x[0], state)   # the running statistics
    """

    weight: jax.Array | None
    bias: jax.Array | None
    state_index: eqx.nn.StateIndex | None
    inference: bool
    num_features: int = eqx.field(static=True)
    axis_name: Hashable | tuple | None = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    momentum: float | None = eqx.field(static=True)

    def __init__(
        self,
        num_features: int,
        *,
        axis_name: Hashable | tuple | None = None,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        inference: bool = False,
        dtype: Any = None,
    ) -> None:
        num_features, self.eps, self.momentum, affine, track_running_stats = _checks.check_layer_settings(
            num_features, eps=eps, momentum=momentum, affine=affine, track_running_stats=track_running_stats)
        params, stats = F.instance_norm_init(
            num_features, affine=affine, track_running_stats=track_running_stats,
            dtype=jax.dtypes.canonicalize_dtype(jnp.float64) if dtype is None else dtype,
        )
        self.weight = params.get("weight")
        self.bias = params.get("bias")
        self.state_index = eqx.nn.StateIndex(stats) if track_running_stats else None
        self.inference = _checks.check_bool(inference, "inference")
        self.num_features = int(num_features)
        self.axis_name = axis_name

    def __call__(
        self,
        x: ArrayLike,
        state: eqx.nn.State,
        *,
        key: jax.Array | None = None,
        inference: bool | None = None,
    ) -> tuple[jax.Array, eqx.nn.State]:
        """Normalize one sample; in training, update the running statistics.

        Args:
            x: one unbatched sample ``(num_features, *spatial)``, any float dtype.
            state: the ``eqx.nn.State`` holding the running statistics.
            key: ignored (the Equinox layer signature).
            inference: overrides the ``inference`` field for this call.

        Returns:
            ``(y, state)``: the normalized sample (same shape and dtype) and the state,
            updated in training.

        Raises:
            TypeError, ValueError: ``x`` is not ``(num_features, *spatial)`` (a batch
                needs ``jax.vmap``); training with ``axis_name`` outside a transform that
                binds it; or as :func:`lucid.nn.functional.instance_norm_apply`.
        """
        del key
        if inference is None:
            inference = self.inference
        training = not _checks.check_bool(inference, "inference")
        x = jnp.asarray(as_array(x, "input"))
        if x.ndim < 2:
            raise ValueError(
                f"expected one unbatched sample of shape ({self.num_features}, *spatial) with at least one "
                f"spatial axis, got shape {tuple(x.shape)}."
            )
        _checks.check_channel_count(
            x, 0, self.num_features, " The layer takes one unbatched sample: batch it with jax.vmap."
        )
        if training and self.axis_name is not None:
            try:
                _checks.check_axis_name(self.axis_name, "axis_name")
            except ValueError as e:
                raise ValueError(
                    f"InstanceNorm(axis_name={self.axis_name!r}) trains inside jax.vmap(..., "
                    f"axis_name={self.axis_name!r}) (or pmap/shard_map over that axis), where the running "
                    f"statistics average over the batch; call it there, or in inference mode."
                ) from e
        params = {} if self.weight is None else {"weight": self.weight, "bias": self.bias}
        stats = {} if self.state_index is None else state.get(self.state_index)
        y, new_stats = F.instance_norm_apply(
            params, stats, x[None], training=training, momentum=self.momentum, eps=self.eps,
            channel_axis=1, axis_name=self.axis_name if training else None,  # only training reads it
        )
        if training and self.state_index is not None:
            state = state.set(self.state_index, new_stats)
        return y[0], state
