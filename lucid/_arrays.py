"""The one conversion of user values to arrays, shared by every layer of lucid.

The functional API's checks, the ``Tensor`` constructor, module state and
checkpoint files all take "an array" in the same forms: JAX arrays (tracers
included), NumPy arrays and scalars, objects that offer themselves to JAX
(``__jax_array__``), PyTorch tensors (found by duck typing, so torch is never
imported), and nested lists or Python numbers.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["as_array", "is_traced"]


def is_traced(value: Any) -> bool:
    """Whether ``value`` is a JAX tracer (a placeholder inside a JAX transformation).

    Args:
        value: anything.

    Returns:
        ``True`` for a ``jax.core.Tracer``, else ``False``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from lucid._arrays import is_traced
        >>> is_traced(jnp.ones(2))
        False
        >>> bool(jax.jit(is_traced)(jnp.ones(2)))  # inside jit the argument is a tracer
        True
    """
    return isinstance(value, jax.core.Tracer)


def _is_torch_tensor(value: Any) -> bool:
    return all(hasattr(value, name) for name in ("detach", "cpu", "numpy", "dtype"))


def _torch_to_numpy(value: Any) -> np.ndarray:
    """A NumPy copy of a ``torch.Tensor``; NumPy has no bfloat16, so that goes through float32 (exact)."""
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":
        return value.float().numpy().astype(jnp.bfloat16)
    return value.numpy().copy()


def as_array(value: Any, what: str, *, concrete: bool = False) -> jax.Array | np.ndarray:
    """``value`` as a JAX or NumPy array, or a ``TypeError`` that names ``what``.

    JAX arrays (tracers included) and NumPy arrays come back as they are;
    ``__jax_array__`` objects and PyTorch tensors (a bfloat16 one as JAX's
    ``bfloat16``) as their arrays; nested lists and Python numbers through
    NumPy. Values that are not numbers or booleans (strings, objects, ragged
    lists) are refused.

    Args:
        value: the value to convert.
        what: how to name it in an error message.
        concrete: for state that outlives a JAX transformation (module
            state, checkpoints): refuse tracers (storing one would leak it),
            and nested lists and Python numbers (state is made of arrays).

    Returns:
        A ``jax.Array`` or an ``np.ndarray`` with the value's dtype.

    Raises:
        TypeError: ``value`` does not convert to a numeric array, or is a
            tracer while ``concrete``.

    Example:
        >>> import numpy as np
        >>> from lucid._arrays import as_array
        >>> as_array([1.0, 2.0], "weight"), as_array(np.int64(3), "step").dtype
        (array([1., 2.]), dtype('int64'))
        >>> as_array(["a"], "weight")
        Traceback (most recent call last):
        TypeError: weight must be a numeric array, got dtype <U1.
    """
    if is_traced(value) and concrete:
        raise TypeError(
            f"{what} is a traced value: state that outlives a JAX transformation cannot hold one (it "
            f"would leak a tracer). Return the arrays from the transformed function and store them "
            f"(load_pytrees, load_state_dict, lucid.save) outside it."
        )
    if isinstance(value, (jax.Array, np.ndarray)):
        array = value
    elif isinstance(value, np.generic):
        array = np.asarray(value)
    elif hasattr(value, "__jax_array__"):
        return as_array(value.__jax_array__(), what, concrete=concrete)
    elif _is_torch_tensor(value):
        array = _torch_to_numpy(value)
    elif isinstance(value, (list, tuple, numbers.Number)) and not concrete:
        try:
            array = np.asarray(value)
        except ValueError as e:  # ragged nesting
            raise TypeError(f"{what} must be a numeric array, got a ragged {type(value).__name__}.") from e
    else:
        kinds = "a NumPy array, a JAX array, a lucid.Tensor or a torch.Tensor" if concrete else "an array"
        raise TypeError(f"{what} must be {kinds}, got {type(value).__name__}.")
    if array.dtype != np.bool_ and not jnp.issubdtype(array.dtype, np.number):
        raise TypeError(f"{what} must be a numeric array, got dtype {array.dtype}.")
    return array
