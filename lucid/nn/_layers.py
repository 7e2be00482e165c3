"""``InstanceNorm1d/2d/3d``: modules that own parameters and running statistics.

They hold state and check the input's rank and channel count; the computation
is :func:`lucid.nn.functional.instance_norm_apply`, recorded on the Tensor tape
by :func:`lucid._tensor.apply_jax`. The new running statistics are written
back only after the call has succeeded, under the locks of their Tensors
(:func:`lucid._tensor.update_in_place`): threads that train one module
together lose no update.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from jax.typing import ArrayLike

from .._tensor import Tensor, _locked, apply_jax, assign_in_place, snapshot, update_in_place
from . import _checks
from . import functional as F
from ._module import Module, Parameter

__all__ = ["InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d"]


class _InstanceNorm(Module):
    """Shared implementation; subclasses set the number of spatial axes."""

    _num_spatial: int

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        *,
        dtype: Any = jnp.float32,
    ) -> None:
        super().__init__()
        affine = _checks.check_bool(affine, "affine")
        track_running_stats = _checks.check_bool(track_running_stats, "track_running_stats")
        # The functional API's own checks, so a bad setting fails here rather than at the first call.
        self.eps = _checks.check_eps(eps)
        self.momentum = _checks.check_momentum(momentum)
        params, stats = F.instance_norm_init(
            num_features, affine=affine, track_running_stats=track_running_stats, dtype=dtype
        )
        self.num_features = int(num_features)
        self.affine = affine
        self.track_running_stats = track_running_stats
        for name in ("weight", "bias"):
            self.register_parameter(name, Parameter(params[name]) if affine else None)
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            self.register_buffer(name, Tensor(stats[name]) if track_running_stats else None)

    def reset_running_stats(self) -> None:
        """Set the running statistics back to mean 0, variance 1, 0 batches."""
        if self.track_running_stats:
            _, stats = F.instance_norm_init(self.num_features, dtype=self.running_mean.dtype)
            buffers = {name: getattr(self, name) for name in stats}
            with _locked(buffers.values()):
                assign_in_place(buffers, stats, what="the running statistics")

    def forward(self, input: Tensor | ArrayLike) -> Tensor:
        """Normalize ``input``; in training mode with tracked statistics, update them in place.

        Calling the module runs this: a Tensor in gives a Tensor out, a JAX
        or NumPy array (or a torch.Tensor, read through NumPy) gives a JAX
        array (see :meth:`Module.__call__`).

        Args:
            input: batched ``(N, C, *spatial)`` or unbatched ``(C, *spatial)``
                input, as a Tensor or an array.

        Returns:
            A Tensor of the input's shape and dtype, recorded on the tape.

        Raises:
            ValueError: a wrong number of dimensions, or a channel count other
                than ``num_features`` (when affine or tracking statistics); no
                state changes.
            TypeError: a non-floating-point input; or, in training mode with
                tracked statistics, a traced input (inside a JAX
                transformation: use :meth:`Module.functional_call`); no state changes.
        """
        x = input if isinstance(input, Tensor) else Tensor(input)
        batched_ndim = self._num_spatial + 2
        if x.ndim not in (batched_ndim - 1, batched_ndim):
            raise ValueError(f"expected {batched_ndim - 1}D or {batched_ndim}D input (got {x.ndim}D input)")
        batched = x.ndim == batched_ndim
        feature_dim = 1 if batched else 0
        if (self.affine or self.track_running_stats) and x.shape[feature_dim] != self.num_features:
            raise ValueError(
                f"expected input's size at dim={feature_dim} to match num_features "
                f"({self.num_features}), but got: {x.shape[feature_dim]}."
            )
        params = self._members("_parameters", _checks.PARAM_KEYS)
        stats = self._members("_buffers", _checks.STAT_KEYS)
        training, momentum, eps = self.training, self.momentum, self.eps

        def run(params: dict, stats: dict, x: Any) -> tuple[Any, dict]:
            y, new_stats = F.instance_norm_apply(
                params, stats, x if batched else x[None], training=training, momentum=momentum, eps=eps
            )
            return (y if batched else y[0]), new_stats

        if training and stats:
            return update_in_place(run, (params, stats, x), stats, f"the running statistics of {type(self).__name__}")
        # Read-only: one consistent snapshot (no other thread's update half seen), computed outside the lock.
        return apply_jax(run, params, snapshot(stats), x, has_aux=True)[0]

    def extra_repr(self) -> str:
        """``num_features`` and the settings, as PyTorch prints them.

        Returns:
            A string.
        """
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}"
        )


_ARGS_DOC = """
    Normalizes every ``(n, c)`` instance with its own statistics in training
    mode (updating the running statistics in place when it tracks them), and
    with the running statistics in eval mode; unbatched input behaves as a
    batch of one. The computation is :func:`lucid.nn.functional.instance_norm_apply`;
    its rules (formula, running statistics, ``momentum=None``) are stated once,
    in the Semantics section of lucid's README.

    The defaults follow lucid's reference pages: ``affine=True`` and
    ``track_running_stats=True`` (PyTorch defaults both to ``False``). Unlike
    PyTorch's InstanceNorm, lucid counts ``num_batches_tracked`` and honours
    ``momentum=None``.

    Args:
        num_features: the number of channels ``C``.
        eps: added to the variance for numerical stability.
        momentum: update factor of the running statistics, or ``None`` for
            the cumulative moving average.
        affine: learn a per-channel scale ``weight`` (ones) and shift ``bias`` (zeros).
        track_running_stats: keep ``running_mean`` (zeros), ``running_var``
            (ones) and ``num_batches_tracked`` (int32 0) as buffers.
        dtype: float dtype of the parameters and running statistics.

    Attributes:
        weight, bias: :class:`Parameter` of shape ``(C,)``, or ``None`` when not affine.
        running_mean, running_var: buffers of shape ``(C,)``, or ``None`` when not tracking.
        num_batches_tracked: int32 scalar buffer, or ``None`` when not tracking.

    Raises:
        ValueError: ``num_features`` is not a positive int, ``eps`` < 0,
            ``momentum`` outside [0, 1].
        TypeError: ``affine``/``track_running_stats`` not bools, a non-float ``dtype``.
"""


class InstanceNorm1d(_InstanceNorm):
    __doc__ = (
        """Instance normalization over ``(N, C, L)`` or unbatched ``(C, L)`` input.
""" + _ARGS_DOC + """
    Example:
        >>> import numpy as np
        >>> import lucid.nn as nn
        >>> norm = nn.InstanceNorm1d(2, affine=False, track_running_stats=False)
        >>> y = norm(np.array([[0.0, 2.0], [1.0, 5.0]], np.float32))  # unbatched (C, L)
        >>> print(np.asarray(y, np.float64).round(4))
        [[-1.  1.]
         [-1.  1.]]
"""
    )
    _num_spatial = 1


class InstanceNorm2d(_InstanceNorm):
    __doc__ = (
        """Instance normalization over ``(N, C, H, W)`` or unbatched ``(C, H, W)`` input.
""" + _ARGS_DOC + """
    Example:
        The reference example, with the statistics over H and W together
        (mean 3.5 and 9.5, biased variance 35/12):

        >>> import numpy as np
        >>> import lucid.nn as nn
        >>> from lucid import Tensor
        >>> input_tensor = Tensor([[
        ...     [[1.0, 2.0, 3.0],
        ...      [4.0, 5.0, 6.0]],
        ...     [[7.0, 8.0, 9.0],
        ...      [10.0, 11.0, 12.0]]
        ... ]], requires_grad=True)  # Shape: (1, 2, 2, 3)
        >>> instance_norm = nn.InstanceNorm2d(num_features=2)
        >>> output = instance_norm(input_tensor)  # Shape: (1, 2, 2, 3)
        >>> print(output)
        Tensor([[[[-1.4638, -0.8783, -0.2928],
                  [ 0.2928,  0.8783,  1.4638]],
        <BLANKLINE>
                 [[-1.4638, -0.8783, -0.2928],
                  [ 0.2928,  0.8783,  1.4638]]]], grad=None)

        ``backward()`` on a non-scalar output seeds it with ones, the gradient
        of ``output.sum()``; every normalized slice sums to 0 whatever the
        input, so the gradient is 0 (up to rounding):

        >>> output.backward()
        >>> print(np.asarray(input_tensor.grad, np.float64).round(4) + 0.0)
        [[[[0. 0. 0.]
           [0. 0. 0.]]
        <BLANKLINE>
          [[0. 0. 0.]
           [0. 0. 0.]]]]

        The training call also updated the running statistics
        (``0.9 * 0 + 0.1 * mean`` and ``0.9 * 1 + 0.1 * unbiased variance``):

        >>> print(instance_norm.running_mean, instance_norm.running_var)
        Tensor([0.35, 0.95], grad=None) Tensor([1.25, 1.25], grad=None)
"""
    )
    _num_spatial = 2


class InstanceNorm3d(_InstanceNorm):
    __doc__ = (
        """Instance normalization over ``(N, C, D, H, W)`` or unbatched ``(C, D, H, W)`` input.
""" + _ARGS_DOC + """
    Example:
        >>> import numpy as np
        >>> import lucid.nn as nn
        >>> norm = nn.InstanceNorm3d(1).eval()  # eval: uses the running statistics (0, 1)
        >>> y = norm(np.full((1, 1, 2, 2, 2), 3.0, np.float32))
        >>> print(np.asarray(y, np.float64).round(4).ravel())
        [3. 3. 3. 3. 3. 3. 3. 3.]
"""
    )
    _num_spatial = 3
