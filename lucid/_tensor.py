"""The eager ``Tensor`` facade and its small autograd tape.

A :class:`Tensor` wraps an immutable ``jax.Array`` and, when it requires a
gradient, remembers how it was made. Every operation goes through one
mechanism, :func:`apply_jax`: it runs a pure JAX function on the arrays inside
the Tensors and, when a gradient is needed, runs it under ``jax.vjp`` and keeps
the pullback in a graph node. :meth:`Tensor.backward` walks the nodes in
reverse topological order and calls each pullback, so every gradient is JAX's
own (instance normalization's is the hand-derived rule of ``lucid.nn``); the
tape only routes cotangents.

Graph edges lead to the *node* that made a value (or, for a leaf, to the leaf
Tensor whose ``.grad`` accumulates), not to the Tensor object. So an in-place
operation on a recorded non-leaf (``h += 1``) gives the same object a new node
whose parent is the old one; operations recorded before it keep their edge to
the old node, and since a pullback holds the immutable arrays it was recorded
with, every gradient is the gradient of what was actually computed (where
PyTorch would raise about a modified saved tensor).

Values are read and written through :func:`_value` / :func:`_store`, which
honour a context-local :class:`StateScope`: while ``Module.functional_call``
runs, the module's Tensors read the given pytrees (and writes to them land in
the scope), in that thread and ``contextvars`` context only, so the module
itself is never changed and other threads see its own state.

JAX transformations (``jax.jit``, ``jax.grad``, ``jax.vmap``) trace with
placeholder values ("tracers"). A Tensor may hold one while a traced function
runs, but state that outlives the trace (a leaf's ``.grad``, a module's running
statistics) must never be set to one: :func:`assign_in_place`, in-place
operations, the ``Tensor.data`` and ``Tensor.grad`` setters and
:meth:`Tensor.backward` refuse, and point to ``Module.functional_call``. Inside
a scope, the Tensors it covers take tracers (into the scope, never into the
Tensor).

Thread safety: each Tensor has a lock (made on first use) that guards the
read-modify-write of its ``.grad`` in :meth:`Tensor.backward`, its in-place
operations, and, through :func:`update_in_place`, running statistics.
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

__all__ = ["Tensor", "no_grad", "apply_jax", "assign_in_place", "update_in_place", "snapshot", "StateScope"]

_grad_enabled: contextvars.ContextVar[bool] = contextvars.ContextVar("lucid_grad_enabled", default=True)
_scope: contextvars.ContextVar[StateScope | None] = contextvars.ContextVar("lucid_state_scope", default=None)

_CALL_HINT = (
    "Inside jax.jit/jax.grad/jax.vmap use the pure call instead: "
    "params, stats = module.pytrees(); out, new_stats = module.functional_call(params, stats, x, training=True); "
    "then module.load_pytrees(params, new_stats) outside the transformation."
)
_UNREGISTERED_HINT = (
    "Module.functional_call gives its pytrees to the parameters and buffers of the module and of its "
    "registered submodules only; this state belongs to none of them (is its module kept in a plain "
    "list or dict attribute?). Assign each submodule to an attribute (self.block0 = module) so that "
    "its state is part of module.pytrees() and comes back in new_stats."
)
_LEAF_IN_PLACE = "a leaf Variable that requires grad is being used in an in-place operation."
_FREED = (
    "Trying to backward through the graph a second time: backward() frees the graph it walked "
    "(the pullbacks and the values they saved). Specify retain_graph=True on the first call to "
    "walk it again."
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


class StateScope:
    """Context-local values for a set of Tensors: the state of one ``Module.functional_call``.

    While a scope is active (:meth:`active`), reading a covered Tensor gives the
    scope's value and writing it changes only the scope; other threads and
    contexts see the Tensor's own data. Scopes nest: an inner one is searched
    first. ``Module`` keeps three more context-local things here: the modules
    the call covers, their training modes, and parameters or buffers that
    ``forward`` reassigns (``slots``, keyed by ``(id(module), name)``).

    Args:
        values: ``(tensor, value)`` pairs.
        modules: the modules whose state the scope stands in for.
        modes: training mode per module (by ``id``); a module not in it reads its own.

    Example:
        >>> import jax.numpy as jnp
        >>> from lucid import Tensor
        >>> from lucid._tensor import StateScope
        >>> t = Tensor([1.0, 2.0])
        >>> with StateScope([(t, jnp.array([5.0, 6.0]))]).active():
        ...     t += 1  # lands in the scope
        ...     inside = t.tolist()
        >>> inside, t.tolist()
        ([6.0, 7.0], [1.0, 2.0])
    """

    __slots__ = ("values", "tensors", "modules", "modes", "slots", "parent")

    def __init__(self, values: Iterable[tuple[Tensor, jax.Array]], modules: Iterable[Any] = (),
                 modes: Mapping[int, bool] | None = None) -> None:
        pairs = list(values)
        # Keyed by id; the Tensors are kept alive, so no id is reused while the scope lives.
        self.tensors = [t for t, _ in pairs]
        self.values = {id(t): v for t, v in pairs}
        self.modules = {id(m): m for m in modules}
        self.modes = dict(modes or {})
        self.slots: dict[tuple[int, str], Any] = {}
        self.parent: StateScope | None = None

    @contextlib.contextmanager
    def active(self) -> Iterator[StateScope]:
        """Make this scope the innermost one in the current context while the block runs."""
        self.parent = _scope.get()
        token = _scope.set(self)
        try:
            yield self
        finally:
            _scope.reset(token)

    @staticmethod
    def current() -> StateScope | None:
        """The innermost active scope of the current context, or ``None``."""
        return _scope.get()

    @staticmethod
    def covering(key: int, field: str = "values") -> StateScope | None:
        """The innermost active scope whose ``field`` (``values``, ``modules``, ``modes``, ``slots``) has ``key``."""
        layer = _scope.get()
        while layer is not None:
            if key in getattr(layer, field):
                return layer
            layer = layer.parent
        return None


def _value(tensor: Tensor) -> jax.Array:
    """The value of ``tensor`` in the current context (a scope's, else its own data)."""
    layer = _scope.get()
    while layer is not None:
        value = layer.values.get(id(tensor))
        if value is not None:
            return value
        layer = layer.parent
    return tensor._data


def _store(tensor: Tensor, value: jax.Array) -> None:
    """Set the value of ``tensor`` in the current context (into the covering scope, if any)."""
    layer = StateScope.covering(id(tensor)) if _scope.get() is not None else None
    if layer is not None:
        layer.values[id(tensor)] = value
    else:
        tensor._data = value


def _may_hold(tensor: Tensor, value: Any) -> bool:
    """Whether storing ``value`` in ``tensor`` keeps every tracer inside its transformation.

    A concrete value is always fine; a tracer only in a Tensor that already
    holds one (it was made inside the transformation) or that an active scope
    covers (the value then lives in the scope, which ends with the call).
    """
    if not is_traced(value) or is_traced(tensor._data):
        return True
    return StateScope.covering(id(tensor)) is not None


def _may_keep_grad(tensor: Tensor, grad: Any) -> bool:
    """Whether ``grad`` may be stored in ``tensor.grad``: as :func:`_may_hold`, but no scope covers
    ``.grad`` (it is never scoped), so a tracer only in a Tensor made inside the transformation."""
    return not is_traced(grad) or is_traced(tensor._data)


_LOCK_GUARD = threading.Lock()


def _lock_of(tensor: Tensor) -> threading.RLock:
    lock = tensor._lock
    if lock is None:
        with _LOCK_GUARD:  # two threads asking at once get the same lock
            lock = tensor._lock
            if lock is None:
                lock = tensor._lock = threading.RLock()
    return lock


class _locked:
    """Hold the locks of ``tensors`` (in one global order, so two holders never deadlock).

    Tensors an active scope covers are skipped: their values are context-local.
    """

    __slots__ = ("locks",)

    def __init__(self, tensors: Iterable[Tensor]) -> None:
        scoped = _scope.get() is not None
        unique = {id(t): t for t in tensors if not (scoped and StateScope.covering(id(t)))}
        self.locks = [_lock_of(unique[key]) for key in sorted(unique)]

    def __enter__(self) -> None:
        for lock in self.locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self.locks):
            lock.release()


class _Node:
    """How a non-leaf value was made: the pullback of its op (``None`` once the graph is
    freed) and, per pullback output, the parent's node or the leaf Tensor that accumulates it."""

    __slots__ = ("pullback", "edges")

    def __init__(self, pullback: Callable, edges: tuple[_Node | Tensor, ...]) -> None:
        self.pullback: Callable | None = pullback
        self.edges = edges


def _to_jax(data: Any, dtype: Any = None) -> jax.Array:
    """Anything :class:`Tensor` accepts, as a ``jax.Array`` (of ``dtype`` if given).

    Python floats and nested lists of them become float32, as in PyTorch;
    integers that do not fit the target dtype raise instead of wrapping.
    """
    if isinstance(data, Tensor):
        data = _value(data)
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
    return as_array(_value(value) if isinstance(value, Tensor) else value, what, concrete=True)


def _shape_of(value: Any) -> tuple[int, ...]:
    if isinstance(value, Tensor):
        return value.shape
    shape = getattr(value, "shape", None)
    return tuple(shape) if shape is not None else np.shape(value)


def _axes(dim: Any, axis: Any, keepdim: bool, keepdims: bool | None, what: str) -> tuple[Any, bool]:
    """A reduction's axes and keepdims from PyTorch's (``dim``, ``keepdim``) or NumPy's spelling."""
    if axis is not None:
        if dim is not None:
            raise TypeError(f"{what}() got both dim and axis; pass one (axis is NumPy's name for dim).")
        dim = axis
    if keepdims is not None:
        if keepdim and not keepdims:
            raise TypeError(f"{what}() got keepdim=True and keepdims=False; pass one.")
        keepdim = keepdims
    return (tuple(dim) if isinstance(dim, list) else dim), bool(keepdim)


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
        grad: the accumulated gradient (a Tensor of the same shape and dtype)
            of a leaf that requires one, or ``None``.

    In place, as in PyTorch: ``+=``, ``-=``, ``*=``, ``/=`` and the methods
    ending in ``_`` (:meth:`add_`, :meth:`zero_`, ...) change this object and
    return it. Outside :class:`no_grad`, a leaf that requires a gradient
    refuses them (``RuntimeError``); on a non-leaf they are recorded as a new
    node of the same object, and what was recorded before keeps the values it
    saw (see the module docstring). A failed in-place call changes nothing.
    Unlike PyTorch's, lucid's arrays are immutable: :meth:`view` and indexing
    return new Tensors, and changing one in place never changes another.

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
        >>> from lucid import Tensor, no_grad
        >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
        >>> y = (x * x).sum()
        >>> y
        Tensor(30., grad=None)
        >>> y.backward()
        >>> x.grad
        Tensor([[2., 4.],
                [6., 8.]], grad=None)
        >>> with no_grad():  # a gradient step, in place
        ...     x -= 0.5 * x.grad
        >>> x
        Tensor([[0., 0.],
                [0., 0.]], grad=[[2., 4.],
                                 [6., 8.]])
    """

    __slots__ = ("_data", "_requires_grad", "_node", "_grad", "_lock", "__weakref__")
    # NumPy defers binary operators to Tensor (ndarray + Tensor -> Tensor.__radd__).
    __array_ufunc__ = None

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None) -> None:
        self._data = _to_jax(data, dtype)
        self._node: _Node | None = None
        self._grad: Tensor | None = None
        self._lock: threading.RLock | None = None
        self._requires_grad = False
        self.requires_grad = requires_grad

    def __getstate__(self) -> dict[str, Any]:
        # For copy.deepcopy (of a module, say): a lock is per object, never copied.
        return {name: getattr(self, name) for name in ("_data", "_requires_grad", "_node", "_grad")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._lock = None

    @classmethod
    def _from_op(cls, data: jax.Array, node: _Node | None) -> Tensor:
        out = cls.__new__(Tensor)
        out._data = data
        out._node = node
        out._grad = None
        out._lock = None
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
                transformation: it would leak a tracer. Use
                ``Module.functional_call``. Nothing changes.
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
        return _value(self)

    @data.setter
    def data(self, value: ArrayLike) -> None:
        array = _to_jax(value)
        if not _may_hold(self, array):
            raise TypeError(
                "cannot assign a traced value to the .data of a Tensor that lives outside the JAX "
                "transformation running now (it would leak a tracer); the Tensor is unchanged. " + _CALL_HINT
            )
        _store(self, array)

    @property
    def grad(self) -> Tensor | None:
        """The gradient accumulated by :meth:`backward` (leaves only), a Tensor, or ``None``.

        Accumulation is in place: the same ``grad`` Tensor takes each new sum
        (thread-safe: concurrent ``backward`` calls lose no contribution).
        Assign ``None`` to reset it, or a Tensor of this Tensor's shape and dtype.

        Raises:
            TypeError: on assignment, neither a Tensor nor ``None`` (wrap an
                array as ``lucid.Tensor(array)``), another dtype, or a traced
                value for a Tensor made outside the transformation.
            ValueError: on assignment, another shape.

        Example:
            >>> from lucid import Tensor
            >>> w = Tensor([1.0, 2.0], requires_grad=True)
            >>> (w * 3).sum().backward()
            >>> w.grad
            Tensor([3., 3.], grad=None)
            >>> w.grad.zero_()
            Tensor([0., 0.], grad=None)
            >>> w.grad = None
        """
        return self._grad

    @grad.setter
    def grad(self, value: Tensor | None) -> None:
        if value is not None:
            if not isinstance(value, Tensor):
                raise TypeError(
                    f"assigned grad expected to be a Tensor or None but got {type(value).__name__}; "
                    f"wrap an array as lucid.Tensor(array)."
                )
            if value.shape != self.shape:
                raise ValueError(f"assigned grad has shape {value.shape}, the Tensor has shape {self.shape}.")
            if value.dtype != self.dtype:
                raise TypeError(f"assigned grad has dtype {value.dtype}, the Tensor has dtype {self.dtype}.")
            if not _may_keep_grad(self, _value(value)):
                raise TypeError("cannot assign a traced gradient to a Tensor made outside the transformation. "
                                + _CALL_HINT)
        self._grad = value

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
        return tuple(_value(self).shape)

    @property
    def dtype(self) -> np.dtype:
        """The dtype of the data (Python floats become float32, ints int32).

        Example:
            >>> import numpy as np
            >>> from lucid import Tensor
            >>> Tensor([1.0]).dtype, Tensor([1, 2]).dtype, Tensor(np.ones(2, np.float16)).dtype
            (dtype('float32'), dtype('int32'), dtype('float16'))
        """
        return _value(self).dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions (``len(shape)``).

        Example:
            >>> from lucid import Tensor
            >>> Tensor(3.0).ndim, Tensor([[1.0, 2.0]]).ndim
            (0, 2)
        """
        return _value(self).ndim

    def size(self, dim: int | None = None) -> tuple[int, ...] | int:
        """The shape (PyTorch's name), or the size of dimension ``dim``.

        Args:
            dim: a dimension (negative counts from the end), or ``None``.

        Returns:
            The shape as a tuple, or one int.

        Raises:
            IndexError: ``dim`` is out of range.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0, 3.0]])
            >>> x.size(), x.size(1), x.size(-2)
            ((1, 3), 3, 1)
        """
        if dim is None:
            return self.shape
        if not -self.ndim <= dim < self.ndim:
            raise IndexError(f"Dimension out of range (expected to be in range of [{-self.ndim}, "
                             f"{self.ndim - 1}], but got {dim})")
        return self.shape[dim]

    def dim(self) -> int:
        """The number of dimensions (PyTorch's name for :attr:`ndim`).

        Returns:
            An int.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[1.0, 2.0]]).dim()
            2
        """
        return self.ndim

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
        return np.array(_value(self))

    def tolist(self) -> Any:
        """The data as (nested lists of) Python numbers; a 0-d Tensor gives one number.

        Returns:
            A list, or a Python ``float``/``int``/``bool``.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[1.0, 2.5]]).tolist(), Tensor(3).tolist()
            ([[1.0, 2.5]], 3)
        """
        return np.asarray(_value(self)).tolist()

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
        value = _value(self)
        if value.size != 1:
            raise ValueError(f"item() needs a Tensor with one element, got shape {self.shape}.")
        return value.item()

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
            Tensor([3., 6.], grad=None)
        """
        return Tensor._from_op(_value(self), None)

    def clone(self) -> Tensor:
        """A copy, recorded on the tape (the gradient flows back to this Tensor).

        Returns:
            A Tensor; changing it in place leaves this one unchanged.

        Example:
            >>> from lucid import Tensor, no_grad
            >>> x = Tensor([1.0, 2.0], requires_grad=True)
            >>> y = x.clone()
            >>> (y * y).sum().backward()
            >>> x.grad
            Tensor([2., 4.], grad=None)
            >>> with no_grad():
            ...     y += 1
            >>> y, x
            (Tensor([2., 3.], grad=None), Tensor([1., 2.], grad=[2., 4.]))
        """
        return apply_jax(lambda a: a, self)

    def to(self, dtype: Any) -> Tensor:
        """This Tensor in another dtype (itself if it has that dtype already), recorded on the tape.

        Floating-point casts pass the gradient back (cast to this dtype);
        an integer result has no gradient.

        Args:
            dtype: a dtype (``jnp.bfloat16``, ``np.float32``, ``"float16"``), or
                a Tensor whose dtype to take.

        Returns:
            A Tensor.

        Raises:
            TypeError: ``dtype`` is not a dtype (lucid has no devices to move
                to: place arrays with ``jax.device_put``).

        Example:
            >>> import jax.numpy as jnp
            >>> from lucid import Tensor
            >>> x = Tensor([1.5, 2.5], requires_grad=True)
            >>> h = x.to(jnp.bfloat16)
            >>> h.dtype, x.to(jnp.float32) is x, x.to("int32")
            (dtype(bfloat16), True, Tensor([1, 2], dtype=int32, grad=None))
            >>> (h * h).to(jnp.float32).sum().backward()
            >>> x.grad
            Tensor([3., 5.], grad=None)
        """
        if isinstance(dtype, Tensor):
            dtype = dtype.dtype
        try:
            target = jax.dtypes.canonicalize_dtype(jnp.dtype(dtype))
        except TypeError as e:
            raise TypeError(
                f"to() takes a dtype (e.g. jnp.float32 or 'bfloat16') or a Tensor, got {dtype!r}; "
                f"lucid has no devices to move to: place arrays with jax.device_put."
            ) from e
        if target == self.dtype:
            return self
        return apply_jax(lambda a: a.astype(target), self)

    def float(self) -> Tensor:
        """This Tensor as float32 (``self.to(jnp.float32)``), recorded on the tape.

        Returns:
            A Tensor (itself if it is float32 already).

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1, 2]).float()
            Tensor([1., 2.], grad=None)
        """
        return self.to(jnp.float32)

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = np.asarray(_value(self), dtype=dtype)
        return array.copy() if copy else array

    @property
    def __jax_array__(self) -> Callable[[], jax.Array]:
        # JAX's operators look this attribute up on the right operand and, when
        # it is there, convert the Tensor and compute off the tape. Hidden for
        # Tensors that require a gradient, so that JAX defers to the Tensor's
        # reflected operator instead: `jax_array + t` is then recorded.
        if self._requires_grad:
            raise AttributeError("a Tensor that requires grad is not converted implicitly; use .data")
        return lambda: _value(self)

    def __bool__(self) -> bool:
        return bool(_value(self))

    def __float__(self) -> float:
        return float(_value(self))

    def __int__(self) -> int:
        return int(_value(self))

    def __repr__(self) -> str:
        return _format(self, "Tensor(")

    # ------------------------------------------------------------ autograd

    def backward(self, gradient: ArrayLike | None = None, retain_graph: bool = False) -> None:
        """Accumulate the gradient of this Tensor into the ``.grad`` of every leaf it depends on.

        A non-scalar Tensor is seeded with ones when no ``gradient`` is given,
        i.e. this computes the gradient of ``self.sum()``. For every leaf
        ``x`` (a vector-Jacobian product, with ``g = gradient``):

        .. math::

            x.\\mathrm{grad} \\leftarrow x.\\mathrm{grad}
                + \\Big(\\frac{\\partial\\,\\mathrm{self}}{\\partial x}\\Big)^{\\!\\top} g

        As in PyTorch, the graph is freed afterwards (its pullbacks and the
        values they saved), unless ``retain_graph``; walking a freed part
        again raises. Accumulation into a ``.grad`` is thread-safe.

        Args:
            gradient: the cotangent of this Tensor, of its shape; ones if ``None``.
            retain_graph: keep the graph, so that ``backward`` may walk it again
                (the leaves accumulate again).

        Raises:
            RuntimeError: this Tensor does not require a gradient, or the graph
                was freed by an earlier ``backward``; nothing is changed.
            ValueError: ``gradient`` has the wrong shape.
            TypeError: the gradient of a Tensor that lives outside a JAX
                transformation would be a tracer (``backward`` inside
                ``jax.jit``); nothing is changed.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 2.0], requires_grad=True)
            >>> y = x * x
            >>> y.backward(retain_graph=True)  # seeded with ones: the gradient of y.sum(), 2x
            >>> x.grad
            Tensor([2., 4.], grad=None)
            >>> y.backward(gradient=[1.0, 0.0])  # a second walk accumulates; this one frees the graph
            >>> x.grad
            Tensor([4., 4.], grad=None)
            >>> y.backward()
            Traceback (most recent call last):
            RuntimeError: Trying to backward through the graph a second time: ...
        """
        if not self._requires_grad:
            raise RuntimeError(
                "backward() needs a Tensor that requires grad: create the inputs with "
                "requires_grad=True (and not inside lucid.no_grad())."
            )
        value = _value(self)
        if gradient is None:
            seed = jnp.ones_like(value)
        else:
            seed = _to_jax(gradient)
            if tuple(seed.shape) != self.shape:
                raise ValueError(f"gradient must have the shape {self.shape} of the Tensor, got {tuple(seed.shape)}.")
            seed = seed.astype(self.dtype)
        leaf_grads: dict[int, tuple[Tensor, jax.Array]] = {}
        order = [] if self._node is None else _graph(self._node)
        if self._node is None:
            leaf_grads[id(self)] = (self, seed)
        cotangents: dict[int, jax.Array] = {id(self._node): seed}
        for node in order:
            g = cotangents.pop(id(node), None)
            if g is None:
                continue
            pullback = node.pullback  # read once: another thread may free it meanwhile
            if pullback is None:
                raise RuntimeError(_FREED)
            for edge, pg in zip(node.edges, pullback(g)):
                if isinstance(edge, Tensor):
                    previous = leaf_grads.get(id(edge))
                    leaf_grads[id(edge)] = (edge, pg if previous is None else previous[1] + pg)
                else:
                    previous = cotangents.get(id(edge))
                    cotangents[id(edge)] = pg if previous is None else previous + pg
        if not all(_may_keep_grad(leaf, g) for leaf, g in leaf_grads.values()):
            raise TypeError(
                "backward() inside a JAX transformation would store a traced gradient in the "
                ".grad of a Tensor that lives outside it (a leaked tracer). Use jax.grad on a "
                "pure function instead. " + _CALL_HINT
            )
        for leaf, g in leaf_grads.values():
            with _lock_of(leaf):
                if leaf._grad is None:
                    leaf._grad = Tensor._from_op(g, None)
                else:
                    leaf._grad._data = leaf._grad._data + g
        if not retain_graph:
            for node in order:
                node.pullback = None

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
        index = jax.tree.map(lambda i: _value(i) if isinstance(i, Tensor) else i, index,
                             is_leaf=lambda i: isinstance(i, Tensor))
        return apply_jax(lambda a: a[index], self)

    # ------------------------------------------------------------ in place

    def _in_place(self, fun: Callable[..., jax.Array], *operands: Any, what: str, same_kind: bool = True,
                  broadcast: tuple[Any, ...] | None = None) -> Tensor:
        """Give this Tensor the value ``fun(self, *operands)``, recorded when gradients are.

        ``broadcast`` are the operands whose shapes must broadcast to this
        Tensor's (all of them by default). Everything is checked before
        anything changes.
        """
        if self._requires_grad and self._node is None and _grad_enabled.get():
            raise RuntimeError(_LEAF_IN_PLACE)
        for operand in operands if broadcast is None else broadcast:
            shape = _shape_of(operand)
            try:
                fits = np.broadcast_shapes(shape, self.shape) == self.shape
            except ValueError:
                fits = False
            if not fits:
                raise ValueError(f"{what}: the operand of shape {shape} does not broadcast to the "
                                 f"Tensor's shape {self.shape}; the Tensor is unchanged.")
        target = self.dtype
        with _locked((self,)):  # the read and the write, one step (none inside a functional_call's scope)
            out = apply_jax(fun, self, *operands)
            if same_kind and not jnp.can_cast(out.dtype, target, casting="same_kind"):
                raise TypeError(f"{what}: the result type {out.dtype} can't be cast to the Tensor's dtype "
                                f"{target}; the Tensor is unchanged.")
            if out.dtype != target:
                out = out.to(target)
            value = _value(out)
            if not _may_hold(self, value):
                raise TypeError(
                    f"{what} inside a JAX transformation would store a traced value in a Tensor that "
                    f"lives outside it (a leaked tracer); the Tensor is unchanged. " + _CALL_HINT
                )
            if out._node is not None:  # recorded: the same object, a new node
                self._node, self._requires_grad = out._node, True
            _store(self, value)
        return self

    def __iadd__(self, other: Any) -> Tensor:
        return self._in_place(jnp.add, other, what="+=")

    def __isub__(self, other: Any) -> Tensor:
        return self._in_place(jnp.subtract, other, what="-=")

    def __imul__(self, other: Any) -> Tensor:
        return self._in_place(jnp.multiply, other, what="*=")

    def __itruediv__(self, other: Any) -> Tensor:
        return self._in_place(jnp.true_divide, other, what="/=")

    def add_(self, other: Any, *, alpha: Any = 1) -> Tensor:
        """In place: ``self += alpha * other``; returns this Tensor.

        Args:
            other: a Tensor, array or number broadcastable to this Tensor's shape.
            alpha: the factor of ``other``.

        Returns:
            This Tensor.

        Raises:
            RuntimeError: this is a leaf that requires a gradient, outside :class:`no_grad`.
            ValueError: ``other`` does not broadcast to this Tensor's shape.
            TypeError: the result's dtype cannot be cast to this Tensor's
                (e.g. a float into an int Tensor).

        Example:
            >>> from lucid import Tensor, no_grad
            >>> w = Tensor([1.0, 2.0], requires_grad=True)
            >>> (w * w).sum().backward()
            >>> with no_grad():
            ...     w.add_(w.grad, alpha=-0.25)  # an SGD step
            Tensor([0.5, 1.0], grad=[2., 4.])
            >>> w.add_(1.0)
            Traceback (most recent call last):
            RuntimeError: a leaf Variable that requires grad is being used in an in-place operation.
        """
        return self._in_place(lambda a, b: a + alpha * b, other, what="add_")

    def sub_(self, other: Any, *, alpha: Any = 1) -> Tensor:
        """In place: ``self -= alpha * other``; returns this Tensor (as :meth:`add_`).

        Args:
            other: a Tensor, array or number broadcastable to this Tensor's shape.
            alpha: the factor of ``other``.

        Returns:
            This Tensor.

        Raises:
            RuntimeError, ValueError, TypeError: as :meth:`add_`.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[1.0, 2.0], [3.0, 4.0]]).sub_(Tensor([1.0, 2.0]), alpha=2)
            Tensor([[-1., -2.],
                    [ 1.,  0.]], grad=None)
        """
        return self._in_place(lambda a, b: a - alpha * b, other, what="sub_")

    def mul_(self, other: Any) -> Tensor:
        """In place: ``self *= other``; returns this Tensor (as :meth:`add_`).

        Args:
            other: a Tensor, array or number broadcastable to this Tensor's shape.

        Returns:
            This Tensor.

        Raises:
            RuntimeError, ValueError, TypeError: as :meth:`add_`.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1.0, 2.0]).mul_(3)
            Tensor([3., 6.], grad=None)
        """
        return self._in_place(jnp.multiply, other, what="mul_")

    def div_(self, other: Any) -> Tensor:
        """In place: ``self /= other``; returns this Tensor (as :meth:`add_`).

        Args:
            other: a Tensor, array or number broadcastable to this Tensor's shape.

        Returns:
            This Tensor.

        Raises:
            RuntimeError, ValueError: as :meth:`add_`.
            TypeError: this Tensor has an integer dtype (true division gives floats).

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1.0, 2.0]).div_(Tensor([2.0, 8.0]))
            Tensor([0.50, 0.25], grad=None)
        """
        return self._in_place(jnp.true_divide, other, what="div_")

    def clamp_(self, min: Any = None, max: Any = None) -> Tensor:  # noqa: A002 (PyTorch's names)
        """In place: :meth:`clamp`; returns this Tensor.

        Args:
            min: the lower bound, or ``None``.
            max: the upper bound, or ``None``.

        Returns:
            This Tensor.

        Raises:
            RuntimeError, ValueError: as :meth:`add_`.
            TypeError: neither bound is given.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([-1.0, 0.5, 2.0]).clamp_(0.0, 1.0)
            Tensor([0.0, 0.5, 1.0], grad=None)
        """
        _check_bounds(min, max)
        return self._in_place(_clamp, min, max, what="clamp_",
                              broadcast=tuple(b for b in (min, max) if b is not None))

    def zero_(self) -> Tensor:
        """In place: every element 0; returns this Tensor.

        Returns:
            This Tensor.

        Raises:
            RuntimeError: as :meth:`add_`.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1.0, 2.0]).zero_()
            Tensor([0., 0.], grad=None)
        """
        return self._in_place(jnp.zeros_like, what="zero_")

    def fill_(self, value: Any) -> Tensor:
        """In place: every element ``value`` (cast to this Tensor's dtype); returns this Tensor.

        Args:
            value: a number or a 0-d Tensor (whose gradient is recorded).

        Returns:
            This Tensor.

        Raises:
            RuntimeError: as :meth:`add_`.
            ValueError: ``value`` has dimensions.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1, 2, 3]).fill_(7)
            Tensor([7, 7, 7], dtype=int32, grad=None)
        """
        if _shape_of(value) != ():
            raise ValueError(f"fill_ takes a number or a 0-d Tensor, got shape {_shape_of(value)}; "
                             f"use copy_ for an array.")
        return self._in_place(lambda a, v: jnp.full_like(a, v), value, what="fill_", same_kind=False)

    def copy_(self, src: Any) -> Tensor:
        """In place: the values of ``src`` (broadcast, cast to this Tensor's dtype); returns this Tensor.

        Args:
            src: a Tensor, array or number broadcastable to this Tensor's
                shape (its gradient is recorded).

        Returns:
            This Tensor.

        Raises:
            RuntimeError, ValueError: as :meth:`add_`.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[0.0, 0.0], [0.0, 0.0]]).copy_(Tensor([1.0, 2.0]))
            Tensor([[1., 2.],
                    [1., 2.]], grad=None)
        """
        return self._in_place(lambda a, s: jnp.broadcast_to(s, a.shape).astype(a.dtype), src, what="copy_",
                              same_kind=False)

    # ------------------------------------------------------------ math

    def exp(self) -> Tensor:
        """:math:`e^x`, elementwise, recorded on the tape.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([0.0, 1.0], requires_grad=True)
            >>> y = x.exp()
            >>> y.sum().backward()
            >>> y, x.grad  # d e^x / dx = e^x
            (Tensor([1.0000, 2.7183], grad=None), Tensor([1.0000, 2.7183], grad=None))
        """
        return apply_jax(jnp.exp, self)

    def log(self) -> Tensor:
        """The natural logarithm, elementwise, recorded on the tape.

        Returns:
            A Tensor (``nan`` below 0, ``-inf`` at 0).

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([1.0, 4.0], requires_grad=True)
            >>> x.log().sum().backward()
            >>> x.grad  # 1 / x
            Tensor([1.00, 0.25], grad=None)
        """
        return apply_jax(jnp.log, self)

    def sqrt(self) -> Tensor:
        """The square root, elementwise, recorded on the tape.

        Returns:
            A Tensor (``nan`` below 0).

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([4.0, 9.0], requires_grad=True)
            >>> y = x.sqrt()
            >>> y.sum().backward()
            >>> y, x.grad  # 1 / (2 sqrt x)
            (Tensor([2., 3.], grad=None), Tensor([0.2500, 0.1667], grad=None))
        """
        return apply_jax(jnp.sqrt, self)

    def abs(self) -> Tensor:
        """:math:`|x|`, elementwise, recorded on the tape; the gradient is ``sign(x)`` (0 at 0, as PyTorch).

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([-2.0, 0.0, 3.0], requires_grad=True)
            >>> x.abs().sum().backward()
            >>> x.grad
            Tensor([-1.,  0.,  1.], grad=None)
        """
        return apply_jax(lambda a: a * jnp.sign(a), self)

    def clamp(self, min: Any = None, max: Any = None) -> Tensor:  # noqa: A002 (PyTorch's names)
        """Each element limited to ``[min, max]`` (``min(max(x, min), max)``), recorded on the tape.

        As in PyTorch, the gradient passes where ``min <= x <= max`` (bounds
        included) and goes to a Tensor bound elsewhere.

        Args:
            min: the lower bound (a number, array or Tensor), or ``None``.
            max: the upper bound, or ``None``.

        Returns:
            A Tensor.

        Raises:
            TypeError: neither bound is given.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
            >>> y = x.clamp(min=0.0, max=1.0)
            >>> y.sum().backward()
            >>> y, x.grad
            (Tensor([0.0, 0.0, 0.5, 1.0], grad=None), Tensor([0., 1., 1., 0.], grad=None))
        """
        _check_bounds(min, max)
        return apply_jax(_clamp, self, min, max)

    def sum(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False, *,
            axis: int | tuple[int, ...] | None = None, keepdims: bool | None = None) -> Tensor:
        """Sum over ``dim`` (all dimensions if ``None``): :math:`y = \\sum_i x_i`.

        Recorded on the tape; the gradient of every summed element is 1.

        Args:
            dim: the dimension or dimensions to reduce (``axis``: NumPy's name).
            keepdim: keep the reduced dimensions with size 1 (``keepdims``: NumPy's name).
            axis: the same as ``dim``.
            keepdims: the same as ``keepdim``.

        Returns:
            A Tensor.

        Raises:
            TypeError: both ``dim`` and ``axis`` are given.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
            >>> x.sum(dim=0), x.sum(1, keepdim=True).shape, x.sum(axis=(0, 1))
            (Tensor([4., 6.], grad=None), (2, 1), Tensor(10., grad=None))
            >>> x.sum().backward()
            >>> x.grad
            Tensor([[1., 1.],
                    [1., 1.]], grad=None)
        """
        dim, keepdim = _axes(dim, axis, keepdim, keepdims, "sum")
        return apply_jax(lambda a: jnp.sum(a, axis=dim, keepdims=keepdim), self)

    def mean(self, dim: int | tuple[int, ...] | None = None, keepdim: bool = False, *,
             axis: int | tuple[int, ...] | None = None, keepdims: bool | None = None) -> Tensor:
        """Mean over ``dim`` (all dimensions if ``None``): :math:`y = \\frac{1}{n}\\sum_{i=1}^{n} x_i`.

        Recorded on the tape; the gradient of every averaged element is
        :math:`1/n`, with :math:`n` the number of elements reduced.

        Args:
            dim: the dimension or dimensions to reduce (``axis``: NumPy's name).
            keepdim: keep the reduced dimensions with size 1 (``keepdims``: NumPy's name).
            axis: the same as ``dim``.
            keepdims: the same as ``keepdim``.

        Returns:
            A Tensor.

        Raises:
            TypeError: both ``dim`` and ``axis`` are given.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
            >>> x.mean(dim=1), x.mean(axis=0, keepdims=True)
            (Tensor([1.5, 3.5], grad=None), Tensor([[2., 3.]], grad=None))
            >>> x.mean().backward()  # n = 4
            >>> x.grad
            Tensor([[0.25, 0.25],
                    [0.25, 0.25]], grad=None)
        """
        dim, keepdim = _axes(dim, axis, keepdim, keepdims, "mean")
        return apply_jax(lambda a: jnp.mean(a, axis=dim, keepdims=keepdim), self)

    def var(self, dim: int | tuple[int, ...] | None = None, unbiased: bool | None = None, keepdim: bool = False,
            *, correction: int | None = None, axis: int | tuple[int, ...] | None = None,
            keepdims: bool | None = None) -> Tensor:
        """Variance over ``dim`` (all dimensions if ``None``), as PyTorch: unbiased by default.

        :math:`y = \\frac{1}{n - c}\\sum_{i=1}^{n} (x_i - \\bar{x})^2` with
        :math:`c` the ``correction`` (1 by default; ``unbiased=False`` is
        ``correction=0``). Recorded on the tape.

        Args:
            dim: the dimension or dimensions to reduce (``axis``: NumPy's
                name); a bool here is PyTorch's older ``var(unbiased)``.
            unbiased: ``True`` for ``correction=1``, ``False`` for 0.
            keepdim: keep the reduced dimensions with size 1 (``keepdims``: NumPy's name).
            correction: subtracted from ``n`` in the denominator.
            axis: the same as ``dim``.
            keepdims: the same as ``keepdim``.

        Returns:
            A Tensor.

        Raises:
            TypeError: both ``dim`` and ``axis``, or both ``unbiased`` and ``correction``.

        Example:
            >>> from lucid import Tensor
            >>> x = Tensor([[1.0, 2.0, 6.0], [2.0, 2.0, 2.0]], requires_grad=True)
            >>> x.var(dim=1), x.var(1, unbiased=False), x.var(dim=1, correction=0, keepdim=True).shape
            (Tensor([7., 0.], grad=None), Tensor([4.6667, 0.0000], grad=None), (2, 1))
            >>> x.var(dim=1).sum().backward()  # 2 (x - mean) / (n - 1)
            >>> x.grad
            Tensor([[-2., -1.,  3.],
                    [ 0.,  0.,  0.]], grad=None)
        """
        if isinstance(dim, bool):  # PyTorch's var(unbiased)
            dim, unbiased = None, dim if unbiased is None else unbiased
        if unbiased is not None and correction is not None:
            raise TypeError("var() got both unbiased and correction; pass one.")
        ddof = correction if correction is not None else (0 if unbiased is False else 1)
        dim, keepdim = _axes(dim, axis, keepdim, keepdims, "var")
        return apply_jax(lambda a: jnp.var(a, axis=dim, ddof=ddof, keepdims=keepdim), self)

    # ------------------------------------------------------------ shapes

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
            Tensor([ 1.,  1.,  1., 10., 10., 10.], grad=None)
        """
        if len(shape) == 1 and not isinstance(shape[0], numbers.Integral):
            shape = tuple(shape[0])
        return apply_jax(lambda a: jnp.reshape(a, shape), self)

    def view(self, *shape: int | tuple[int, ...]) -> Tensor:
        """:meth:`reshape` under PyTorch's other name.

        lucid's arrays are immutable, so the result is a new Tensor, never a
        view into this one's memory: changing either in place leaves the
        other unchanged (in PyTorch both would change).

        Args:
            *shape: the new shape; one entry may be ``-1``.

        Returns:
            A Tensor.

        Raises:
            TypeError: the new shape has a different number of elements.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([1.0, 2.0, 3.0, 4.0]).view(-1, 2)
            Tensor([[1., 2.],
                    [3., 4.]], grad=None)
        """
        return self.reshape(*shape)

    def transpose(self, dim0: int, dim1: int) -> Tensor:
        """Dimensions ``dim0`` and ``dim1`` swapped, recorded on the tape.

        Args:
            dim0: a dimension.
            dim1: another dimension.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[[1.0, 2.0, 3.0]]]).transpose(0, 2).shape
            (3, 1, 1)
        """
        return apply_jax(lambda a: jnp.swapaxes(a, dim0, dim1), self)

    def permute(self, *dims: int | tuple[int, ...]) -> Tensor:
        """The dimensions in the order ``dims`` (``permute(2, 0, 1)`` or ``permute((2, 0, 1))``), recorded.

        Args:
            *dims: a permutation of the dimensions.

        Returns:
            A Tensor.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]]).permute(2, 0, 1).shape
            (3, 1, 2)
        """
        if len(dims) == 1 and not isinstance(dims[0], numbers.Integral):
            dims = tuple(dims[0])
        return apply_jax(lambda a: jnp.transpose(a, dims), self)

    @property
    def T(self) -> Tensor:  # noqa: N802 (PyTorch's name)
        """All dimensions reversed (the transpose of a matrix), recorded on the tape.

        Example:
            >>> from lucid import Tensor
            >>> Tensor([[1.0, 2.0, 3.0]]).T
            Tensor([[1.],
                    [2.],
                    [3.]], grad=None)
        """
        return apply_jax(jnp.transpose, self)


def _check_bounds(low: Any, high: Any) -> None:
    if low is None and high is None:
        raise TypeError("clamp needs at least one of min and max.")


def _clamp(a: jax.Array, low: Any, high: Any) -> jax.Array:
    # Selects rather than jnp.clip: the gradient passes at the bounds (1, not 1/2), as in PyTorch.
    if low is not None:
        a = jnp.where(a < low, low, a).astype(a.dtype)
    if high is not None:
        a = jnp.where(a > high, high, a).astype(a.dtype)
    return a


def _format(tensor: Tensor, prefix: str) -> str:
    def body(value: jax.Array, prefix: str) -> str:
        if is_traced(value):
            return repr(value)
        return np.array2string(np.asarray(value), separator=", ", prefix=prefix, precision=4, floatmode="maxprec_equal")

    text = prefix + body(_value(tensor), prefix)
    if tensor.dtype != jnp.float32:
        text += f", dtype={tensor.dtype}"
    text += ", grad="
    # A multi-line gradient lines up under its own first row, after the data's last line.
    grad_prefix = " " * len(text.rsplit("\n", 1)[-1])
    grad = "None" if tensor._grad is None else body(_value(tensor._grad), grad_prefix)
    return f"{text}{grad})"


def _graph(root: _Node) -> list[_Node]:
    """Every node ``root`` depends on, each before the nodes it depends on (``root`` first)."""
    order: list[_Node] = []
    seen: set[int] = set()
    stack: list[tuple[_Node, bool]] = [(root, False)]
    while stack:
        node, parents_done = stack.pop()
        if parents_done:
            order.append(node)
            continue
        if id(node) in seen:
            continue
        seen.add(id(node))
        stack.append((node, True))
        stack.extend((e, False) for e in node.edges if isinstance(e, _Node) and id(e) not in seen)
    order.reverse()
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
    values = [_value(leaf) if isinstance(leaf, Tensor) else leaf for leaf in leaves]
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
    # An edge leads to the node that made the parent's current value, or to the leaf itself.
    edges = tuple(leaves[i]._node or leaves[i] for i in diff)
    node = _Node(pullback, edges)
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
    Inside ``Module.functional_call`` the new values go to its scope. Call it
    with the Tensors' locks held (:func:`update_in_place` does) when other
    threads may update them too.

    Args:
        targets: Tensors keyed by name.
        values: the new arrays, with (at least) the keys of ``targets``.
        what: how to name the Tensors in an error message.

    Raises:
        TypeError: a new value is a tracer (the call runs inside a JAX
            transformation) and would leak out of it; or, while
            ``Module.functional_call`` runs, a target is not one of the
            Tensors it covers (its update would escape the returned
            ``new_stats``). Nothing is changed.
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
    if _scope.get() is not None:
        outside = sorted(name for name, t in targets.items() if StateScope.covering(id(t)) is None)
        if outside:
            raise TypeError(f"cannot update {what} {outside} inside Module.functional_call. " + _UNREGISTERED_HINT)
    traced = sorted(name for name, t in targets.items() if not _may_hold(t, new[name]))
    if traced:
        raise TypeError(
            f"cannot update {what} {traced} with traced values: this call runs inside a JAX "
            f"transformation, and storing a tracer would leak it. " + _CALL_HINT
        )
    for name, tensor in targets.items():
        _store(tensor, new[name])


def update_in_place(fun: Callable[..., tuple[Any, Mapping[str, Any]]], args: tuple, stats: Mapping[str, Tensor],
                    what: str) -> Tensor:
    """``apply_jax(fun, *args, has_aux=True)``, whose aux (new values) then replaces ``stats`` in place.

    The read of ``stats`` (inside ``fun``) and the write back happen under
    their locks, so concurrent callers (threads sharing a module) apply
    their updates one after another and none is lost. Nothing changes when
    the call fails.

    Args:
        fun: a pure function of ``args`` returning ``(output, new_values)``.
        args: its arguments (pytrees with Tensor leaves, ``stats`` among them).
        stats: the Tensors to update, keyed like ``new_values``.
        what: how to name them in an error message.

    Returns:
        The output, a Tensor recorded on the tape.

    Example:
        >>> import jax.numpy as jnp
        >>> from lucid import Tensor
        >>> from lucid._tensor import update_in_place
        >>> count = Tensor(0)
        >>> def step(x, stats):
        ...     return x * 2, {"count": stats["count"] + 1}
        >>> update_in_place(step, (Tensor([1.0]), {"count": count}), {"count": count}, "count"), count
        (Tensor([2.], grad=None), Tensor(1, dtype=int32, grad=None))
    """
    with _locked(stats.values()):
        out, new = apply_jax(fun, *args, has_aux=True)
        assign_in_place(stats, new, what=what)
    return out


def snapshot(tensors: Mapping[str, Tensor]) -> dict[str, jax.Array]:
    """The current values of ``tensors``, read together under their locks (never half an update).

    Args:
        tensors: Tensors keyed by name.

    Returns:
        Their arrays, keyed alike.

    Example:
        >>> from lucid import Tensor
        >>> from lucid._tensor import snapshot
        >>> snapshot({"mean": Tensor([1.0]), "var": Tensor([2.0])})
        {'mean': Array([1.], dtype=float32), 'var': Array([2.], dtype=float32)}
    """
    with _locked(tensors.values()):
        return {name: _value(t) for name, t in tensors.items()}


def instance_norm(apply: Callable[..., Any], params: Mapping[str, Any], stats: Mapping[str, Any], input_: Any, *,
                  training: bool) -> Tensor:
    """``lucid.nn.functional.instance_norm`` with Tensors: on the tape, running statistics updated in place.

    ``apply`` is ``instance_norm_apply`` with the call's settings (``training`` among them) bound,
    ``apply(params, stats, x) -> (y, new_stats)``; ``params`` and ``stats`` hold the
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

    if in_place:
        return update_in_place(apply, (dict(params), dict(stats), input_), stats, "running_mean/running_var")
    return apply_jax(apply, dict(params), dict(stats), input_, has_aux=True)[0]


# lucid.nn.functional.instance_norm hands its calls with a Tensor argument to this hook.
Tensor.__lucid_function__ = staticmethod(instance_norm)
