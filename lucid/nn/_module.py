"""``Module``, ``Parameter`` and buffers: the stateful side of lucid, PyTorch-shaped.

A :class:`Module` owns :class:`Parameter` s (trainable Tensors), buffers
(non-trainable Tensors such as running statistics) and child modules, and
names them as PyTorch does (``norm.running_mean``), so state dicts move
between the two libraries.

The same state is also available as plain pytrees, for ``jax.jit``/``jax.grad``:
:meth:`Module.pytrees` hands it out, :meth:`Module.functional_call` runs the
module as a pure function of it, and :meth:`Module.load_pytrees` takes the
result back. :meth:`Module.apply` has PyTorch's meaning (visit every module).

How ``functional_call`` stays pure without touching the module: it opens a
:class:`lucid._tensor.StateScope`, a ``contextvars`` value that maps the
module's parameter and buffer Tensors (of every registered descendant) to the
given arrays. Every read of a Tensor's value consults the innermost scope of
the current context first, and every write (running statistics, in-place
operations, ``.data =``) to a covered Tensor lands in the scope. The scope
also holds the training mode for the call and any parameter or buffer that
``forward`` reassigns (``self.steps = self.steps + 1``). ``new_stats`` is read
from the scope before it closes. Because the scope is context-local, an eager
call of the same module in another thread, at the same time, sees the
module's own state, and concurrent ``functional_call`` s each see their own
pytrees; the module's Tensors, registries and mode are never written, so
there is nothing to restore and nothing to race on. Adding or removing
parameters, buffers or submodules inside ``functional_call`` raises.

Eager calls from several threads on one module lose nothing: the running
statistics' read-modify-write holds the locks of their Tensors
(:func:`lucid._tensor.update_in_place`), and ``.grad`` accumulation holds the
lock of each leaf. A single thread pays only for uncontended locks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._arrays import as_array, is_traced
from .._tensor import StateScope, Tensor, _is_tensor, _value, no_grad, stored_array
from ._checks import check_keys

__all__ = ["Module", "Parameter"]


class Parameter(Tensor):
    """A Tensor that a :class:`Module` registers as trainable.

    Args:
        data: the initial value (anything :class:`lucid.Tensor` accepts).
        requires_grad: whether gradients are recorded for it.

    Example:
        >>> from lucid.nn import Parameter
        >>> Parameter([1.0, 2.0])
        Parameter containing:
        Tensor([1., 2.], grad=None)
    """

    __slots__ = ()

    def __init__(self, data: Any, requires_grad: bool = True) -> None:
        super().__init__(data, requires_grad=requires_grad)

    def __getstate__(self) -> dict[str, Any]:
        # As PyTorch's Parameter: a deep copy (of a module, say) starts without a gradient.
        return {**super().__getstate__(), "_grad": None}

    def __repr__(self) -> str:
        return "Parameter containing:\n" + super().__repr__()


class IncompatibleKeys(NamedTuple):
    """What :meth:`Module.load_state_dict` did not match (empty under ``strict=True``).

    Attributes:
        missing_keys: the module's keys absent from the state dict (left unchanged).
        unexpected_keys: the state dict's keys the module does not have (ignored).

    Example:
        >>> import numpy as np
        >>> import lucid.nn as nn
        >>> norm = nn.InstanceNorm1d(2)
        >>> keys = norm.load_state_dict({"weight": np.ones(2), "scale": np.ones(2)}, strict=False)
        >>> keys.missing_keys, keys.unexpected_keys
        (['bias', 'running_mean', 'running_var', 'num_batches_tracked'], ['scale'])
    """

    missing_keys: list[str]
    unexpected_keys: list[str]


def _check_shape(name: str, shape: tuple[int, ...], target: Tensor) -> None:
    if tuple(shape) != target.shape:
        raise ValueError(f"size mismatch for {name!r}: got shape {tuple(shape)}, the module expects {target.shape}.")


def _converted(value: Any, target: Tensor, name: str) -> jax.Array:
    """``value`` as a ``jax.Array`` of ``target``'s shape and dtype, checked first."""
    array = stored_array(value, repr(name))
    given = np.dtype(array.dtype)
    # NumPy would cast these without complaint: None to nan, "1.5" to 1.5, a complex number to its real part.
    # (JAX's extra types, bfloat16, float8 and int4, are of kind "V" to NumPy.)
    if not (given.kind in "biuf" or (given.kind == "V" and (jnp.issubdtype(given, jnp.floating)
                                                            or jnp.issubdtype(given, jnp.integer)))):
        raise TypeError(f"{name!r} has dtype {given}; state values must hold real numbers or booleans.")
    _check_shape(name, array.shape, target)
    dtype = target.dtype
    if jnp.issubdtype(dtype, jnp.integer):
        host = np.asarray(array)
        fits = jnp.issubdtype(host.dtype, jnp.integer) and np.array_equal(host.astype(dtype).astype(host.dtype), host)
        if not fits:
            raise ValueError(f"{name!r} must hold integers that fit in {dtype}, got {host.dtype} values {host}.")
    if isinstance(array, jax.Array):
        return array.astype(dtype)
    # NumPy casts first: an int64/float64 array then arrives exact, without
    # depending on JAX's 64-bit mode.
    return jnp.asarray(np.asarray(array).astype(dtype))


def _holds_tensor(values: Iterable[Any]) -> bool:
    for value in values:
        if isinstance(value, Tensor):
            return True
        if isinstance(value, (list, tuple, dict)) and any(
                isinstance(leaf, Tensor) for leaf in jax.tree.leaves(value, is_leaf=_is_tensor)):
            return True
    return False


def _arrays(tree: Any) -> Any:
    """``tree`` with every Tensor replaced by its array."""
    return jax.tree.map(lambda v: v.data if isinstance(v, Tensor) else v, tree, is_leaf=_is_tensor)


def _call_scope(module: Module) -> StateScope | None:
    """The innermost ``functional_call`` scope that stands in for ``module``'s state, if any."""
    return StateScope.covering(id(module), "modules")


def _refuse_in_call(module: Module, action: str) -> None:
    if _call_scope(module) is not None:
        raise ValueError(
            f"cannot {action} of {type(module).__name__} inside Module.functional_call, which never "
            f"changes the module: register parameters, buffers and submodules in __init__."
        )


class Module:
    """Base class of lucid's layers, with PyTorch's attribute-based registration.

    Assigning a :class:`Parameter` or a ``Module`` to an attribute registers
    it; :meth:`register_buffer` registers a non-trainable Tensor. Subclasses
    call ``super().__init__()`` first and define :meth:`forward`.

    Example:
        >>> import lucid.nn as nn
        >>> class Net(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.norm = nn.InstanceNorm1d(2)
        ...         self.scale = nn.Parameter([1.0, 1.0])
        ...     def forward(self, x):
        ...         return self.norm(x) * self.scale.reshape(2, 1)
        >>> net = Net()
        >>> list(net.state_dict())
        ['scale', 'norm.weight', 'norm.bias', 'norm.running_mean', 'norm.running_var', 'norm.num_batches_tracked']
        >>> net
        Net(
          (norm): InstanceNorm1d(2, eps=1e-05, momentum=0.1, affine=True, track_running_stats=True)
        )
    """

    def __init__(self) -> None:
        object.__setattr__(self, "_training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent", set())
        object.__setattr__(self, "_modules", {})

    # ------------------------------------------------------------ registration

    def _registry(self, kind: str) -> dict:
        try:
            return object.__getattribute__(self, kind)
        except AttributeError:
            raise AttributeError(
                f"{type(self).__name__}.__init__ must call super().__init__() before assigning "
                f"parameters, buffers or submodules."
            ) from None

    @property
    def training(self) -> bool:
        """Whether the module is in training mode (see :meth:`train`); inside
        :meth:`functional_call` the mode of that call.

        Example:
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(2)
            >>> norm.training, norm.eval().training
            (True, False)
        """
        scope = StateScope.covering(id(self), "modes")
        return scope.modes[id(self)] if scope is not None else self.__dict__["_training"]

    @training.setter
    def training(self, mode: bool) -> None:
        scope = _call_scope(self)
        if scope is not None:  # context-local: the module's own mode stays
            scope.modes[id(self)] = bool(mode)
        else:
            object.__setattr__(self, "_training", bool(mode))

    def __setattr__(self, name: str, value: Any) -> None:
        scope = _call_scope(self)
        if scope is not None and self._reassign_in_call(scope, name, value):
            return
        if isinstance(value, Parameter):
            self._forget(name)
            self._registry("_parameters")[name] = value
        elif isinstance(value, Module):
            self._forget(name)
            self._registry("_modules")[name] = value
        elif name in self.__dict__.get("_parameters", {}):
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} as parameter {name!r} "
                    f"(lucid.nn.Parameter or None expected)."
                )
            self._parameters[name] = None
        elif name in self.__dict__.get("_modules", {}):
            if value is not None:
                raise TypeError(
                    f"cannot assign {type(value).__name__} as child module {name!r} (Module or None expected)."
                )
            self._modules[name] = None
        elif name in self.__dict__.get("_buffers", {}):
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(
                    f"cannot assign {type(value).__name__} as buffer {name!r} (lucid.Tensor or None expected)."
                )
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def _reassign_in_call(self, scope: StateScope, name: str, value: Any) -> bool:
        """Inside ``functional_call``: keep a reassigned parameter or buffer in the scope (``True``),
        refuse a change of structure, or leave a plain attribute to the caller (``False``)."""
        for kind, what, cls, expected in (("_parameters", "parameter", Parameter, "lucid.nn.Parameter"),
                                          ("_buffers", "buffer", Tensor, "lucid.Tensor")):
            if name in self.__dict__[kind]:
                if value is None:
                    _refuse_in_call(self, f"remove {what} {name!r}")
                if not isinstance(value, cls):
                    raise TypeError(f"cannot assign {type(value).__name__} as {what} {name!r} ({expected} expected).")
                scope.slots[(id(self), name)] = value
                return True
        if name in self.__dict__["_modules"] or isinstance(value, (Parameter, Module)):
            _refuse_in_call(self, f"register or replace {name!r}")
        return False

    def _members(self, kind: str, names: Iterable[str]) -> dict[str, Tensor]:
        """The parameters (``kind="_parameters"``) or buffers ``names`` that are not ``None``,
        as this call sees them (what ``forward`` reassigned inside ``functional_call``)."""
        registry = self.__dict__[kind]
        scoped = StateScope.current() is not None
        members = {}
        for name in names:
            tensor = registry.get(name)
            if scoped:
                tensor = self._slot(name, tensor)
            if tensor is not None:
                members[name] = tensor
        return members

    def _slot(self, name: str, registered: Any) -> Any:
        """``registered`` (a parameter or buffer), or what ``forward`` reassigned it to in this call."""
        scope = StateScope.covering((id(self), name), "slots")
        return registered if scope is None else scope.slots[(id(self), name)]

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: parameters, buffers, children.
        for kind in ("_parameters", "_buffers", "_modules"):
            registry = self.__dict__.get(kind)
            if registry is not None and name in registry:
                return registry[name] if kind == "_modules" else self._slot(name, registry[name])
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __delattr__(self, name: str) -> None:
        _refuse_in_call(self, f"delete {name!r}")
        if not self._forget(name):
            object.__delattr__(self, name)

    def _forget(self, name: str) -> bool:
        found = False
        for kind in ("_parameters", "_buffers", "_modules"):
            registry = self.__dict__.get(kind)
            if registry is not None and name in registry:
                del registry[name]
                found = True
        self.__dict__.get("_non_persistent", set()).discard(name)
        if name in self.__dict__:
            del self.__dict__[name]
        return found

    def _check_new_name(self, name: Any, kind: str) -> None:
        if not isinstance(name, str):
            raise TypeError(f"{kind} name must be a str, got {type(name).__name__}.")
        if not name or "." in name:
            raise ValueError(f"{kind} name must be non-empty and contain no '.', got {name!r}.")
        if hasattr(self, name) and name not in self._registry("_buffers") and name not in self._registry("_parameters"):
            raise ValueError(f"cannot register {kind} {name!r}: the attribute already exists.")

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None:
        """Register a non-trainable Tensor (e.g. running statistics).

        The buffer becomes an attribute, is listed by :meth:`named_buffers`
        and moves with :meth:`pytrees`/:meth:`functional_call`; a persistent one is also
        saved by :meth:`state_dict`. Registering an existing buffer's or
        parameter's name again replaces it.

        Args:
            name: the attribute name (no dots).
            tensor: a Tensor, anything :class:`lucid.Tensor` accepts, or ``None``.
            persistent: include it in :meth:`state_dict`.

        Raises:
            TypeError: ``name`` is not a str, or ``tensor`` does not convert
                to a numeric Tensor.
            ValueError: ``name`` is empty or contains a dot, or is already
                used by another attribute (a child module, a method, ...).

        Example:
            >>> import lucid.nn as nn
            >>> m = nn.Module()
            >>> m.register_buffer("steps", 0)
            >>> m.register_buffer("cache", [0.0, 0.0], persistent=False)
            >>> m.steps, [name for name, _ in m.named_buffers()], list(m.state_dict())
            (Tensor(0, dtype=int32, grad=None), ['steps', 'cache'], ['steps'])
        """
        _refuse_in_call(self, f"register buffer {name!r}")
        self._check_new_name(name, "buffer")
        if tensor is not None and not isinstance(tensor, Tensor):
            tensor = Tensor(tensor)
        self._forget(name)
        self._registry("_buffers")[name] = tensor
        if not persistent:
            self._non_persistent.add(name)

    def register_parameter(self, name: str, param: Parameter | None) -> None:
        """Register a :class:`Parameter` under ``name`` (or ``None``, an empty slot).

        The same as assigning ``self.name = param`` for a Parameter, but also
        accepts ``None``: the name is then reserved as a parameter, skipped by
        :meth:`named_parameters` and :meth:`state_dict`, and the attribute
        accepts only a Parameter or ``None`` afterwards. (Filling the slot
        later registers the Parameter anew, last in the order.)

        Args:
            name: the attribute name (no dots).
            param: a Parameter or ``None``.

        Raises:
            TypeError: ``name`` is not a str, or ``param`` is neither a
                Parameter nor ``None``.
            ValueError: ``name`` is empty or contains a dot, or is already
                used by another attribute (a child module, a method, ...).

        Example:
            >>> import lucid.nn as nn
            >>> m = nn.Module()
            >>> m.register_parameter("scale", nn.Parameter([2.0]))
            >>> m.register_parameter("shift", None)
            >>> [name for name, _ in m.named_parameters()], m.shift
            (['scale'], None)
            >>> m.shift = 0.5
            Traceback (most recent call last):
            TypeError: cannot assign float as parameter 'shift' (lucid.nn.Parameter or None expected).
        """
        _refuse_in_call(self, f"register parameter {name!r}")
        self._check_new_name(name, "parameter")
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(
                f"cannot register {type(param).__name__} as parameter {name!r} (Parameter or None expected)."
            )
        self._forget(name)
        self._registry("_parameters")[name] = param

    # ------------------------------------------------------------ traversal

    def named_modules(self, prefix: str = "") -> Iterator[tuple[str, Module]]:
        """This module and all its descendants, each once, with dotted names.

        Args:
            prefix: prepended to every name.

        Returns:
            An iterator of ``(name, module)`` in depth-first order; this
            module's name is ``prefix``. A module reachable under several
            names is listed once, under the first.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.block = nn.Module()
            >>> net.block.norm = nn.InstanceNorm1d(2)
            >>> net.alias = net.block.norm  # the same module again: listed once
            >>> [name for name, _ in net.named_modules(prefix="net")]
            ['net', 'net.block', 'net.block.norm']
        """
        seen: set[int] = set()
        stack = [(prefix, self)]
        while stack:
            name, module = stack.pop()
            if id(module) in seen:
                continue
            seen.add(id(module))
            yield name, module
            children = [(f"{name}.{n}" if name else n, m) for n, m in module._modules.items() if m is not None]
            stack.extend(reversed(children))

    def modules(self) -> Iterator[Module]:
        """This module and all its descendants, each once (as :meth:`named_modules`).

        Returns:
            An iterator of modules.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.block = nn.Module()
            >>> net.block.norm = nn.InstanceNorm2d(3)
            >>> [type(m).__name__ for m in net.modules()]
            ['Module', 'Module', 'InstanceNorm2d']
        """
        return (m for _, m in self.named_modules())

    def named_children(self) -> Iterator[tuple[str, Module]]:
        """The direct child modules with their attribute names (not grandchildren).

        Returns:
            An iterator of ``(name, module)``, in registration order; a child
            set to ``None`` is skipped.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.block = nn.Module()
            >>> net.block.norm = nn.InstanceNorm1d(2)
            >>> net.head = nn.InstanceNorm1d(2)
            >>> [name for name, _ in net.named_children()]
            ['block', 'head']
        """
        return ((n, m) for n, m in self._modules.items() if m is not None)

    def children(self) -> Iterator[Module]:
        """The direct child modules (not grandchildren).

        Returns:
            An iterator of modules, in registration order; a child set to
            ``None`` is skipped.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.norm = nn.InstanceNorm1d(2)
            >>> net.head = nn.InstanceNorm2d(2)
            >>> net.norm = None  # keeps the slot, skipped
            >>> [type(child).__name__ for child in net.children()]
            ['InstanceNorm2d']
        """
        return (m for _, m in self.named_children())

    def _named_members(self, kind: str, prefix: str, recurse: bool, persistent_only: bool = False,
                       dedupe: bool = True) -> Iterator[tuple[str, Tensor]]:
        modules = self.named_modules(prefix) if recurse else iter([(prefix, self)])
        seen: set[int] = set()
        scoped = StateScope.current() is not None
        for module_name, module in modules:
            for name, tensor in module.__dict__[kind].items():
                if scoped:
                    tensor = module._slot(name, tensor)
                if tensor is None or (persistent_only and name in module._non_persistent):
                    continue
                if dedupe and id(tensor) in seen:
                    continue
                seen.add(id(tensor))
                yield (f"{module_name}.{name}" if module_name else name), tensor

    def named_parameters(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Parameter]]:
        """Parameters with dotted names, each once (PyTorch's order: own first, then children).

        Args:
            prefix: prepended to every name.
            recurse: include the parameters of descendants.

        Returns:
            An iterator of ``(name, parameter)``; ``None`` slots are skipped.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.scale = nn.Parameter([1.0])
            >>> net.norm = nn.InstanceNorm1d(2)
            >>> [(name, p.shape) for name, p in net.named_parameters()]
            [('scale', (1,)), ('norm.weight', (2,)), ('norm.bias', (2,))]
            >>> [name for name, _ in net.named_parameters(prefix="net", recurse=False)]
            ['net.scale']
        """
        return self._named_members("_parameters", prefix, recurse)

    def parameters(self, recurse: bool = True) -> Iterator[Parameter]:
        """Every parameter, each once (as :meth:`named_parameters`), e.g. for an optimizer.

        Args:
            recurse: include the parameters of descendants.

        Returns:
            An iterator of parameters.

        Example:
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm2d(3)
            >>> sum(p.data.size for p in norm.parameters())  # weight and bias
            6
            >>> all(p.requires_grad for p in norm.parameters())
            True
        """
        return (p for _, p in self.named_parameters(recurse=recurse))

    def named_buffers(self, prefix: str = "", recurse: bool = True) -> Iterator[tuple[str, Tensor]]:
        """Buffers with dotted names, each once, non-persistent ones included.

        Args:
            prefix: prepended to every name.
            recurse: include the buffers of descendants.

        Returns:
            An iterator of ``(name, buffer)``; ``None`` buffers are skipped.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.norm = nn.InstanceNorm1d(2)
            >>> [(name, b.dtype.name) for name, b in net.named_buffers()]
            [('norm.running_mean', 'float32'), ('norm.running_var', 'float32'), ('norm.num_batches_tracked', 'int32')]
            >>> list(net.named_buffers(recurse=False))
            []
        """
        return self._named_members("_buffers", prefix, recurse)

    def buffers(self, recurse: bool = True) -> Iterator[Tensor]:
        """Every buffer, each once (as :meth:`named_buffers`).

        Args:
            recurse: include the buffers of descendants.

        Returns:
            An iterator of Tensors.

        Example:
            >>> import lucid.nn as nn
            >>> tracking = nn.InstanceNorm1d(2)
            >>> stateless = nn.InstanceNorm1d(2, track_running_stats=False)
            >>> [b.shape for b in tracking.buffers()], list(stateless.buffers())
            ([(2,), (2,), ()], [])
        """
        return (b for _, b in self.named_buffers(recurse=recurse))

    # ------------------------------------------------------------ modes and grads

    def train(self, mode: bool = True) -> Module:
        """Set training mode on this module and all descendants.

        Args:
            mode: ``True`` for training, ``False`` for evaluation.

        Returns:
            ``self``.

        Raises:
            TypeError: ``mode`` is not a bool.

        Example:
            >>> import lucid.nn as nn
            >>> net = nn.Module()
            >>> net.norm = nn.InstanceNorm1d(2)
            >>> net.train(False) is net, net.norm.training
            (True, False)
            >>> net.train().norm.training
            True
        """
        if not isinstance(mode, (bool, np.bool_)):
            raise TypeError(f"train(mode) needs a bool, got {type(mode).__name__}.")
        for module in self.modules():
            module.training = bool(mode)
        return self

    def eval(self) -> Module:
        """Set evaluation mode (``train(False)``) on this module and all descendants.

        In eval mode, instance normalization uses the running statistics
        instead of each instance's own and does not update them.

        Returns:
            ``self``.

        Example:
            >>> import numpy as np
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(1).eval()  # running mean 0, variance 1
            >>> y = norm(np.array([[[1.0, 3.0]]], np.float32))
            >>> print(np.asarray(y, np.float64).round(4), norm.num_batches_tracked.item())
            [[[1. 3.]]] 0
        """
        return self.train(False)

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients of all parameters.

        Call it between steps: :meth:`lucid.Tensor.backward` accumulates.

        Args:
            set_to_none: set ``.grad`` to ``None`` (else to zeros; a
                ``.grad`` that is ``None`` stays ``None``).

        Example:
            >>> import lucid.nn as nn
            >>> m = nn.Module()
            >>> m.w = nn.Parameter([1.0, 2.0])
            >>> (m.w * m.w).sum().backward()
            >>> m.zero_grad(set_to_none=False)
            >>> g = m.w.grad
            >>> m.w.grad is g, g  # the same gradient Tensor, zeroed in place
            (True, Tensor([0., 0.], grad=None))
            >>> m.zero_grad()
            >>> print(m.w.grad)
            None
        """
        for p in self.parameters():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
            else:
                with no_grad():
                    p.grad.zero_()

    # ------------------------------------------------------------ state dicts

    def _state_tensors(self) -> dict[str, Tensor]:
        """Every saved Tensor under its state-dict name (a shared Tensor under each of its names)."""
        out: dict[str, Tensor] = {}
        for module_name, module in self.named_modules():
            prefix = f"{module_name}." if module_name else ""
            for name, p in module._parameters.items():
                if p is not None:
                    out[prefix + name] = p
            for name, b in module._buffers.items():
                if b is not None and name not in module._non_persistent:
                    out[prefix + name] = b
        return out

    def state_dict(self) -> dict[str, jax.Array]:
        """Parameters and persistent buffers by PyTorch's names.

        Non-persistent buffers and ``None`` slots are left out; a Tensor
        shared under several names appears under each.

        Returns:
            A dict from dotted name to ``jax.Array`` (a snapshot: arrays are
            immutable), ordered as PyTorch orders it.

        Example:
            >>> import numpy as np
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(2)
            >>> before = norm.state_dict()
            >>> _ = norm(np.array([[[1.0, 3.0], [0.0, 4.0]]], np.float32))  # training: stats move
            >>> [np.asarray(s["running_mean"], np.float64).round(4) for s in (before, norm.state_dict())]
            [array([0., 0.]), array([0.2, 0.2])]
        """
        return {name: t.data for name, t in self._state_tensors().items()}

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True) -> IncompatibleKeys:
        """Copy values into the parameters and buffers, in place.

        Values may be NumPy arrays, JAX arrays, lucid Tensors or PyTorch
        tensors; each is cast to the dtype of the Tensor it replaces (so a
        PyTorch int64 ``num_batches_tracked`` loads into lucid's int32).
        Everything is checked before anything changes.

        Args:
            state_dict: dotted name to array, as from :meth:`state_dict` or
                ``torch.nn.Module.state_dict()``.
            strict: the keys must match exactly.

        Returns:
            ``(missing_keys, unexpected_keys)``, both empty under ``strict``.

        Raises:
            ValueError: under ``strict``, missing or unexpected keys; in any
                mode, a value of the wrong shape (or an integer that does not fit).
            TypeError: ``state_dict`` is not a mapping, or a value is not an array
                of real numbers or booleans (object, string, complex, structured).

        Example:
            >>> import numpy as np
            >>> import lucid.nn as nn
            >>> state = dict(nn.InstanceNorm1d(2).state_dict(), running_mean=np.array([0.5, -0.5]))
            >>> state["num_batches_tracked"] = np.int64(3)  # as PyTorch saves it
            >>> norm = nn.InstanceNorm1d(2)
            >>> norm.load_state_dict(state)
            IncompatibleKeys(missing_keys=[], unexpected_keys=[])
            >>> norm.running_mean, norm.num_batches_tracked
            (Tensor([ 0.5, -0.5], grad=None), Tensor(3, dtype=int32, grad=None))
        """
        return self._load(self._state_tensors(), state_dict, strict, "state_dict",
                          "; pass strict=False to load the matching keys")

    def _load(self, targets: dict[str, Tensor], values: Mapping[str, Any], strict: bool, what: str,
              hint: str = "") -> IncompatibleKeys:
        keys = IncompatibleKeys(*check_keys(values, targets, what, required=targets, strict=strict,
                                            hint="; nothing was changed" + hint))
        new = {name: _converted(values[name], t, name) for name, t in targets.items() if name in values}
        for name, array in new.items():
            targets[name].data = array
        return keys

    # ------------------------------------------------------------ the pure bridge

    def pytrees(self) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
        """The module's state as two plain pytrees, for JAX transformations.

        Returns:
            ``(params, stats)``: dicts from dotted name (as in
            :meth:`state_dict`) to ``jax.Array``, for the parameters and the
            buffers respectively.

        Example:
            >>> import lucid.nn as nn
            >>> params, stats = nn.InstanceNorm2d(3).pytrees()
            >>> sorted(params), sorted(stats)
            (['bias', 'weight'], ['num_batches_tracked', 'running_mean', 'running_var'])
        """
        params = {name: p.data for name, p in self.named_parameters()}
        stats = {name: b.data for name, b in self.named_buffers()}
        return params, stats

    def functional_call(self, params: Mapping[str, Any], stats: Mapping[str, Any], *args: Any,
                        training: bool | None = None, **kwargs: Any) -> tuple[Any, dict[str, jax.Array]]:
        """Run the module as a pure function of its state: ``(out, new_stats)``.

        After ``torch.func.functional_call``: for the duration of the call the
        module's parameters and buffers (and those of its registered
        submodules) read ``params`` and ``stats`` (tracers allowed), recording
        on the tape is off, and the module itself is never changed: its
        tensors, registries and mode stay as they are, also when ``forward``
        updates running statistics or reassigns a buffer. So this can be
        wrapped in ``jax.jit``, ``jax.grad``, ``jax.vmap``, and called from
        several threads at once on one module, while other threads call the
        module eagerly with its own state (the module docstring explains the
        context-local scope that does this). Under ``jax.jit`` the module's
        hyperparameters (``eps``, ``momentum``) are read when the function is
        traced.

        Only registered submodules (assigned to attributes) take part, as in
        :meth:`state_dict`; a module kept in a plain list computes with its
        own tensors, and updating its state here raises ``TypeError`` rather
        than keeping a tracer or an update that ``new_stats`` would miss.
        ``forward`` may reassign a buffer (``self.steps = self.steps + 1``):
        ``new_stats`` holds the new value. Plain attributes that ``forward``
        sets are ordinary Python side effects and are not undone.

        Args:
            params: the parameter pytree, keys as from :meth:`pytrees`.
            stats: the buffer pytree, keys as from :meth:`pytrees`.
            *args: the inputs of :meth:`forward` (arrays or Tensors).
            training: the mode to run in (every descendant); ``None`` keeps
                each module's current mode, and is refused for traced
                inputs: a compiled function would keep the mode it was traced
                in after a later ``train()``/``eval()``.
            **kwargs: keyword inputs of :meth:`forward`.

        Returns:
            ``(out, new_stats)``: the output of :meth:`forward` with Tensors
            replaced by their arrays, and the buffers after the call (updated
            running statistics in training mode).

        Raises:
            ValueError: missing or unexpected keys, a leaf of the wrong shape,
                or a ``forward`` that adds or removes parameters, buffers or
                submodules.
            TypeError: ``training`` is not a bool, or is ``None`` with traced
                inputs (inside ``jax.jit``, ``jax.grad``, ``jax.vmap``).

        Example:
            >>> import jax, jax.numpy as jnp
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(2)
            >>> params, stats = norm.pytrees()
            >>> x = jnp.array([[[1.0, 2.0, 3.0], [2.0, 4.0, 6.0]]])
            >>> step = jax.jit(lambda p, s, x: norm.functional_call(p, s, x, training=True))
            >>> y, stats = step(params, stats, x)
            >>> print(stats["running_mean"], stats["num_batches_tracked"])
            [0.2 0.4] 1
            >>> norm.running_mean  # the module is unchanged ...
            Tensor([0., 0.], grad=None)
            >>> norm.load_pytrees(params, stats)  # ... until the new state is loaded back
            >>> norm.running_mean
            Tensor([0.2, 0.4], grad=None)
        """
        if training is not None and not isinstance(training, (bool, np.bool_)):
            raise TypeError(f"training must be a bool or None, got {type(training).__name__}.")
        named_params, named_buffers = dict(self.named_parameters()), dict(self.named_buffers())
        for what, targets, given in (("params", named_params, params), ("stats", named_buffers, stats)):
            check_keys(given, targets, what, required=targets)
            for name, t in targets.items():
                _check_shape(name, jnp.shape(_value(given[name]) if isinstance(given[name], Tensor)
                                             else given[name]), t)
        leaves = jax.tree.leaves((params, stats, args, kwargs), is_leaf=_is_tensor)
        if training is None and any(is_traced(v.data if isinstance(v, Tensor) else v) for v in leaves):
            raise TypeError(
                "functional_call(..., training=None) with traced inputs: the modules' current mode would be "
                "read once, when the function is traced, and a compiled function would keep it after "
                "module.train()/module.eval(). Pass training=True or training=False."
            )

        def array_of(value: Any, what: str) -> jax.Array:
            return _value(value) if isinstance(value, Tensor) else jnp.asarray(as_array(value, what))

        modules = list(self.modules())
        scope = StateScope(
            [(t, array_of(params[name], f"params[{name!r}]")) for name, t in named_params.items()]
            + [(t, array_of(stats[name], f"stats[{name!r}]")) for name, t in named_buffers.items()],
            modules=modules,
            modes={} if training is None else {id(m): bool(training) for m in modules},
        )
        with no_grad(), scope.active():
            out = _arrays(self(*args, **kwargs))  # inside: a returned parameter reads the scope
            new_stats = {name: _value(t) for name, t in self.named_buffers()}
        return out, new_stats

    def apply(self, fn: Callable[[Module], Any], *args: Any, **kwargs: Any) -> Module:
        """Call ``fn`` on every submodule (children first, recursively), then on this module.

        PyTorch's ``Module.apply``, e.g. to initialize parameters
        (``net.apply(init_weights)``). The pure forward pass is
        :meth:`functional_call`.

        Args:
            fn: called with each module; its return value is ignored.

        Returns:
            ``self``.

        Raises:
            TypeError: ``fn`` is not callable, or more arguments are given
                (the pure call is :meth:`functional_call`).

        Example:
            >>> import lucid.nn as nn
            >>> from lucid import no_grad
            >>> net = nn.Module()
            >>> net.a, net.b = nn.InstanceNorm1d(2), nn.InstanceNorm1d(2)
            >>> def init(m):
            ...     if isinstance(m, nn.InstanceNorm1d):
            ...         with no_grad():
            ...             m.weight.fill_(0.5)
            >>> net.apply(init) is net, net.b.weight
            (True, Parameter containing:
            Tensor([0.5, 0.5], grad=None))
        """
        if args or kwargs or not callable(fn):
            raise TypeError(
                "Module.apply(fn) calls fn on every submodule, then on the module (PyTorch's meaning); "
                "to run the module as a pure function of pytrees use "
                "module.functional_call(params, stats, *inputs, training=...)."
            )
        for module in self.children():
            module.apply(fn)
        fn(self)
        return self

    def load_pytrees(self, params: Mapping[str, Any], stats: Mapping[str, Any]) -> None:
        """Take back the pytrees of :meth:`pytrees` (e.g. after a jitted training step), in place.

        Args:
            params: the parameter pytree, exactly the keys of :meth:`pytrees`.
            stats: the buffer pytree, exactly the keys of :meth:`pytrees`.

        Raises:
            ValueError: wrong keys or shapes (nothing is changed).
            TypeError: a leaf is a tracer (called inside a JAX transformation)
                or not an array.

        Example:
            A jitted gradient step on the pytrees, then back into the module
            (the loss is the output's sum, whose gradient for each ``bias``
            entry is the 3 elements of its channel):

            >>> import jax, jax.numpy as jnp
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(2)
            >>> params, stats = norm.pytrees()
            >>> x = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 6.0]]])
            >>> grads = jax.jit(jax.grad(lambda p: norm.functional_call(p, stats, x, training=True)[0].sum()))(params)
            >>> norm.load_pytrees({k: params[k] - 0.5 * grads[k] for k in params}, stats)
            >>> norm.bias
            Parameter containing:
            Tensor([-1.5, -1.5], grad=None)
        """
        targets = {**{n: t for n, t in self.named_parameters()}, **{n: t for n, t in self.named_buffers()}}
        if not isinstance(params, Mapping) or not isinstance(stats, Mapping):
            raise TypeError("params and stats must be dicts from names to arrays, as from module.pytrees().")
        overlap = set(params) & set(stats)
        if overlap:
            raise ValueError(f"params and stats share keys {sorted(overlap)}.")
        self._load(targets, {**params, **stats}, True, "params and stats")

    # ------------------------------------------------------------ calling and printing

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The computation of the module; subclasses define it.

        Calling the module (``module(x)``) runs ``forward``.

        Args:
            *args: the module's inputs.
            **kwargs: its keyword inputs.

        Returns:
            The module's output (as the subclass defines it).

        Raises:
            NotImplementedError: always, in the base class.

        Example:
            >>> import lucid.nn as nn
            >>> from lucid import Tensor
            >>> class Double(nn.Module):
            ...     def forward(self, x):
            ...         return x * 2
            >>> Double()(Tensor([1.0, 2.0]))
            Tensor([2., 4.], grad=None)
            >>> nn.Module()(Tensor([1.0]))
            Traceback (most recent call last):
            NotImplementedError: Module must define forward().
        """
        raise NotImplementedError(f"{type(self).__name__} must define forward().")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run :meth:`forward`: a Tensor in, Tensors out; JAX or NumPy arrays in, JAX arrays out.

        With a :class:`lucid.Tensor` among the inputs, the call is recorded on
        the tape (for ``.backward()``) and returns what ``forward`` returns.
        Without one (JAX arrays, tracers, NumPy arrays), nothing is recorded
        and every Tensor in the output comes back as its ``jax.Array``, so a
        module is an ordinary JAX function: ``jax.jit(lambda x: norm(x))`` and
        ``jax.grad`` work whenever the call stores nothing (eval mode, or no
        running statistics). A training call with running statistics under a
        transformation raises ``TypeError`` naming :meth:`functional_call`;
        outside one (concrete arrays) it updates them in place.

        Args:
            *args: the inputs of :meth:`forward`.
            **kwargs: its keyword inputs.

        Returns:
            The output of :meth:`forward`, with Tensors replaced by arrays
            when no input was a Tensor.

        Example:
            >>> import jax, jax.numpy as jnp
            >>> import lucid.nn as nn
            >>> norm = nn.InstanceNorm1d(1).eval()
            >>> x = jnp.array([[[1.0, 3.0]]])
            >>> jax.jit(lambda x: norm(x))(x)
            Array([[[0.999995, 2.999985]]], dtype=float32)
            >>> jax.grad(lambda x: norm(x).sum())(x)
            Array([[[0.999995, 0.999995]]], dtype=float32)
        """
        if _holds_tensor(args) or _holds_tensor(kwargs.values()):
            return self.forward(*args, **kwargs)
        with no_grad():
            return _arrays(self.forward(*args, **kwargs))

    def extra_repr(self) -> str:
        """The module's own settings, shown inside its ``repr``.

        Subclasses override it; each non-empty line is shown, before the
        child modules.

        Returns:
            A string (empty by default).

        Example:
            >>> import lucid.nn as nn
            >>> class Scale(nn.Module):
            ...     factor = 2.0
            ...     def extra_repr(self):
            ...         return f"factor={self.factor}"
            >>> Scale(), nn.Module().extra_repr()
            (Scale(factor=2.0), '')
        """
        return ""

    def __repr__(self) -> str:
        lines = [line for line in self.extra_repr().split("\n") if line]
        for name, module in self._modules.items():
            child = repr(module).replace("\n", "\n  ")
            lines.append(f"({name}): {child}")
        if not lines:
            return f"{type(self).__name__}()"
        if len(lines) == 1 and not self._modules:
            return f"{type(self).__name__}({lines[0]})"
        return f"{type(self).__name__}(\n  " + "\n  ".join(lines) + "\n)"
