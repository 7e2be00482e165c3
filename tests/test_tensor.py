"""lucid.Tensor: construction, operators and the autograd tape, against PyTorch autograd;
and the Tensor path of F.instance_norm (a Tensor out, running statistics updated in place)."""

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from oracles import torch_instance_norm

import lucid
import lucid.nn as nn
import lucid.nn.functional as F
from lucid import Tensor, no_grad

SHAPES = {"1d": (2, 3, 5), "2d": (2, 3, 4, 5), "3d": (2, 3, 3, 4, 2)}


def _pair(rng, shape, requires_grad=True):
    a = rng.normal(size=shape).astype(np.float32)
    return Tensor(a, requires_grad=requires_grad), torch.tensor(a, requires_grad=requires_grad)


# ---------------------------------------------------------------- construction and attributes


def test_construction_from_lists_numpy_and_jax():
    t = Tensor([[1.0, 2.0], [3.0, 4.0]])
    assert t.dtype == jnp.float32 and t.shape == (2, 2) and t.ndim == 2 and len(t) == 2
    assert isinstance(t.data, jax.Array) and not t.requires_grad and t.grad is None and t.is_leaf
    np.testing.assert_array_equal(t.numpy(), [[1, 2], [3, 4]])
    assert Tensor([1, 2]).dtype == jnp.int32
    assert Tensor(np.arange(3, dtype=np.float16)).dtype == jnp.float16
    a = jnp.arange(4.0)
    assert Tensor(a).data is a
    assert Tensor(a, dtype=jnp.bfloat16).dtype == jnp.bfloat16
    assert Tensor([1, 2], dtype=jnp.float32).dtype == jnp.float32
    t2 = Tensor(t, requires_grad=True)  # a new leaf sharing the data
    assert t2.data is t.data and t2.requires_grad and not t.requires_grad
    assert Tensor(2.5).item() == 2.5 and isinstance(Tensor(2.5).item(), float)


def test_construction_errors():
    with pytest.raises(TypeError, match="floating-point"):
        Tensor([1, 2], requires_grad=True)
    with pytest.raises(TypeError, match="numeric"):
        Tensor([object()])
    with pytest.raises(TypeError, match="bool"):
        Tensor([1.0], requires_grad="yes")
    with pytest.raises(ValueError, match="one element"):
        Tensor([1.0, 2.0]).item()
    with pytest.raises(TypeError, match="0-d"):
        len(Tensor(1.0))


@pytest.mark.parametrize("value,dtype,target", [
    ([2**40], None, "int32"),
    (2**40, None, "int32"),
    (np.array([1, -2**35], np.int64), None, "int32"),
    (torch.tensor([2**31]), None, "int32"),
    ([2**63], None, "uint32"),  # NumPy makes this uint64
    (np.array([300]), jnp.int8, "int8"),
], ids=["list", "scalar", "numpy", "torch", "uint64", "explicit-int8"])
def test_integers_that_do_not_fit_raise_instead_of_wrapping(value, dtype, target):
    """Regression: Tensor([2**40]) became int32 0 (JAX keeps 32-bit integers unless x64 is on)."""
    with pytest.raises(ValueError, match=f"dtype {target}.*do not fit"):
        Tensor(value, dtype=dtype)
    t = Tensor([1, 2])
    if dtype is None:  # the setter converts as the constructor does
        with pytest.raises(ValueError, match="do not fit"):
            t.data = value
    assert t.numpy().tolist() == [1, 2]  # unchanged
    fits = Tensor(np.array([2**31 - 1, -2**31, 5], np.int64))  # in range: converted exactly
    assert fits.dtype == jnp.int32 and fits.numpy().tolist() == [2**31 - 1, -2**31, 5]


def test_repr():
    assert repr(Tensor([[1.0, 2.0], [3.0, 4.5]])) == "Tensor([[1.0, 2.0],\n        [3.0, 4.5]], grad=None)"
    assert repr(Tensor([1, 2])) == "Tensor([1, 2], dtype=int32, grad=None)"
    x = Tensor([1.0, 2.0], requires_grad=True)
    (x * 3).sum().backward()
    assert repr(x) == "Tensor([1., 2.], grad=[3., 3.])"
    assert str(Tensor([0.123456])) == "Tensor([0.1235], grad=None)"


def test_numpy_returns_a_writable_copy():
    t = Tensor([1.0, 2.0])
    a = t.numpy()
    a[0] = 5
    assert float(t.data[0]) == 1.0


# ---------------------------------------------------------------- operators against PyTorch autograd


def _every_operator(a, b):
    """Each binary and unary operator once, with Python scalars on both sides."""
    return -(a * b) + a / (b * b + 1) - 3 * b + 2 ** a + (a * a + 1) ** b + 1 - a + 1 / (b * b + 1) - b / 2


def test_operators_values_and_grads_match_torch(rng):
    a, ta = _pair(rng, (3, 4))
    b, tb = _pair(rng, (3, 4))
    y, ty = _every_operator(a, b), _every_operator(ta, tb)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    assert y.requires_grad and not y.is_leaf
    g = rng.normal(size=y.shape).astype(np.float32)
    y.backward(g)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(a.grad, ta.grad.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b.grad, tb.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_broadcasting_grads_are_reduced_back_like_torch(rng):
    a, ta = _pair(rng, (3, 4))
    b, tb = _pair(rng, (4,))  # broadcast along a leading axis
    c, tc = _pair(rng, (3, 1))  # and along a size-1 axis
    for x, y, z in ((a, b, c), (ta, tb, tc)):
        (x * y + z - x * z).sum().backward()
    assert a.grad.shape == (3, 4) and b.grad.shape == (4,) and c.grad.shape == (3, 1)
    for ours, theirs in ((a, ta), (b, tb), (c, tc)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-5, atol=1e-6)


def test_matmul_matches_torch(rng):
    a, ta = _pair(rng, (3, 4))
    b, tb = _pair(rng, (4,))
    v, tv = _pair(rng, (3,))
    y, ty = v @ (a @ b), tv @ (ta @ tb)
    np.testing.assert_allclose(y.item(), ty.item(), rtol=1e-5)
    y.backward()
    ty.backward()
    for ours, theirs in ((a, ta), (b, tb), (v, tv)):
        np.testing.assert_allclose(ours.grad, theirs.grad.numpy(), rtol=1e-5, atol=1e-5)


UNARY = {
    "reductions": (
        lambda t: (t.sum() + t.sum(axis=1).reshape(2, 1, 4) * t.mean(axis=(0, 2), keepdims=True)
                   + t.reshape((4, 6)).mean()),
        lambda t: t.sum() + t.sum(dim=1).reshape(2, 1, 4) * t.mean(dim=(0, 2), keepdim=True) + t.reshape(4, 6).mean(),
    ),
    "indexing": (  # basic, integer-array, Tensor and boolean-mask indices
        lambda t: t[1:, ::2, -1] * 2 - t[np.array([0, 1, 0])].sum() + t[Tensor([1, 0])].sum() * t[t.numpy() > 0].sum(),
        lambda t: t[1:, ::2, -1] * 2 - t[torch.tensor([0, 1, 0])].sum() + t[torch.tensor([1, 0])].sum()
        * t[t.detach() > 0].sum(),
    ),
}


@pytest.mark.parametrize("op", sorted(UNARY))
def test_reductions_reshape_and_indexing_match_torch(rng, op):
    x, tx = _pair(rng, (2, 3, 4))
    ours, theirs = UNARY[op]
    y, ty = ours(x), theirs(tx)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    y.backward()  # a non-scalar output is seeded with ones
    ty.backward(torch.ones_like(ty))
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_numpy_and_jax_operands_are_recorded(rng):
    x, tx = _pair(rng, (3,))
    a = rng.normal(size=3).astype(np.float32)
    y = a * x + jnp.asarray(a) + x * jnp.asarray(a)  # ndarray on the left defers to Tensor
    assert isinstance(y, Tensor)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 2 * a)


def test_jax_array_on_the_left_is_recorded_like_jax_grad(rng):
    """Regression: `jax_array + t` converted t through __jax_array__ and returned a plain,
    unrecorded jax.Array, so the gradient through that term was silently lost."""
    a = jnp.asarray(rng.uniform(1, 2, size=3).astype(np.float32))
    m = jnp.asarray(rng.normal(size=(3, 3)).astype(np.float32))

    def f(x):
        return (a + x) * (a * x) - a / x + (a - x) ** 2 + a ** x + m @ x

    xv = jnp.asarray(rng.uniform(0.5, 1.5, size=3).astype(np.float32))
    x = Tensor(xv, requires_grad=True)
    y = f(x)
    assert isinstance(y, Tensor) and y.requires_grad
    np.testing.assert_allclose(y.numpy(), f(xv), rtol=1e-6)
    y.sum().backward()
    np.testing.assert_allclose(x.grad, jax.grad(lambda v: f(v).sum())(xv), rtol=1e-5)
    with pytest.raises(TypeError):  # a jnp function would compute off the tape: refused
        jnp.sum(x)
    plain = Tensor(xv)  # nothing to record: JAX converts it, as before
    assert isinstance(a + plain, jax.Array) and jnp.asarray(plain) is plain.data


def test_array_interop():
    t = Tensor([[1.0, 2.0]])
    assert np.asarray(t).tolist() == [[1.0, 2.0]] and np.asarray(t, np.float64).dtype == np.float64
    assert jnp.asarray(t) is t.data
    assert float(jnp.sum(jnp.asarray(t))) == 3.0
    assert float(Tensor(2.0)) == 2.0 and int(Tensor(3)) == 3
    with pytest.raises((TypeError, ValueError)):
        bool(Tensor([1.0, 2.0]))  # ambiguous, as for arrays


# ---------------------------------------------------------------- the tape


def test_backward_accumulates_and_frees_the_graph_like_torch():
    """Leaves accumulate across calls; a second walk of a graph needs retain_graph=True on the first,
    else RuntimeError, as PyTorch (whose message names retain_graph too)."""
    ours, theirs = Tensor([1.0, 2.0, 3.0], requires_grad=True), torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    outputs = []
    for x in (ours, theirs):
        (x * x).sum().backward()
        y = (x * x * 10).sum()
        y.backward(retain_graph=True)
        y.backward()  # the graph was kept for this second walk; the leaf accumulates again
        outputs.append(y)
    grad = ours.grad
    assert isinstance(grad, Tensor) and not grad.requires_grad and grad.is_leaf
    np.testing.assert_allclose(grad, theirs.grad.numpy())
    for y in outputs:
        with pytest.raises(RuntimeError, match="retain_graph=True"):
            y.backward()  # freed by the second walk
    assert ours.grad is grad  # accumulation is in place: the same gradient Tensor
    np.testing.assert_allclose(ours.grad, theirs.grad.numpy())  # the failed call changed nothing


def test_a_partly_freed_graph_raises_and_changes_nothing():
    """Two outputs share a subgraph: walking the second after the first freed the shared part raises
    (PyTorch too), and no leaf takes a partial gradient."""
    ours, theirs = Tensor([0.5, -1.5], requires_grad=True), torch.tensor([0.5, -1.5], requires_grad=True)
    for x in (ours, theirs):
        h = x * x
        a, b = (h * 2).sum(), (h * x).sum()
        a.backward()
        before = x.grad.clone()
        with pytest.raises(RuntimeError, match="second time"):
            b.backward()
        np.testing.assert_array_equal(np.asarray(x.grad), np.asarray(before))


def test_grad_assignment_rules_like_torch():
    ours, theirs = Tensor([1.0, 2.0], requires_grad=True), torch.tensor([1.0, 2.0], requires_grad=True)
    for x, lib in ((ours, Tensor), (theirs, torch.tensor)):
        x.grad = lib(np.array([0.5, 0.5], np.float32))
        (x * 3).sum().backward()
        with pytest.raises(TypeError, match="Tensor or None"):
            x.grad = np.ones(2, np.float32)
        with pytest.raises((ValueError, RuntimeError), match="size|shape"):
            x.grad = lib(np.ones(3, np.float32))
    np.testing.assert_array_equal(ours.grad, theirs.grad.numpy())  # [3.5, 3.5], unchanged by the failures
    with pytest.raises(TypeError, match="dtype"):
        ours.grad = Tensor(np.ones(2, np.float16))
    ours.grad = None
    assert ours.grad is None


def test_concurrent_backward_loses_no_gradient(rng):
    """Eight threads accumulate into one leaf at once: the sum of all their gradients, as one thread."""
    w = Tensor(rng.normal(size=5).astype(np.float32), requires_grad=True)
    weights = [rng.normal(size=5).astype(np.float32) for _ in range(8 * 40)]

    def work(chunk):
        for c in chunk:
            (w * w * c).sum().backward()

    threads = [threading.Thread(target=work, args=(weights[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sum(2 * w.numpy().astype(np.float64) * c for c in weights)
    np.testing.assert_allclose(w.grad.numpy(), expected, rtol=1e-4, atol=1e-4)


def test_shared_subexpressions_and_non_leaf_grads():
    x, tx = Tensor([0.5, -1.5], requires_grad=True), torch.tensor([0.5, -1.5], requires_grad=True)
    for lib_x in (x, tx):
        h = lib_x * lib_x
        out = (h * h + h * lib_x - h).sum()  # a diamond: h feeds three ops
        out.backward()
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-6)
    h = x * 2
    (h * h).sum().backward()
    assert h.grad is None  # only leaves get a .grad


def test_backward_seed_and_errors():
    x = Tensor([[1.0, 2.0]], requires_grad=True)
    y = x * 3
    y.backward([[1.0, -1.0]])
    np.testing.assert_array_equal(x.grad, [[3.0, -3.0]])
    with pytest.raises(ValueError, match="shape"):
        y.backward(np.ones(3))
    np.testing.assert_array_equal(x.grad, [[3.0, -3.0]])  # unchanged
    with pytest.raises(RuntimeError, match="requires grad"):
        Tensor([1.0]).backward()
    with pytest.raises(ValueError, match="leaf"):
        y.requires_grad = False


def test_inputs_without_requires_grad_get_no_grad():
    x = Tensor([1.0, 2.0], requires_grad=True)
    c = Tensor([3.0, 4.0])
    (x * c).sum().backward()
    assert c.grad is None
    np.testing.assert_array_equal(x.grad, [3.0, 4.0])
    assert not (c * 2).requires_grad


def test_no_grad_as_context_and_decorator():
    x = Tensor([1.0, 2.0], requires_grad=True)
    with no_grad():
        y = x * 2
    assert not y.requires_grad and y.is_leaf

    @no_grad()
    def f(t, depth=2):
        return t * t if depth == 0 else f(t, depth - 1)  # re-enters the same instance

    assert not f(x).requires_grad
    with pytest.raises(ZeroDivisionError), no_grad():
        _ = 1 / 0
    assert (x * 2).requires_grad  # restored after an exception


def test_no_grad_nests_and_a_decorated_function_runs_in_two_threads():
    """Regression: the decorator shared one token stack between calls, so when two threads were
    inside at once, the first to leave reset the other's token (ValueError, recording left off)."""
    x = Tensor([1.0, 2.0], requires_grad=True)
    inside = [threading.Event(), threading.Event()]
    first_left = threading.Event()
    results, errors = {}, []

    @no_grad()
    def work(i):
        inside[i].set()
        (inside[1] if i == 0 else first_left).wait(5)  # both inside; thread 0 leaves first
        return (x * 2).requires_grad

    def run(i):
        try:
            results[i] = (work(i), (x * 2).requires_grad)  # off inside, on again after
        except Exception as error:  # any error is reported below
            errors.append(error)
        finally:
            if i == 0:
                first_left.set()

    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert errors == [] and results == {0: (False, True), 1: (False, True)}

    outer = no_grad()
    with outer:
        with outer:  # one instance, entered twice
            assert not work(0) and not (x * 2).requires_grad
        assert not (x * 2).requires_grad  # still inside the outer block
    assert (x * 2).requires_grad


def test_detach_cuts_the_graph():
    x = Tensor([2.0], requires_grad=True)
    y = x * x.detach()
    y.backward()
    np.testing.assert_array_equal(x.grad, [2.0])


def test_tensors_are_transparent_to_jax_transformations():
    """A Tensor may hold a tracer while a transformed function runs."""
    def f(a):
        return (Tensor(a) * Tensor(a) * 3).sum().data

    np.testing.assert_allclose(jax.grad(f)(jnp.array([1.0, 2.0])), [6.0, 12.0])
    np.testing.assert_allclose(jax.jit(f)(jnp.array([1.0, 2.0])), 15.0)


def test_a_traced_grad_assigned_inside_functional_call_is_refused():
    """A scope covers a module's parameter values during functional_call, never their ``.grad``:
    assigning a traced gradient there would leak the tracer past the call."""
    class Leaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(Tensor(np.ones(3, np.float32)))

        def forward(self, x):
            self.w.grad = Tensor(self.w.data * x)
            return x

    m = Leaky()
    with pytest.raises(TypeError, match="traced gradient"):
        jax.jit(lambda p, x: m.functional_call(p, {}, x, training=True))({"w": jnp.ones(3)}, jnp.ones(3))
    assert m.w.grad is None


def test_backward_inside_jit_refuses_to_leak_a_tracer_into_grad():
    w = Tensor([1.0, 2.0], requires_grad=True)
    (w * 1).sum().backward()

    def step(x):
        (Tensor(x) * w).sum().backward()
        return x

    with pytest.raises(TypeError, match="tracer"):
        jax.jit(step)(jnp.ones(2))
    np.testing.assert_array_equal(w.grad, [1.0, 1.0])  # unchanged
    assert not isinstance(w.grad, jax.core.Tracer)


def test_data_setter_refuses_a_tracer_for_a_tensor_made_outside():
    """Regression: `t.data = tracer` inside jax.jit was stored, leaking the tracer."""
    t = Tensor([1.0, 2.0])

    def leak(a):
        t.data = a * 3
        return a

    with pytest.raises(TypeError, match="leak a tracer"):
        jax.jit(leak)(jnp.ones(2))
    assert not isinstance(t.data, jax.core.Tracer)
    np.testing.assert_array_equal(t.numpy(), [1.0, 2.0])

    def inside(a):  # a Tensor made inside the transformation may take one
        u = Tensor(a)
        u.data = u.data * 3
        return u.data

    np.testing.assert_array_equal(jax.jit(inside)(jnp.array([1.0, 2.0])), [3.0, 6.0])


# ---------------------------------------------------------------- in place, as in PyTorch


def _lib_tensor(lib, value, requires_grad=False):
    value = np.asarray(value, np.float32)
    return Tensor(value, requires_grad=requires_grad) if lib == "lucid" else torch.tensor(value,
                                                                                         requires_grad=requires_grad)


def _no_grad(lib):
    return no_grad() if lib == "lucid" else torch.no_grad()


def test_sgd_steps_in_place_under_no_grad_match_torch(rng):
    """The PyTorch porter's loop: `p -= lr * p.grad` (and add_/sub_/mul_/div_/clamp_/zero_) change the
    parameters themselves, and return them."""
    w0, x = rng.normal(size=(3, 4)).astype(np.float32), rng.normal(size=4).astype(np.float32)
    results = {}
    for lib in ("lucid", "torch"):
        w = _lib_tensor(lib, w0, requires_grad=True)
        same = []
        for _ in range(3):
            (((w * _lib_tensor(lib, x)).sum() - 1.0) ** 2).backward()
            with _no_grad(lib):
                before = w
                w -= 0.1 * w.grad
                same.append(w is before)
                same.append(w.add_(w.grad, alpha=-0.01) is w)
                w.sub_(_lib_tensor(lib, x), alpha=0.001)
                w *= 1.01
                w.mul_(_lib_tensor(lib, np.full(4, 0.99)))
                w /= 1.02
                w.div_(0.98)
                w.clamp_(-1.0, 1.0)
            w.grad.zero_()
            same.append(w.is_leaf and w.requires_grad)
        results[lib] = (np.asarray(w.detach()), np.asarray(w.grad), same)
    np.testing.assert_allclose(results["lucid"][0], results["torch"][0], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(results["lucid"][1], results["torch"][1])
    assert results["lucid"][2] == results["torch"][2] == [True] * 9


@pytest.mark.parametrize("op", ["+=", "-=", "*=", "/=", "add_", "sub_", "mul_", "div_", "zero_", "fill_", "copy_",
                                "clamp_"])
def test_in_place_on_a_leaf_that_requires_grad_raises_torchs_error(op):
    messages = []
    for lib in ("lucid", "torch"):
        w = _lib_tensor(lib, [1.0, 2.0], requires_grad=True)
        ops = {
            "+=": lambda t: t.__iadd__(1.0), "-=": lambda t: t.__isub__(1.0), "*=": lambda t: t.__imul__(2.0),
            "/=": lambda t: t.__itruediv__(2.0), "add_": lambda t: t.add_(1.0), "sub_": lambda t: t.sub_(1.0),
            "mul_": lambda t: t.mul_(2.0), "div_": lambda t: t.div_(2.0), "zero_": lambda t: t.zero_(),
            "fill_": lambda t: t.fill_(3.0), "copy_": lambda t, lib=lib: t.copy_(_lib_tensor(lib, [5.0, 6.0])),
            "clamp_": lambda t: t.clamp_(0.0, 1.5),
        }
        with pytest.raises(RuntimeError) as err:
            ops[op](w)
        messages.append(str(err.value))
        np.testing.assert_array_equal(np.asarray(w.detach()), [1.0, 2.0])  # unchanged
        assert w.is_leaf
        with _no_grad(lib):  # allowed there: an update of the parameter itself
            assert ops[op](w) is w
    assert messages[0] == messages[1] == "a leaf Variable that requires grad is being used in an in-place operation."


def _in_place_chain(lib, x, w, c):
    """In-place operations on recorded non-leaves, some with operands that require grad; `early` was
    recorded before `h` changed and keeps its old value's edge."""
    h = x * 2
    early = h * 3
    h += x
    h *= w
    h -= c
    h /= w + 2
    h.add_(x, alpha=0.5)
    h.sub_(w, alpha=2.0)
    h.mul_(x)
    h.div_(1.5)
    h.clamp_(-0.7, 0.9)
    k = x * 1.0
    k.copy_(w * w)
    k.fill_(w.sum())
    k.zero_()
    k += x * x
    acc = _lib_tensor(lib, np.zeros(x.shape))  # a leaf without grad becomes a node
    acc += w * x
    return (early * x).sum() + (h * h).sum() + (k * w).sum() + (acc * acc).sum(), acc


def test_in_place_on_recorded_non_leaves_matches_torch_autograd(rng):
    x0, w0 = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    c = rng.normal(size=5).astype(np.float32)
    grads, values = {}, {}
    for lib in ("lucid", "torch"):
        x, w = _lib_tensor(lib, x0, True), _lib_tensor(lib, w0, True)
        loss, acc = _in_place_chain(lib, x, w, _lib_tensor(lib, c))
        assert not acc.is_leaf and acc.requires_grad
        loss.backward()
        values[lib] = loss.item()
        grads[lib] = (np.asarray(x.grad), np.asarray(w.grad))
    np.testing.assert_allclose(values["lucid"], values["torch"], rtol=1e-5)
    for ours, theirs in zip(grads["lucid"], grads["torch"]):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)


def test_in_place_after_a_saved_use_gives_the_gradient_of_what_was_computed(rng):
    """PyTorch raises here (a value saved for backward was modified); lucid's pullbacks hold the
    immutable arrays they saw, so the gradient is the one of the values actually computed."""
    x0 = rng.normal(size=4).astype(np.float32)
    tx = torch.tensor(x0, requires_grad=True)
    h = tx * 2
    y = (h * h).sum()
    h += 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (y + h.sum()).backward()

    x = Tensor(x0, requires_grad=True)
    h = x * 2
    y = (h * h).sum()
    h += 1
    (y + h.sum()).backward()

    def reference(v):
        h = v * 2
        return jnp.sum(h * h) + jnp.sum(h + 1)

    np.testing.assert_allclose(x.grad, jax.grad(reference)(jnp.asarray(x0)), rtol=1e-6)


def test_failed_in_place_calls_change_nothing(rng):
    t = Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))
    h = Tensor(np.ones(3, np.float32), requires_grad=True) * 2  # a recorded non-leaf
    node = h._node
    checks = [
        (ValueError, "does not broadcast", lambda: t.add_(np.ones((2, 2), np.float32))),
        (ValueError, "does not broadcast", lambda: t.add_(Tensor(np.ones((3, 2, 3), np.float32)))),
        (ValueError, "does not broadcast", lambda: t.__iadd__(np.ones(4, np.float32))),
        (ValueError, "does not broadcast", lambda: t.copy_(np.ones((1, 2), np.float32))),
        (ValueError, "0-d", lambda: t.fill_(np.ones(3, np.float32))),
        (TypeError, "at least one", lambda: t.clamp_()),
        (ValueError, "does not broadcast", lambda: h.mul_(np.ones(2, np.float32))),
    ]
    for error, message, call in checks:
        with pytest.raises(error, match=message):
            call()
    np.testing.assert_array_equal(t.numpy(), np.arange(6).reshape(2, 3))
    assert h._node is node and h.numpy().tolist() == [2.0, 2.0, 2.0]
    i = Tensor([1, 2, 3])
    with pytest.raises(TypeError, match="can't be cast"):
        i += 1.5  # as torch: a float result does not go into an int Tensor
    with pytest.raises(TypeError, match="can't be cast"):
        i.div_(2)
    assert i.numpy().tolist() == [1, 2, 3] and i.dtype == jnp.int32
    i.copy_(Tensor([1.7, -2.2, 3.9]))  # copy_ and fill_ cast, as torch
    assert i.numpy().tolist() == torch.tensor([1, 2, 3]).copy_(torch.tensor([1.7, -2.2, 3.9])).tolist()

    outside = Tensor([1.0, 2.0])

    def leak(a):
        outside.add_(a)
        return a

    with pytest.raises(TypeError, match="leaked tracer"):
        jax.jit(leak)(jnp.ones(2))
    assert outside.numpy().tolist() == [1.0, 2.0] and not isinstance(outside.data, jax.core.Tracer)

    def inside(a):  # a Tensor made inside the transformation may change in place
        u = Tensor(a)
        u *= 3
        return u.data

    np.testing.assert_array_equal(jax.jit(inside)(jnp.array([1.0, 2.0])), [3.0, 6.0])


# ---------------------------------------------------------------- PyTorch's basics, against PyTorch


BASICS = {  # name: (lucid, torch), both on a (2, 3, 4) input that requires grad
    "view_reshape": (lambda t: t.view(-1, 4) * t.reshape(6, -1).reshape((2, 12)).view(6, 4),
                     lambda t: t.view(-1, 4) * t.reshape(6, -1).reshape((2, 12)).view(6, 4)),
    "transpose_permute_T": (lambda t: t.transpose(0, 2) * t.permute(2, 1, 0) + t.permute((2, 1, 0)).T.permute(2, 1, 0),
                            lambda t: t.transpose(0, 2) * t.permute(2, 1, 0) + t.permute((2, 1, 0)).permute(2, 1, 0)
                            .permute(2, 1, 0)),
    "matrix_T": (lambda t: t.reshape(6, 4).T @ t.reshape(6, 4), lambda t: t.reshape(6, 4).T @ t.reshape(6, 4)),
    "clone": (lambda t: t.clone() * t, lambda t: t.clone() * t),
    "exp_log_sqrt": (lambda t: t.exp() + (t * t + 1).log() * (t.abs() + 0.5).sqrt(),
                     lambda t: t.exp() + (t * t + 1).log() * (t.abs() + 0.5).sqrt()),
    "abs_clamp": (lambda t: t.abs() * t.clamp(-0.5, 0.8) + t.clamp(min=0.1) - t.clamp(max=-0.2),
                  lambda t: t.abs() * t.clamp(-0.5, 0.8) + t.clamp(min=0.1) - t.clamp(max=-0.2)),
    "sum_mean_dim": (lambda t: t.sum(dim=1, keepdim=True) * t.mean(dim=(0, 2), keepdim=True) + t.sum(2).sum(-1)
                     .reshape(2, 1, 1) + t.mean([0, 1]) + t.sum(axis=0, keepdims=True),
                     lambda t: t.sum(dim=1, keepdim=True) * t.mean(dim=(0, 2), keepdim=True) + t.sum(2).sum(-1)
                     .reshape(2, 1, 1) + t.mean([0, 1]) + t.sum(dim=0, keepdim=True)),
    "var": (lambda t: t.var(dim=2, keepdim=True) * t + t.var(1, unbiased=False).sum() + t.var()
            + t.var(dim=(0, 2), correction=0) .sum() + t.var(False) + t.var(axis=0, keepdims=True),
            lambda t: t.var(dim=2, keepdim=True) * t + t.var(1, unbiased=False).sum() + t.var()
            + t.var(dim=(0, 2), correction=0).sum() + t.var(False) + t.var(dim=0, keepdim=True)),
    "to_float": (lambda t: t.to(jnp.float16).float() * t + t.to("float32") * (t * 3).to(jnp.int32).float(),
                 lambda t: t.to(torch.float16).float() * t + t.to(torch.float32) * (t * 3).to(torch.int32).float()),
}


@pytest.mark.parametrize("name", sorted(BASICS))
def test_basics_values_and_grads_match_torch(rng, name):
    x, tx = _pair(rng, (2, 3, 4))
    ours, theirs = BASICS[name]
    y, ty = ours(x), theirs(tx)
    assert y.shape == tuple(ty.shape)
    np.testing.assert_allclose(y.numpy(), ty.detach().numpy(), rtol=1e-5, atol=1e-5)
    g = rng.normal(size=y.shape).astype(np.float32)
    y.backward(g)
    ty.backward(torch.tensor(g))
    np.testing.assert_allclose(x.grad, tx.grad.numpy(), rtol=1e-4, atol=1e-5)


def test_gradients_at_the_kinks_are_torchs():
    """|x| at 0 and clamp at its bounds: JAX's own rules give 1 and 1/2 there, PyTorch 0 and 1."""
    values = np.array([0.0, -1.0, 1.0, 0.5, 2.0], np.float32)
    x, tx = Tensor(values, requires_grad=True), torch.tensor(values, requires_grad=True)
    for t in (x, tx):
        (t.abs() * 3 + t.clamp(-1.0, 1.0) + t.clamp(min=0.5) * 10).sum().backward()
    np.testing.assert_array_equal(x.grad, tx.grad.numpy())


def test_size_dim_tolist_and_to_match_torch(rng):
    a = rng.normal(size=(2, 3, 4)).astype(np.float32)
    x, tx = Tensor(a), torch.tensor(a)
    assert x.size() == tuple(tx.size()) and x.dim() == tx.dim() == 3
    assert [x.size(d) for d in range(-3, 3)] == [tx.size(d) for d in range(-3, 3)]
    for bad in (3, -4):
        with pytest.raises(IndexError, match="out of range"):
            x.size(bad)
        with pytest.raises(IndexError, match="out of range"):
            tx.size(bad)
    assert x.tolist() == tx.tolist() and Tensor(2.5).tolist() == torch.tensor(2.5).tolist() == 2.5
    assert Tensor([1, 2]).tolist() == torch.tensor([1, 2]).tolist()
    assert x.to(jnp.float32) is x and x.float() is x  # nothing to convert: the same object, as torch
    assert tx.to(torch.float32) is tx and tx.float() is tx
    assert x.to(Tensor([1])).dtype == jnp.int32 and x.to("bfloat16").dtype == jnp.bfloat16
    w = Tensor(a, requires_grad=True)
    assert not w.to(jnp.int32).requires_grad and w.to(jnp.float16).requires_grad  # as torch
    with pytest.raises(TypeError, match="jax.device_put"):
        x.to("cpu")
    with pytest.raises(TypeError, match="both dim and axis"):
        x.sum(dim=0, axis=1)
    with pytest.raises(TypeError, match="both unbiased and correction"):
        x.var(unbiased=True, correction=0)
    v = x.clone()
    v += 1  # a clone is its own Tensor
    np.testing.assert_array_equal(x.numpy(), a)
    w2 = x.view(6, 4)
    w2.zero_()  # unlike torch, never a view into the same memory (documented)
    np.testing.assert_array_equal(x.numpy(), a)


# ---------------------------------------------------------------- F.instance_norm on Tensors


def _inputs(rng, shape):
    c = shape[1]
    x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
    w, b = rng.normal(size=c).astype(np.float32), rng.normal(size=c).astype(np.float32)
    rm, rv = rng.normal(size=c).astype(np.float32), rng.uniform(0.5, 2, size=c).astype(np.float32)
    return x, w, b, rm, rv


# Each kind and each value of affine and training occurs (each new combination compiles; the
# core's own tests cover the full product against torch, test_modules the module path).
ROWS = [("2d", True, True), ("2d", False, False), ("1d", True, False), ("3d", False, True)]


@pytest.mark.parametrize("kind,affine,training", ROWS)
def test_functional_on_tensors_matches_torch_and_updates_stats_in_place(rng, kind, affine, training):
    x, w, b, rm, rv = _inputs(rng, SHAPES[kind])
    g = rng.normal(size=x.shape).astype(np.float32)
    expected = torch_instance_norm(x, w if affine else None, b if affine else None, rm, rv,
                                   training=training, momentum=0.2, grad_out=g)
    tx = Tensor(x, requires_grad=True)
    tw, tb = (Tensor(w, requires_grad=True), Tensor(b, requires_grad=True)) if affine else (None, None)
    trm, trv = Tensor(rm), Tensor(rv)
    y = F.instance_norm(tx, trm, trv, tw, tb, training=training, momentum=0.2)
    assert isinstance(y, Tensor) and y.requires_grad
    np.testing.assert_allclose(y.numpy(), expected["y"], atol=2e-5)
    y.backward(g)
    np.testing.assert_allclose(tx.grad, expected["dx"], atol=2e-5, rtol=1e-4)
    if affine:
        np.testing.assert_allclose(tw.grad, expected["dw"], atol=5e-5, rtol=1e-4)
        np.testing.assert_allclose(tb.grad, expected["db"], atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(trm.numpy(), expected["running_mean"], atol=1e-6)
    np.testing.assert_allclose(trv.numpy(), expected["running_var"], rtol=1e-6)
    if not training:
        np.testing.assert_array_equal(trm.numpy(), rm)


def test_functional_tensor_node_is_the_core_rule(rng):
    """The tape's gradient is the pullback of the core: identical to jax.grad of instance_norm_apply."""
    x, w, b, rm, rv = _inputs(rng, SHAPES["2d"])
    g = rng.normal(size=x.shape).astype(np.float32)
    tx, tw, tb = (Tensor(v, requires_grad=True) for v in (x, w, b))
    F.instance_norm(tx, Tensor(rm), Tensor(rv), tw, tb, training=True, momentum=0.2).backward(g)
    stats = {"running_mean": jnp.asarray(rm), "running_var": jnp.asarray(rv)}

    def loss(x, params):
        return jnp.sum(F.instance_norm_apply(params, stats, x, momentum=0.2)[0] * g)

    dx, dp = jax.grad(loss, argnums=(0, 1))(jnp.asarray(x), {"weight": jnp.asarray(w), "bias": jnp.asarray(b)})
    np.testing.assert_allclose(tx.grad, dx, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tw.grad, dp["weight"], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(tb.grad, dp["bias"], rtol=1e-6, atol=1e-7)


def test_functional_with_jax_arrays_stays_pure(rng):
    x, w, b, rm, rv = _inputs(rng, SHAPES["1d"])
    rm_j, rv_j = jnp.asarray(rm), jnp.asarray(rv)
    y = F.instance_norm(Tensor(x), rm_j, rv_j, w, b, training=True)
    assert isinstance(y, Tensor)
    np.testing.assert_array_equal(rm_j, rm)
    y2 = F.instance_norm(x, rm_j, rv_j, w, b, training=True)
    assert isinstance(y2, jax.Array)
    np.testing.assert_array_equal(y.numpy(), y2)


def test_functional_reference_example():
    running_mean, running_var = Tensor([0.0, 0.0]), Tensor([1.0, 1.0])
    out = F.instance_norm(Tensor([[[1.0, 2.0], [3.0, 4.0]]]), running_mean, running_var,
                          Tensor([1.0, 1.0]), Tensor([0.0, 0.0]), training=True)
    t = torch_instance_norm(np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32), np.ones(2, np.float32),
                            np.zeros(2, np.float32), np.zeros(2, np.float32), np.ones(2, np.float32))
    np.testing.assert_allclose(out.numpy(), t["y"], atol=1e-6)
    np.testing.assert_allclose(running_mean.numpy(), t["running_mean"], atol=1e-7)
    np.testing.assert_allclose(running_var.numpy(), t["running_var"], atol=1e-7)


def test_functional_failed_calls_change_nothing(rng):
    x, w, b, rm, rv = _inputs(rng, SHAPES["2d"])
    trm, trv = Tensor(rm), Tensor(rv)
    tw = Tensor(w, requires_grad=True)
    with pytest.raises(ValueError, match="shape"):
        F.instance_norm(Tensor(x), trm, trv, Tensor(np.ones(4, np.float32)), training=True)
    with pytest.raises(TypeError, match="both be Tensors"):
        F.instance_norm(Tensor(x), trm, jnp.asarray(rv), tw, training=True)
    with pytest.raises(TypeError, match="floating-point"):
        F.instance_norm(Tensor(x.astype(np.int32)), trm, trv, tw, training=True)
    np.testing.assert_array_equal(trm.numpy(), rm)
    np.testing.assert_array_equal(trv.numpy(), rv)
    assert tw.grad is None


def test_functional_in_place_update_under_jit_is_refused(rng):
    x, _, _, rm, rv = _inputs(rng, SHAPES["1d"])
    trm, trv = Tensor(rm), Tensor(rv)
    with pytest.raises(TypeError, match="module.functional_call"):
        jax.jit(lambda a: F.instance_norm(Tensor(a), trm, trv, training=True).data)(x)
    np.testing.assert_array_equal(trm.numpy(), rm)
    assert not isinstance(trm.data, jax.core.Tracer)
    # pure inputs under jit are fine
    y = jax.jit(lambda a: F.instance_norm(Tensor(a), jnp.asarray(rm), jnp.asarray(rv), training=True).data)(x)
    np.testing.assert_allclose(y, torch_instance_norm(x)["y"], atol=2e-5)


def test_lucid_exports():
    assert lucid.Tensor is Tensor and lucid.no_grad is no_grad
    assert callable(lucid.save) and callable(lucid.load)


@pytest.mark.parametrize("training", [True, False])
def test_functional_on_tensors_non_default_eps_and_momentum_match_torch(rng, training):
    """eps=1e-3 on a small-variance input (it moves the output by ~10%) and momentum=0.35."""
    x, w, b, rm, rv = _inputs(rng, SHAPES["2d"])
    x = (x * 0.05).astype(np.float32)  # instance variances ~1e-2
    rv = (rv * 0.01).astype(np.float32)  # and running variances too, for eval
    g = rng.normal(size=x.shape).astype(np.float32)
    expected = torch_instance_norm(x, w, b, rm, rv, training=training, momentum=0.35, eps=1e-3, grad_out=g)
    tx, tw, tb = (Tensor(v, requires_grad=True) for v in (x, w, b))
    trm, trv = Tensor(rm), Tensor(rv)
    y = F.instance_norm(tx, trm, trv, tw, tb, training=training, momentum=0.35, eps=1e-3)
    np.testing.assert_allclose(y.numpy(), expected["y"], atol=5e-5, rtol=1e-5)
    y.backward(g)
    np.testing.assert_allclose(tx.grad, expected["dx"], atol=5e-4, rtol=1e-4)
    np.testing.assert_allclose(tw.grad, expected["dw"], atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(tb.grad, expected["db"], atol=5e-5, rtol=1e-4)
    np.testing.assert_allclose(trm.numpy(), expected["running_mean"], atol=1e-6)
    np.testing.assert_allclose(trv.numpy(), expected["running_var"], rtol=1e-5)
