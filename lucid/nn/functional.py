"""The functional API: the reference page's ``instance_norm`` and the pure pair.

``instance_norm_init`` / ``instance_norm_apply`` are a pure pair in the style of
optax: parameters and running statistics are plain dicts keyed like PyTorch's
state dict, passed in and returned, never mutated. ``instance_norm`` (the
reference page's signature) and the ``InstanceNorm*d`` modules call
``instance_norm_apply``. What they compute (the formula, the running-statistics
rule, masks and edge cases) is stated once, in the Semantics section of
lucid's README.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from .._arrays import _is_torch_tensor
from . import _checks, _native, _normalize, _running
from ._stats import NormConfig

__all__ = [
    "instance_norm", "instance_norm_init", "instance_norm_apply", "pure_xla", "native_kernel_available",
    "native_kernel_status", "NativeKernelStatus",
]

Params = dict[str, jax.Array]
Stats = dict[str, jax.Array]
Implementation = Literal["xla", "native"] | None

pure_xla = _native.pure_xla
NativeKernelStatus = _native.NativeKernelStatus


def native_kernel_available() -> bool:
    """Whether calls traced now run lucid's native CPU kernel where it applies.

    True when the kernel is loaded and not turned off: ``False`` without a
    build, when its library failed to load, under ``LUCID_NATIVE=0``, and
    inside ``pure_xla()``. :func:`native_kernel_status` says which.

    Returns:
        Whether the kernel is enabled now.

    Example:
        >>> import lucid.nn.functional as F
        >>> with F.pure_xla():
        ...     F.native_kernel_available()
        False
    """
    return _native.enabled()


def native_kernel_status() -> NativeKernelStatus:
    """The native CPU kernel's state: built, loaded, enabled, and which instruction-set path runs.

    One build carries the kernel for several instruction sets (x86-64:
    ``baseline``, ``avx2``, ``avx512``, ``avx512bf16``); the best one this CPU
    runs is loaded at import, or the one ``LUCID_NATIVE_ISA`` asks for.

    Returns:
        A frozen :class:`NativeKernelStatus`: ``enabled``, ``isa`` (the path
        running), ``loaded``, ``built``, ``isas`` (the paths built),
        ``cpu_isas`` (those this CPU runs), ``disabled_by``
        (``"LUCID_NATIVE=0"``, ``"pure_xla()"``), ``problem`` (why not
        loaded, or not the path asked for) and ``build_messages`` (the
        compiler's errors and warnings at build time).

    Example:
        >>> import lucid.nn.functional as F
        >>> status = F.native_kernel_status()
        >>> status.enabled == F.native_kernel_available()
        True
        >>> status.isa is None or status.isa in status.cpu_isas
        True
    """
    return _native.status()


def _channel_shaped(v: jax.Array | None, ndim: int, channel_axis: int) -> jax.Array | None:
    if v is None:
        return None
    return v.reshape(tuple(v.shape[0] if a == channel_axis else 1 for a in range(ndim)))


# --------------------------------------------------------------------------
# The pure pair
# --------------------------------------------------------------------------


def instance_norm_init(
    num_features: int,
    *,
    affine: bool = True,
    track_running_stats: bool = True,
    dtype: Any = jnp.float32,
) -> tuple[Params, Stats]:
    """Create the parameter and running-statistics pytrees of an instance norm.

    Args:
        num_features: the number of channels ``C``.
        affine: if true, ``params`` holds ``weight`` (ones) and ``bias`` (zeros).
        track_running_stats: if true, ``stats`` holds ``running_mean`` (zeros),
            ``running_var`` (ones) and ``num_batches_tracked`` (0).
        dtype: float dtype of the arrays.

    Returns:
        ``(params, stats)``, plain dicts keyed like PyTorch's state dict; either
        is empty when its flag is off.

    Raises:
        ValueError: ``num_features`` is not a positive int.
        TypeError: ``dtype`` is not a floating-point dtype.

    Example:
        >>> import lucid.nn.functional as F
        >>> params, stats = F.instance_norm_init(3)
        >>> sorted(params), sorted(stats)
        (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
        >>> params["weight"]
        Array([1., 1., 1.], dtype=float32)
    """
    num_features = _checks.check_num_features(num_features)
    dtype = _checks.check_float_dtype(dtype)
    params = {"weight": jnp.ones((num_features,), dtype), "bias": jnp.zeros((num_features,), dtype)} if affine else {}
    stats = (
        {
            "running_mean": jnp.zeros((num_features,), dtype),
            "running_var": jnp.ones((num_features,), dtype),
            "num_batches_tracked": jnp.zeros((), jnp.int32),
        }
        if track_running_stats
        else {}
    )
    return params, stats


def instance_norm_apply(
    params: Mapping[str, ArrayLike] | None,
    stats: Mapping[str, ArrayLike] | None,
    x: ArrayLike,
    *,
    training: bool = True,
    momentum: float | ArrayLike | None = 0.1,
    eps: float = 1e-5,
    channel_axis: int = 1,
    mask: ArrayLike | None = None,
    axis_name: Hashable | tuple | None = None,
    spatial_axis_name: Hashable | tuple | None = None,
    implementation: Implementation = None,
) -> tuple[jax.Array, Stats]:
    r"""Instance normalization as a pure function of explicit pytrees.

    Normalizes every ``(n, c)`` instance by its mean and biased variance over
    the spatial axes (training, or no running statistics), else by the
    running statistics, then applies ``weight`` and ``bias``; in training the
    running statistics are updated. The exact rules (formula, running
    statistics, ``momentum=None``, masks, edge cases) are stated in the
    Semantics section of lucid's README.

    Arrays may be JAX arrays (tracers included), NumPy arrays or PyTorch
    tensors (read through NumPy, so torch is never imported); the results are
    JAX arrays.

    Args:
        params: ``{"weight": (C,), "bias": (C,)}``, either key optional, or
            empty/``None`` for no affine transform.
        stats: ``{"running_mean": (C,), "running_var": (C,),
            "num_batches_tracked": ()}`` or empty/``None``.
        x: input of shape ``(N, C, *spatial)`` (channel axis per ``channel_axis``)
            with at least one spatial axis; any float dtype.
        training: use (and update) instance statistics; else use running
            statistics when there are any. A Python bool (under ``jax.jit``,
            a static argument).
        momentum: update factor of the running statistics, or ``None`` for the
            cumulative moving average.
        eps: added to the variance for numerical stability.
        channel_axis: the channel axis; ``-1`` for channels-last input.
        mask: boolean, broadcastable to ``x``, ``True`` where an element is
            valid; statistics use only valid elements.
        axis_name: mapped axis name(s) that split the batch (``shard_map``,
            ``pmap``): running statistics are averaged across them.
        spatial_axis_name: mapped axis name(s) that split the spatial axes:
            instance statistics are reduced across them.
        implementation: ``None`` (the native CPU kernel where it applies,
            unless inside ``pure_xla()`` or with ``LUCID_NATIVE=0``), ``"xla"``
            (XLA operations only), or ``"native"`` (the kernel, raising
            ``ValueError`` where it is not built or cannot compute the call).

    Returns:
        ``(y, new_stats)``: ``y`` with the shape and dtype of ``x``;
        ``new_stats`` with the structure of ``stats`` (unchanged unless
        training with running statistics).

    Raises:
        TypeError: a non-float input or parameter, a non-bool mask or ``training``.
        ValueError: fewer than 3 dims, a single spatial element while using
            instance statistics, parameters or statistics not of shape ``(C,)``,
            ``channel_axis`` out of range, a mask that does not broadcast, an
            unknown ``implementation``.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> import lucid.nn.functional as F
        >>> params, stats = F.instance_norm_init(2)
        >>> x = jnp.arange(12.0).reshape(1, 2, 2, 3)
        >>> y, stats = F.instance_norm_apply(params, stats, x)
        >>> print(np.asarray(y[0, 0], np.float64).round(4))
        [[-1.4638 -0.8783 -0.2928]
         [ 0.2928  0.8783  1.4638]]
        >>> print(stats["running_mean"], stats["num_batches_tracked"])
        [0.25 0.85] 1
    """
    training = _checks.check_bool(training, "training")
    x = _checks.check_input(x)
    channel = _checks.check_channel_axis(channel_axis, x.ndim)
    num_channels = x.shape[channel]
    params = _checks.check_params(params, num_channels)
    stats_in = stats if stats is not None else {}
    checked_stats = _checks.check_stats(stats_in, num_channels)
    momentum = _checks.check_momentum(momentum)
    if momentum is None and training and checked_stats and "num_batches_tracked" not in checked_stats:
        raise ValueError(
            "momentum=None (cumulative moving average) needs stats['num_batches_tracked'] "
            "to know how many batches were averaged; create stats with instance_norm_init."
        )
    eps = _checks.check_eps(eps)
    mask = _checks.check_mask(mask, tuple(x.shape))
    _checks.check_axis_name(axis_name, "axis_name")
    _checks.check_axis_name(spatial_axis_name, "spatial_axis_name")
    spatial = tuple(a for a in range(x.ndim) if a not in (0, channel))
    _native.check_implementation(implementation)
    use_instance_stats = training or not checked_stats
    if use_instance_stats:
        _checks.check_spatial_size(tuple(x.shape), spatial, spatial_axis_name)
    kernel = use_instance_stats and _native.applies(
        x, params.get("weight"), params.get("bias"), mask, spatial, spatial_axis_name, implementation)
    if x.size == 0:  # an empty batch, channel or spatial axis: an empty output, nothing learned
        return jnp.zeros_like(x), dict(stats_in)
    config = NormConfig(spatial, spatial_axis_name, eps, kernel)
    y, new_stats = _apply(
        params, checked_stats, x, mask, momentum,
        config=config, channel=channel, training=training, axis_name=axis_name,
    )
    if not (training and checked_stats):
        return y, dict(stats_in)  # unchanged: the caller's own leaves
    return y, {k: new_stats[k] for k in stats_in}


@partial(jax.jit, static_argnames=("config", "channel", "training", "axis_name"))
def _apply(params, stats, x, mask, momentum, *, config, channel, training, axis_name):
    # momentum is a traced argument (None, the empty pytree, means cumulative):
    # a new momentum value does not recompile.
    weight = _channel_shaped(params.get("weight"), x.ndim, channel)
    bias = _channel_shaped(params.get("bias"), x.ndim, channel)
    if training or not stats:
        y, mean, var, count = _normalize.normalize_with_instance_stats(x, weight, bias, mask, config)
        if training and stats:
            stats = _running.update_running_stats(stats, mean, var, count, momentum, axis_name, channel)
        return y, stats
    rm = _channel_shaped(stats["running_mean"], x.ndim, channel)
    rv = _channel_shaped(stats["running_var"], x.ndim, channel)
    return _normalize.normalize_with_running_stats(x, rm, rv, weight, bias, config), stats



# --------------------------------------------------------------------------
# The reference page's function
# --------------------------------------------------------------------------


def instance_norm(
    input_: ArrayLike,
    running_mean: ArrayLike | None = None,
    running_var: ArrayLike | None = None,
    weight: ArrayLike | None = None,
    bias: ArrayLike | None = None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    *,
    implementation: Implementation = None,
) -> jax.Array:
    r"""Instance normalization of an ``(N, C, *spatial)`` input: the reference page's function.

    Computes what :func:`instance_norm_apply` computes (the rules are in the
    Semantics section of lucid's README), with running statistics used when
    given and not ``training``. With JAX or NumPy arrays this is pure and
    returns the output only (arrays are immutable); use
    :func:`instance_norm_apply` to get the updated running statistics. If any
    argument is a :class:`lucid.Tensor`, the output is a Tensor recorded on
    the autograd tape, and in training ``running_mean`` and ``running_var``
    given as Tensors are updated in place, as in PyTorch. PyTorch tensors are
    read as arrays (through NumPy); since lucid cannot update them in place,
    a training call refuses them as running statistics rather than leave them
    silently unchanged.

    Args:
        input_: shape ``(N, C, *spatial)``, at least one spatial axis.
        running_mean, running_var: shape ``(C,)``, both or neither.
        weight, bias: shape ``(C,)`` or ``None``.
        training: use instance statistics (and update the running statistics).
        momentum: update factor of the running statistics.
        eps: added to the variance for numerical stability.
        implementation: as :func:`instance_norm_apply` (``None``, ``"xla"`` or ``"native"``).

    Returns:
        The normalized values, with the shape and dtype of ``input_``: a
        ``jax.Array``, or a ``Tensor`` when any argument is a Tensor.

    Raises:
        TypeError, ValueError: as :func:`instance_norm_apply`; also when only
            one of ``running_mean``/``running_var`` is given, or (in training)
            only one of them is a Tensor, or they are PyTorch tensors. A
            failed call changes nothing.

    Example:
        The reference example: Tensors in, a Tensor out, running statistics
        updated in place (``0.1 * mean`` and ``0.9 + 0.1 * unbiased variance``):

        >>> import lucid.nn.functional as F
        >>> from lucid import Tensor
        >>> input_ = Tensor([[[1.0, 2.0], [3.0, 4.0]]])  # Shape: (1, 2, 2)
        >>> running_mean = Tensor([0.0, 0.0])  # Shape: (2,)
        >>> running_var = Tensor([1.0, 1.0])  # Shape: (2,)
        >>> weight = Tensor([1.0, 1.0])  # Shape: (2,)
        >>> bias = Tensor([0.0, 0.0])  # Shape: (2,)
        >>> out = F.instance_norm(input_, running_mean, running_var, weight, bias, training=True)
        >>> print(out)
        Tensor([[[-1.,  1.],
                 [-1.,  1.]]], grad=None)
        >>> print(running_mean, running_var)
        Tensor([0.15, 0.35], grad=None) Tensor([0.95, 0.95], grad=None)

        The same with JAX arrays, which stay unchanged:

        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])  # (1, 2, 2)
        >>> out = F.instance_norm(x, jnp.zeros(2), jnp.ones(2), jnp.ones(2), jnp.zeros(2), training=True)
        >>> print(np.asarray(out, np.float64).round(4))
        [[[-1.  1.]
          [-1.  1.]]]
    """
    if (running_mean is None) != (running_var is None):
        raise ValueError("pass both running_mean and running_var, or neither.")
    if momentum is None:
        raise ValueError(
            "momentum=None (cumulative moving average) needs a batch count; use "
            "instance_norm_apply with stats from instance_norm_init, or an InstanceNorm module."
        )
    if training and any(_is_torch_tensor(v) for v in (running_mean, running_var)):
        raise TypeError(
            "running_mean/running_var are torch.Tensors, which lucid reads but cannot update in place. "
            "Pass lucid.Tensor(running_mean) and lucid.Tensor(running_var) to have them updated in place "
            "(copy the values back with torch_tensor.copy_(torch.from_numpy(t.numpy()))), or call "
            "instance_norm_apply, which returns the new statistics."
        )
    params = {k: v for k, v in (("weight", weight), ("bias", bias)) if v is not None}
    stats = {} if running_mean is None else {"running_mean": running_mean, "running_var": running_var}
    # Array types that keep their own state (lucid.Tensor: a tape, in-place
    # updates) take the call over through this hook, so that this layer never
    # imports the facade above it.
    apply = partial(instance_norm_apply, training=training, momentum=momentum, eps=eps, implementation=implementation)
    for value in (input_, running_mean, running_var, weight, bias):
        override = getattr(type(value), "__lucid_function__", None)
        if override is not None:
            return override(apply, params, stats, input_, training=training)
    y, _ = apply(params, stats, input_)
    return y
