"""The eager ``Tensor`` facade and its small autograd tape.

A :class:`Tensor` wraps an immutable ``jax.Array`` and, when it requires a
gradient, remembers how it was made. Every operation goes through one
mechanism, :func:`apply_jax`: it runs a pure JAX function on the arrays inside
the Tensors and, when a gradient is needed, runs it under ``jax.vjp`` and keeps
the pullback on the output. :meth:`Tensor.backward` walks the recorded graph in
reverse topological order and calls each pullback, so every gradient is JAX's
own (instance normalization's is the hand-derived rule in
``lucid.nn._instance_norm``); the tape only routes cotangents.

JAX transformations (``jax.jit``, ``jax.grad``, ``jax.vmap``) trace with
placeholder values ("tracers"). A Tensor may hold one while a traced function
runs, but state that outlives the trace (a leaf's ``.grad``, a module's running
statistics) must never be set to one: :func:`assign_in_place`, the
``Tensor.data`` setter and :meth:`Tensor.backward` refuse, and point to the
pure bridge (``Module.pytrees``/``Module.apply``) instead. The bridge itself
is the one exception, and a narrow one: while ``Module.apply`` runs, exactly
the Tensors it swapped traced values into may hold tracers (it restores them
before it returns); every other Tensor stays guarded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import ArrayLike

from ._arrays import as_array, is_traced

__all__ = ["Tensor", "no_grad", "apply_jax", "assign_in_place"]

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("lucid_grad_enabled", default=True)
# While Module.apply runs: the ids of the Tensors it swapped the pytrees into
# (and restores before it returns). Only these may be given tracers; None when
# no bridge is active.
_bridged: contextvars.ContextVar[frozenset[int] | None] = contextvars.ContextVar("lucid_bridged", default=None)

_BRIDGE_HINT = (
    "Inside jax.jit/jax.grad/jax.vmap use the pure bridge instead: "
    "params, stats = module.pytrees(); out, new_stats = module.apply(params, stats, x, training=True); "
    "then module.load_pytrees(params, new_stats) outside the transformation."
)
_UNREGISTERED_HINT = (
    "Module.apply swaps its pytrees into the parameters and buffers of the module and of its "
    "registered submodules only; this state belongs to none of them (is its module kept in a plain "
    "list or dict attribute?). Assign each submodule to an attribute (self.block0 = module) so that "
    "its state is part of module.pytrees() and comes back in new_stats."
)


class no_grad:
    """Context manager and decorator that turns off recording on the tape.

    Inside it, operations on Tensors compute values only: outputs do not
    require a gradient and no pullback is kept. A decorated function enters a
    fresh context on every call, so it may recurse and run in several threads
    at once; the setting is per thread (and per ``contextvars`` context).

    Example:
        >>> from lucid import Tensor, no_grad
        >>> x = Tensor([1.0, 2.0], requires_grad=True)
        >>> with no_grad():
        ...     y = x * 2
        >>> y.requires_grad
        False

        As a decorator:

        >>> @no_grad()
        ... def double(t):
        ...     return t * 2
        >>> double(x).requires_grad, (x * 2).requires_grad
        (False, True)
    """

    def __init__(self) -> None:
        # One stack of tokens per thread: a contextvars token must be reset in
        # the thread (context) that set it, even when one instance is shared.
        self._local = threading.local()

    def __enter__(self) -> no_grad:
        if not hasattr(self._local, "tokens"):
            self._local.tokens = []
        self._local.tokens.append(_grad_enabled.set(False))
        return self

    def __exit__(self, *exc: object) -> None:
        _grad_enabled.reset(self._local.tokens.pop())

    def __call__(self, fun: Callable) -> Callable:
        @functools.wraps(fun)
        def without_grad(*args: Any, **kwargs: Any) -> Any:
            with no_grad():
                return fun(*args, **kwargs)

        return without_grad


@contextlib.contextmanager
def _bridge(tensors: Iterable[Tensor]) -> Iterator[None]:
    """Let exactly ``tensors`` hold tracers while the block runs (``Module.apply``'s swap)."""
    outer = _bridged.get() or frozenset()
    token = _bridged.set(outer | {id(t) for t in tensors})
    try:
        yield
    finally:
        _bridged.reset(token)


def _may_hold(tensor: Tensor, value: Any) -> bool:
    """Whether storing ``value`` in ``tensor`` keeps every tracer inside its transformation.

    A concrete value is always fine; a tracer only in a Tensor that already
    holds one (it was made inside the transformation) or that ``Module.apply``
    swapped in (it restores the Tensor before returning).
    """
    if not is_traced(value) or is_traced(tensor._data):
        return True
    bridged = _bridged.get()
    return bridged is not None and id(tensor) in bridged


class _Node:
    """How a non-leaf Tensor was made: the pullback of its op and the Tensors it
    was differentiated with respect to (one per pullback output)."""

    __slots__ = ("pullback", "parents")

    def __init__(self, pullback: Callable, parents: tuple[Tensor, ...]) -> None:
        self.pullback = pullback
        self.parents = parents


def _to_jax(data: Any, dtype: Any = None) -> jax.Array:
    """Anything :class:`Tensor` accepts, as a ``jax.Array`` (of ``dtype`` if given).

    Python floats and nested lists of them become float32, as in PyTorch;
    integers that do not fit the target dtype raise instead of wrapping.
    """
    if isinstance(data, Tensor):
        data = data._data
    if isinstance(data, jax.Array):  # tracers included
        return data if dtype is None else data.astype(dtype)
    try:
        array = np.asarray(as_array(data, f"a Tensor's data ({type(data).__name__})"))
    except TypeError as e:
        raise TypeError(
            f"cannot make a Tensor from {type(data).__name__}: it does not convert to a numeric array."
        ) from e
    if dtype is None and array.dtype == np.float64 and not isinstance(data, (np.ndarray, np.generic)):
        array = array.astype(np.float32)
    # JAX stores 64-bit integers in 32 bits unless jax_enable_x64 is on; it would wrap silently.
    target = jax.dtypes.canonicalize_dtype(array.dtype if dtype is None else dtype)
    if array.dtype.kind in "iu" and np.dtype(target).kind in "iu" and not np.array_equal(array.astype(target), array):
        implicit = " (JAX keeps integers in 32 bits unless jax_enable_x64 is on)" if dtype is None else ""
        raise ValueError(
            f"cannot make a Tensor of dtype {target}{implicit}: got {array.dtype} values from "
            f"{array.min()} to {array.max()}, which do not fit. Pass values in "
            f"[{jnp.iinfo(target).min}, {jnp.iinfo(target).max}], or a float dtype."
        )
    return jnp.asarray(array.astype(target, copy=False))


def stored_array(value: Any, what: str) -> jax.Array | np.ndarray:
    """``value`` (a Tensor's data included) as an array fit to outlive any JAX transformation.

    Module state and checkpoints take it: a tracer is refused (see
    :func:`lucid._arrays.as_array` with ``concrete=True``).
    """
    return as_array(value._data if isinstance(value, Tensor) else value, what, concrete=True)


class Tensor:
    """An array with an optional gradient, recorded on a small autograd tape.

    Args:
        data: a ``jax.Array``, a NumPy array, a nested list or a number (or a
            ``Tensor``, whose data is taken without its history). Python floats
            become float32.
        requires_grad: record operations on this Tensor so that
            :meth:`backward` fills its ``.grad``.
        dtype: convert ``data`` to this dtype first.

    Raises:
        TypeError: ``data`` is not numeric, or ``requires_grad`` is asked of a
            non-floating-point Tensor.
        ValueError: integers that do not fit the dtype, e.g. ``2**40`` for
            int32 (JAX keeps integers in 32 bits unless ``jax_enable_x64``
            is on); nothing is wrapped around silently.

    Attributes:
        grad: the accumulated gradient (a ``jax.Array``) of a leaf that
            requires one, or ``None``.

    Mixing with arrays: ``t.data`` is the ``jax.Array``; ``np.asarray(t)``
    gives a NumPy copy. Operators with a NumPy or JAX array on either side
    (``t + array``, ``array * t``) are recorded when ``t`` requires a gradient.
    For that, a Tensor that requires a gradient does not offer itself to JAX
    as an array (``__jax_array__``): JAX's operators then defer to the Tensor,
    and a ``jnp`` function called on it raises ``TypeError`` rather than
    silently computing off the tape (use ``lucid._tensor.apply_jax``, or
    ``t.data`` for the value). A Tensor without a gradient converts as an
    array: ``jnp.asarray(t) is t.data``, and ``jax_array + t`` is a
    ``jax.Array``.

    Example:
        >>> from lucid import Tensor
        >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> y = (x * x).sum()
        >>> y
        Tensor(30., grad=None)
        >>> y.backward()
        >>> x.grad
        Array([[2., 4.],
               [6., 8.]], dtype=float32)
    """

    __slots__ = ("_data", "_requires_grad", "_node", "grad", "__weakref__")
    # NumPy defers binary operators to Tensor (ndarray + Tensor -> Tensor.__radd__).
    __array_ufunc__ = None

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        self._data = _to_jax(data, dtype)
        self._node: _Node | None = None
        self.grad: jax.Array | None = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    @classmethod
    def _from_op(cls, data: jax.Array, node: _Node | None) -> Tensor:
        out = cls.__new__(Tensor)
        out._data = data
        out._node = node
        out.grad = None
        out._requires_grad = node is not None
        return out

    # ------------------------------------------------------------ attributes

    @property
    def data(self) -> jax.Array:
        """The wrapped ``jax.Array``; assigning replaces it in place (no history).

        Assigning accepts anything :class:`Tensor` accepts; the Tensor object
        stays the same, so everyone holding it sees the new value.

        Raises:
            TypeError: on assignment, a traced value (inside ``jax.jit``,
                ``jax.grad``, ...) for a Tensor made outside the
                transformation: it would leak a tracer. Use the pure bridge
                (``Module.pytrees``/``Module.apply``). Nothing changes.
            ValueError: on assignment, integers that do not fit the dtype.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0])
            >>> x.data
            Array([1., 2.], dtype=float32)
            >>> x.data = [3.0, 4.0]
            >>> x
            Tensor([3., 4.], grad=None)
        """
        return self._data

    @data.setter
    def data(self, value: ArrayLike) -> None:
        array = _to_jax(value)
        if not _may_hold(self, array):
            raise TypeError(
                "cannot assign a traced value to the .data of a Tensor that lives outside the JAX "
                "transformation running now (it would leak a tracer); the Tensor is unchanged. "
                + _BRIDGE_HINT
            )
        self._data = array

    @property
    def requires_grad(self) -> bool:
        """Whether operations on this Tensor are recorded for :meth:`backward`.

        Settable on a leaf only.

        Raises:
            TypeError: the new value is not a bool, or ``True`` is asked of a
                non-floating-point Tensor.
            ValueError: the Tensor is not a leaf (use :meth:`detach`).

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0])
            >>> x.requires_grad = True
            >>> (x * 2).requires_grad
            True
            >>> Tensor([1, 2]).requires_grad = True
            Traceback (most recent call last):
            TypeError: only floating-point Tensors can require gradients, got dtype int32.
        """
        return self._requires_grad

    @requires_grad.setter
    def requires_grad(self, value: bool) -> None:
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"requires_grad must be a bool, got {type(value).__name__}.")
        if self._node is not None:
            raise ValueError("requires_grad can only be changed on a leaf Tensor; use .detach() for a new leaf.")
        if value and not jnp.issubdtype(self._data.dtype, jnp.inexact):
            raise TypeError(f"only floating-point Tensors can require gradients, got dtype {self._data.dtype}.")
        self._requires_grad = bool(value)

    @property
    def is_leaf(self) -> bool:
        """``True`` unless this Tensor is the recorded output of an operation.

        Only leaves receive a ``.grad`` from :meth:`backward`.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0], requires_grad=True)
            >>> y = x * 2
            >>> x.is_leaf, y.is_leaf, y.detach().is_leaf
            (True, False, True)
        """
        return self._node is None

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape of the data, a tuple of ints.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[1.0, 2.0, 3.0]]).shape, Tensor(5.0).shape
            ((1, 3), ())
        """
        return tuple(self._data.shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the data (Python floats become float32, ints int32).

        Example:
            >>> import numpy as np
            >>> from lucid import Tensor
            >>> Tensor([1.0]).dtype, Tensor([1, 2]).dtype, Tensor(np.ones(2, np.float16)).dtype
            (dtype('float32'), dtype('int32'), dtype('float16'))
        """
        return self._data.dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions (``len(shape)``).

        Example:
            >>> from lucid import Tensor
            >>> Tensor(3.0).ndim, Tensor([[1.0, 2.0]]).ndim
            (0, 2)
        """
        return self._data.ndim

    def __len__(self) -> int:
        if self.ndim == 0:
            raise TypeError("len() of a 0-d Tensor.")
        return self.shape[0]

    def __iter__(self) -> Iterator[Tensor]:
        return (self[i] for i in range(len(self)))

    def numpy(self) -> np.ndarray:
        """A NumPy copy of the data (never recorded).

        Returns:
            A writable ``np.ndarray`` of the same shape and dtype; changing it
            does not change the Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0], requires_grad=True)
            >>> a = x.numpy()
            >>> a[0] = 5.0
            >>> a, x
            (array([5., 2.], dtype=float32), Tensor([1., 2.], grad=None))
        """
        return np.array(self._data)

    def item(self) -> Any:
        """The value of a one-element Tensor as a Python number.

        Returns:
            A Python ``float``, ``int`` or ``bool``.

        Raises:
            ValueError: the Tensor does not have exactly one element.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1.5, 2.0]).sum().item(), Tensor([[7]]).item()
            (3.5, 7)
            >>> Tensor([1.0, 2.0]).item()
            Traceback (most recent call last):
            ValueError: item() needs a Tensor with one element, got shape (2,).
        """
        if self._data.size != 1:
            raise ValueError(f"item() needs a Tensor with one element, got shape {self.shape}.")
        return self._data.item()

    def detach(self) -> Tensor:
        """A new leaf sharing the data, without history and not requiring a gradient.

        Gradients do not flow through it: it acts as a constant.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0], requires_grad=True)
            >>> c = (x * 3).detach()
            >>> c, c.requires_grad, c.is_leaf
            (Tensor([3., 6.], grad=None), False, True)
            >>> (x * c).sum().backward()  # d(x * c)/dx = c, c held constant
            >>> x.grad
            Array([3., 6.], dtype=float32)
        """
        return Tensor._from_op(self._data, None)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = np.asarray(self._data, dtype=dtype)
        return array.copy() if copy else array

    @property
    def __jax_array__(self) -> Callable[[], jax.Array]:
        # JAX's operators look this attribute up on the right operand and, when
        # it is there, convert the Tensor and compute off the tape. Hidden for
        # Tensors that require a gradient, so that JAX defers to the Tensor's
        # reflected operator instead: `jax_array + t` is then recorded.
        if self._requires_grad:
            raise AttributeError("a Tensor that requires grad is not converted implicitly; use .data")
        return lambda: self._data

    def __bool__(self) -> bool:
        return bool(self._data)

    def __float__(self) -> float:
        return float(self._data)

    def __int__(self) -> int:
        return int(self._data)

    def __repr__(self) -> str:
        return _format(self, "Tensor(")

    # ------------------------------------------------------------ autograd

    def backward(self, gradient: ArrayLike | None = None) -> None:
        """Accumulate the gradient of this Tensor into the ``.grad`` of every leaf it depends on.

        A non-scalar Tensor is seeded with ones when no ``gradient`` is given,
        i.e. this computes the gradient of ``self.sum()``. The graph is kept, so
        ``backward`` may be called again; leaves accumulate. For every leaf
        ``x`` (a vector-Jacobian product, with ``g = gradient``):

        .. math::

            x.\\mathrm{grad} \\leftarrow x.\\mathrm{grad}
                + \\Big(\\frac{\\partial\\,\\mathrm{self}}{\\partial x}\\Big)^{\\!\\top} g

        Args:
            gradient: the cotangent of this Tensor, of its shape; ones if ``None``.

        Raises:
            RuntimeError: this Tensor does not require a gradient.
            ValueError: ``gradient`` has the wrong shape.
            TypeError: the gradient of a Tensor that lives outside a JAX
                transformation would be a tracer (``backward`` inside
                ``jax.jit``); nothing is changed.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0], requires_grad=True)
            >>> y = x * x
            >>> y.backward()  # seeded with ones: the gradient of y.sum(), 2x
            >>> x.grad
            Array([2., 4.], dtype=float32)
            >>> y.backward(gradient=[1.0, 0.0])  # a second call accumulates
            >>> x.grad
            Array([4., 4.], dtype=float32)
        """
        if not self._requires_grad:
            raise RuntimeError(
                "backward() needs a Tensor that requires grad: create the inputs with "
                "requires_grad=True (and not inside lucid.no_grad())."
            )
        if gradient is None:
            seed = jnp.ones_like(self._data)
        else:
            seed = _to_jax(gradient)
            if tuple(seed.shape) != self.shape:
                raise ValueError(f"gradient must have the shape {self.shape} of the Tensor, got {tuple(seed.shape)}.")
            seed = seed.astype(self.dtype)
        cotangents: dict[int, jax.Array] = {id(self): seed}
        leaf_grads: list[tuple[Tensor, jax.Array]] = []
        for tensor in reversed(_topological_order(self)):
            g = cotangents.pop(id(tensor), None)
            if g is None:
                continue
            if tensor._node is None:
                leaf_grads.append((tensor, g))
                continue
            for parent, pg in zip(tensor._node.parents, tensor._node.pullback(g)):
                cotangents[id(parent)] = pg if id(parent) not in cotangents else cotangents[id(parent)] + pg
        if not all(_may_hold(leaf, g) for leaf, g in leaf_grads):
            raise TypeError(
                "backward() inside a JAX transformation would store a traced gradient in the "
                ".grad of a Tensor that lives outside it (a leaked tracer). Use jax.grad on a "
                "pure function instead. " + _BRIDGE_HINT
            )
        for leaf, g in leaf_grads:
            leaf.grad = g if leaf.grad is None else leaf.grad + g

    # ------------------------------------------------------------ operators

    def __add__(self, other: Any) -> Tensor:
        return apply_jax(jnp.add, self, other)

    def __radd__(self, other: Any) -> Tensor:
        return apply_jax(jnp.add, other, self)

    def __sub__(self, other: Any) -> Tensor:
        return apply_jax(jnp.subtract, self, other)

    def __rsub__(self, other: Any) -> Tensor:
        return apply_jax(jnp.subtract, other, self)

    def __mul__(self, other: Any) -> Tensor:
        return apply_jax(jnp.multiply, self, other)

    def __rmul__(self, other: Any) -> Tensor:
        return apply_jax(jnp.multiply, other, self)

    def __truediv__(self, other: Any) -> Tensor:
        return apply_jax(jnp.true_divide, self, other)

    def __rtruediv__(self, other: Any) -> Tensor:
        return apply_jax(jnp.true_divide, other, self)

    def __pow__(self, other: Any) -> Tensor:
        return apply_jax(jnp.power, self, other)

    def __rpow__(self, other: Any) -> Tensor:
        return apply_jax(jnp.power, other, self)

    def __matmul__(self, other: Any) -> Tensor:
        return apply_jax(jnp.matmul, self, other)

    def __rmatmul__(self, other: Any) -> Tensor:
        return apply_jax(jnp.matmul, other, self)

    def __neg__(self) -> Tensor:
        return apply_jax(jnp.negative, self)

    def __getitem__(self, index: Any) -> Tensor:
        index = jax.tree.map(lambda i: i._data if isinstance(i, Tensor) else i, index,
                             is_leaf=lambda i: isinstance(i, Tensor))
        return apply_jax(lambda a: a[index], self)

    def sum(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Sum over ``axis`` (all axes if ``None``): :math:`y = \\sum_i x_i`.

        Recorded on the tape; the gradient of every summed element is 1.

        Args:
            axis: the axis or axes to reduce.
            keepdims: keep the reduced axes with size 1.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
            >>> x.sum(axis=0), x.sum(axis=1, keepdims=True).shape
            (Tensor([4., 6.], grad=None), (2, 1))
            >>> x.sum().backward()
            >>> x.grad
            Array([[1., 1.],
                   [1., 1.]], dtype=float32)
        """
        return apply_jax(lambda a: jnp.sum(a, axis=axis, keepdims=keepdims), self)

    def mean(self, axis: int | tuple[int, ...] | None = None, keepdims: bool = False) -> Tensor:
        """Mean over ``axis`` (all axes if ``None``): :math:`y = \\frac{1}{n}\\sum_{i=1}^{n} x_i`.

        Recorded on the tape; the gradient of every averaged element is
        :math:`1/n`, with :math:`n` the number of elements reduced.

        Args:
            axis: the axis or axes to reduce.
            keepdims: keep the reduced axes with size 1.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
            >>> x.mean(axis=1)
            Tensor([1.5, 3.5], grad=None)
            >>> x.mean().backward()  # n = 4
            >>> x.grad
            Array([[0.25, 0.25],
                   [0.25, 0.25]], dtype=float32)
        """
        return apply_jax(lambda a: jnp.mean(a, axis=axis, keepdims=keepdims), self)

    def reshape(self, *shape: int | tuple[int, ...]) -> Tensor:
        """The same elements in a new shape (``reshape(2, 3)`` or ``reshape((2, 3))``).

        Recorded on the tape: the gradient is reshaped back.

        Args:
            *shape: the new shape; one entry may be ``-1``.

        Returns:
            A Tensor.

        Raises:
            TypeError: the new shape has a different number of elements.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0], requires_grad=True)
            >>> x.reshape(2, 3).shape, x.reshape((3, -1)).shape
            ((2, 3), (3, 2))
            >>> (x.reshape(2, 3) * Tensor([[1.0], [10.0]])).sum().backward()
            >>> x.grad
            Array([ 1.,  1.,  1., 10., 10., 10.], dtype=float32)
        """
        if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
            shape = tuple(shape[0])
        return apply_jax(lambda a: jnp.reshape(a, shape), self)


def _format(tensor: Tensor, prefix: str) -> str:
    def body(value: jax.Array, prefix: str) -> str:
        if is_traced(value):
            return repr(value)
        return np.array2string(np.asarray(value), separator=", ", prefix=prefix, precision=4, floatmode="maxprec_equal")

    grad_prefix = " " * len(prefix) + "grad="
    text = prefix + body(tensor._data, prefix)
    if tensor.dtype != jnp.float32:
        text += f", dtype={tensor.dtype}"
    grad = "None" if tensor.grad is None else body(tensor.grad, grad_prefix)
    return f"{text}, grad={grad})"


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every Tensor ``root`` depends on, each after all of its parents."""
    order: list[Tensor] = []
    seen: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        tensor, parents_done = stack.pop()
        if parents_done:
            order.append(tensor)
            continue
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        stack.append((tensor, True))
        if tensor._node is not None:
            stack.extend((p, False) for p in tensor._node.parents if id(p) not in seen)
    return order


def _is_tensor(value: Any) -> bool:
    return isinstance(value, Tensor)


def apply_jax(fun: Callable[..., Any], *args: Any, has_aux: bool = False) -> Any:
    """Run a pure JAX function on Tensors and record its pullback on the tape.

    ``args`` are pytrees whose leaves may be Tensors; ``fun`` receives them
    with every Tensor replaced by its ``jax.Array``. When gradients are being
    recorded and some Tensor leaf requires one, ``fun`` runs under
    ``jax.vjp`` with respect to exactly those leaves, and the output keeps the
    pullback: the gradient of every lucid operation is JAX's.

    Args:
        fun: a pure function returning one array (or ``(array, aux)`` when
            ``has_aux``).
        *args: its positional arguments (pytrees; Tensor leaves are unwrapped).
        has_aux: ``fun`` also returns auxiliary data, which is returned as is
            and not differentiated.

    Returns:
        The output as a Tensor (requiring a gradient if recorded), or
        ``(Tensor, aux)`` when ``has_aux``.

    Raises:
        TypeError: ``fun`` does not return a single array.

    Example:
        >>> import jax.numpy as jnp
        >>> from lucid import Tensor
        >>> from lucid._tensor import apply_jax
        >>> x = Tensor([0.0, 1.0], requires_grad=True)
        >>> y = apply_jax(jnp.exp, x)
        >>> y
        Tensor([1.0000, 2.7183], grad=None)
        >>> y.backward()
        >>> x.grad.tolist() == y.data.tolist()  # d exp(x) / dx = exp(x)
        True
    """
    leaves, treedef = jax.tree.flatten(args, is_leaf=_is_tensor)
    values = [leaf._data if isinstance(leaf, Tensor) else leaf for leaf in leaves]
    diff = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor) and leaf._requires_grad]
    if not diff or not _grad_enabled.get():
        result = fun(*jax.tree.unflatten(treedef, values))
        out, aux = result if has_aux else (result, None)
        return _wrap(out, None, has_aux, aux)

    def pure(*diff_values: jax.Array) -> Any:
        vals = list(values)
        for i, v in zip(diff, diff_values):
            vals[i] = v
        return fun(*jax.tree.unflatten(treedef, vals))

    if has_aux:
        out, pullback, aux = jax.vjp(pure, *(values[i] for i in diff), has_aux=True)
    else:
        (out, pullback), aux = jax.vjp(pure, *(values[i] for i in diff)), None
    node = _Node(pullback, tuple(leaves[i] for i in diff))
    if isinstance(out, jax.Array) and not jnp.issubdtype(out.dtype, jnp.inexact):
        node = None  # an integer or boolean output has no gradient
    return _wrap(out, node, has_aux, aux)


def _wrap(out: Any, node: _Node | None, has_aux: bool, aux: Any) -> Any:
    if not isinstance(out, jax.Array):
        raise TypeError(f"apply_jax needs a function returning one array, got {type(out).__name__}.")
    tensor = Tensor._from_op(out, node)
    return (tensor, aux) if has_aux else tensor


def assign_in_place(targets: Mapping[str, Tensor], values: Mapping[str, Any], what: str = "state") -> None:
    """Replace the data of Tensors in place, all or none.

    This is how running statistics are updated: the Tensor objects stay the
    same (anyone holding one sees the new values), only their data changes.

    Args:
        targets: Tensors keyed by name.
        values: the new arrays, with (at least) the keys of ``targets``.
        what: how to name the Tensors in an error message.

    Raises:
        TypeError: a new value is a tracer (the call runs inside a JAX
            transformation) and would leak out of it; or, while
            ``Module.apply`` runs, a target is not one of the Tensors it
            swapped in (its update would escape the returned ``new_stats``).
            Nothing is changed.
        KeyError: ``values`` lacks a key of ``targets``; nothing is changed.

    Example:
        >>> import jax.numpy as jnp
        >>> from lucid import Tensor
        >>> from lucid._tensor import assign_in_place
        >>> mean = Tensor([0.0, 0.0])
        >>> assign_in_place({"mean": mean}, {"mean": jnp.array([1.0, 2.0])})
        >>> mean  # the same object, new data
        Tensor([1., 2.], grad=None)
    """
    new = {name: values[name] for name in targets}
    bridged = _bridged.get()
    if bridged is not None:
        outside = sorted(name for name, t in targets.items() if id(t) not in bridged)
        if outside:
            raise TypeError(f"cannot update {what} {outside} inside Module.apply. " + _UNREGISTERED_HINT)
    traced = sorted(name for name, t in targets.items() if not _may_hold(t, new[name]))
    if traced:
        raise TypeError(
            f"cannot update {what} {traced} with traced values: this call runs inside a JAX "
            f"transformation, and storing a tracer would leak it. " + _BRIDGE_HINT
        )
    for name, tensor in targets.items():
        tensor._data = new[name]


def instance_norm(apply: Callable[..., Any], params: Mapping[str, Any], stats: Mapping[str, Any], input_: Any, *,
                  training: bool, momentum: Any, eps: float) -> Tensor:
    """``lucid.nn.functional.instance_norm`` with Tensors: on the tape, running statistics updated in place.

    ``apply`` is ``instance_norm_apply``; ``params`` and ``stats`` hold the
    reference signature's ``weight``/``bias`` and ``running_mean``/``running_var``
    (any of them Tensors). In training, running statistics given as Tensors
    take their new values in place, as in PyTorch; given as arrays, they stay
    unchanged. Nothing changes when the call fails.
    """
    in_place = training and isinstance(stats.get("running_mean"), Tensor)
    if training and stats and in_place != isinstance(stats["running_var"], Tensor):
        raise TypeError(
            "running_mean and running_var must both be Tensors (updated in place) or both arrays "
            f"(left unchanged), got {type(stats['running_mean']).__name__} and {type(stats['running_var']).__name__}."
        )

    def run(params: dict, stats: dict, x: Any) -> tuple[jax.Array, dict]:
        return apply(params, stats, x, training=training, momentum=momentum, eps=eps)

    y, new_stats = apply_jax(run, dict(params), dict(stats), input_, has_aux=True)
    if in_place:
        assign_in_place(stats, new_stats, what="running_mean/running_var")
    return y


# lucid.nn.functional.instance_norm hands its calls with a Tensor argument to this hook.
Tensor.__lucid_function__ = staticmethod(instance_norm)
