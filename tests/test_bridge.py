"""The bridge from modules to pure JAX: pytrees(), functional_call(), load_pytrees(), and what happens
when a module meets a traced value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lucid.nn as nn
import lucid.nn.functional as F
from lucid import Tensor

SHAPE = (2, 3, 4, 5)
LR = 0.1


class Tiny(nn.Module):
    """InstanceNorm2d -> per-channel scale -> a momentum=None InstanceNorm2d without affine."""

    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm2d(3)
        self.scale = nn.Parameter(np.array([1.0, 2.0, 0.5], np.float32))
        self.post = nn.InstanceNorm2d(3, momentum=None, affine=False)

    def forward(self, x):
        return self.post(self.norm(x) * self.scale.reshape(3, 1, 1) + 1.0)


class TorchTiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        self.scale = torch.nn.Parameter(torch.tensor([1.0, 2.0, 0.5]))
        # torch's momentum=None InstanceNorm freezes its stats; training output is the same
        self.post = torch.nn.InstanceNorm2d(3, momentum=None, affine=False, track_running_stats=True)

    def forward(self, x):
        return self.post(self.norm(x) * self.scale.reshape(3, 1, 1) + 1.0)


def _snapshot(module):
    return {k: np.array(v) for k, v in module.state_dict().items()}


def _assert_tree_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_pytrees_are_the_state_dict_split_in_two(affine, track):
    norm = nn.InstanceNorm3d(4, affine=affine, track_running_stats=track)
    params, stats = norm.pytrees()
    assert list(params) == (["weight", "bias"] if affine else [])
    assert list(stats) == (["running_mean", "running_var", "num_batches_tracked"] if track else [])
    assert {**params, **stats}.keys() == norm.state_dict().keys()
    assert all(isinstance(v, jax.Array) for v in {**params, **stats}.values())


def test_nested_pytrees_use_dotted_names():
    params, stats = Tiny().pytrees()
    assert list(params) == ["scale", "norm.weight", "norm.bias"]
    assert list(stats) == ["norm.running_mean", "norm.running_var", "norm.num_batches_tracked",
                           "post.running_mean", "post.running_var", "post.num_batches_tracked"]


def test_jitted_grad_training_step_matches_eager_and_torch(rng):
    bridged, eager, theirs = Tiny(), Tiny(), TorchTiny()
    initial = _snapshot(bridged)

    @jax.jit
    def step(params, stats, x, target):
        def loss_fn(params):
            y, new_stats = bridged.functional_call(params, stats, x, training=True)
            return jnp.mean((y - target) ** 2), new_stats

        (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        params = jax.tree.map(lambda p, g: p - LR * g, params, grads)
        return loss, grads, params, new_stats

    params, stats = bridged.pytrees()
    for _ in range(3):
        x = (rng.normal(size=SHAPE) * 2 + 1).astype(np.float32)
        target = rng.normal(size=SHAPE).astype(np.float32)
        loss, grads, params, stats = step(params, stats, x, target)

        eager_loss = ((eager(Tensor(x)) - target) ** 2).mean()
        eager.zero_grad()
        eager_loss.backward()
        eager_grads = {name: p.grad for name, p in eager.named_parameters()}
        for p in eager.parameters():
            p.data = p.data - LR * p.grad

        torch_loss = ((theirs(torch.tensor(x)) - torch.tensor(target)) ** 2).mean()
        theirs.zero_grad()
        torch_loss.backward()
        torch_grads = {name: p.grad.numpy().copy() for name, p in theirs.named_parameters()}
        with torch.no_grad():
            for p in theirs.parameters():
                p -= LR * p.grad

        np.testing.assert_allclose(loss, eager_loss.item(), rtol=1e-5)
        np.testing.assert_allclose(loss, torch_loss.item(), rtol=1e-5)
        for name in params:
            np.testing.assert_allclose(grads[name], eager_grads[name], atol=1e-6, rtol=1e-4, err_msg=name)
            np.testing.assert_allclose(grads[name], torch_grads[name], atol=1e-6, rtol=1e-4, err_msg=name)
    eager_state = eager.state_dict()
    for name in stats:
        np.testing.assert_allclose(stats[name], eager_state[name], atol=1e-6, rtol=1e-5, err_msg=name)
    for name in ("norm.running_mean", "norm.running_var"):
        np.testing.assert_allclose(stats[name], theirs.state_dict()[name].numpy(), atol=1e-6, rtol=1e-5)
    assert int(stats["norm.num_batches_tracked"]) == int(stats["post.num_batches_tracked"]) == 3
    for name in params:
        np.testing.assert_allclose(params[name], eager_state[name], atol=1e-6, rtol=1e-5, err_msg=name)

    _assert_tree_equal(_snapshot(bridged), initial)  # the module itself was never touched
    bridged.load_pytrees(params, stats)
    assert all(not isinstance(v, jax.core.Tracer) for v in bridged.state_dict().values())
    x = rng.normal(size=SHAPE).astype(np.float32)
    np.testing.assert_allclose(bridged.eval()(x), eager.eval()(x), atol=1e-5)


def test_functional_call_is_pure_and_matches_the_eager_module(rng):
    norm = nn.InstanceNorm2d(3, momentum=0.3)
    x = (rng.normal(size=SHAPE) + 2).astype(np.float32)
    params, stats = norm.pytrees()
    before = _snapshot(norm)
    y, new_stats = norm.functional_call(params, stats, x, training=True)
    _assert_tree_equal(_snapshot(norm), before)
    assert isinstance(y, jax.Array) and norm.training
    norm.eval()
    y_eval, same = norm.functional_call(params, new_stats, x)  # training=None: the module's own mode
    assert not norm.training
    _assert_tree_equal(same, new_stats)
    eager = nn.InstanceNorm2d(3, momentum=0.3)
    np.testing.assert_array_equal(y, eager(x))
    _assert_tree_equal(new_stats, eager.pytrees()[1])
    np.testing.assert_array_equal(y_eval, eager.eval()(x))


def test_functional_call_checks_its_pytrees_and_leaves_the_module_on_error(rng):
    norm = nn.InstanceNorm2d(3)
    params, stats = norm.pytrees()
    before = {k: v for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing keys \['bias'\]"):
        norm.functional_call({"weight": params["weight"]}, stats, np.ones(SHAPE, np.float32))
    with pytest.raises(ValueError, match="shape"):
        norm.functional_call({**params, "bias": jnp.zeros(4)}, stats, np.ones(SHAPE, np.float32))
    with pytest.raises(ValueError, match="num_features"):  # raised inside forward, with the pytrees swapped in
        norm.functional_call(params, stats, np.ones((2, 4, 3, 3), np.float32), training=False)
    assert all(norm.state_dict()[k] is v for k, v in before.items())  # the very same arrays
    assert norm.training


def test_a_module_called_with_arrays_is_a_jax_function(rng):
    """JAX arrays in, JAX arrays out: jax.jit and jax.grad take the module directly whenever the call
    stores nothing; a training call with running statistics under a trace points to functional_call."""
    theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(theirs, name).copy_(torch.tensor(rng.normal(size=3).astype(np.float32)))
        theirs.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, size=3).astype(np.float32)))
    norm = nn.InstanceNorm2d(3)
    norm.load_state_dict(theirs.state_dict())
    x = jnp.asarray((rng.normal(size=SHAPE) * 2 + 1).astype(np.float32))
    g = rng.normal(size=SHAPE).astype(np.float32)
    before = _snapshot(norm)
    with pytest.raises(TypeError, match=r"module\.functional_call"):
        jax.jit(lambda a: norm(a))(x)
    with pytest.raises(TypeError, match=r"module\.functional_call"):
        jax.grad(lambda a: norm(a).sum())(x)
    _assert_tree_equal(_snapshot(norm), before)
    assert not any(isinstance(v, jax.core.Tracer) for v in norm.state_dict().values())

    def torch_value_and_grad(module, training):
        tx = torch.tensor(np.asarray(x), requires_grad=True)
        ty = module.train(training)(tx)
        ty.backward(torch.tensor(g))
        return ty.detach().numpy(), tx.grad.numpy()

    norm.eval()  # reads the running statistics only
    y = jax.jit(lambda a: norm(a))(x)
    dx = jax.grad(lambda a: jnp.sum(norm(a) * g))(x)
    assert type(y) is type(dx) is type(x)
    expected_y, expected_dx = torch_value_and_grad(theirs, False)
    np.testing.assert_allclose(y, expected_y, atol=2e-5)
    np.testing.assert_allclose(dx, expected_dx, atol=2e-5)
    _assert_tree_equal(_snapshot(norm), before)

    untracked = nn.InstanceNorm2d(3, track_running_stats=False)  # training, nothing to store
    untracked.load_state_dict({k: theirs.state_dict()[k] for k in ("weight", "bias")})
    plain = torch.nn.InstanceNorm2d(3, affine=True)
    plain.load_state_dict({k: theirs.state_dict()[k] for k in ("weight", "bias")})
    expected_y, expected_dx = torch_value_and_grad(plain, True)
    np.testing.assert_allclose(jax.jit(lambda a: untracked(a))(x), expected_y, atol=2e-5)
    np.testing.assert_allclose(jax.grad(lambda a: jnp.sum(untracked(a) * g))(x), expected_dx, atol=5e-5, rtol=1e-4)

    # concrete arrays in training: an ordinary eager call, running statistics updated in place
    norm.train()
    np_in = np.asarray(x)
    y = norm(np_in)
    expected_y, _ = torch_value_and_grad(theirs, True)
    assert isinstance(y, jax.Array) and not isinstance(y, Tensor)
    np.testing.assert_allclose(y, expected_y, atol=2e-5)
    np.testing.assert_allclose(norm.running_mean.numpy(), theirs.running_mean.numpy(), atol=1e-6)
    assert norm.num_batches_tracked.item() == 1
    assert isinstance(norm(Tensor(np_in)), Tensor)  # a Tensor in, a Tensor out


def test_a_composite_module_called_with_arrays_matches_torch_under_jax_grad(rng):
    """A user module (norm -> scale -> norm) called with a JAX array in eval mode: jax.grad through it
    is torch's autograd through the same module."""
    ours, theirs = Tiny(), TorchTiny()
    state = {k: v.numpy() for k, v in theirs.state_dict().items()}
    state["norm.running_var"] = rng.uniform(0.5, 2, size=3).astype(np.float32)
    state["post.running_mean"] = rng.normal(size=3).astype(np.float32)
    ours.load_state_dict(state)
    theirs.load_state_dict({k: torch.tensor(v) for k, v in state.items()})
    ours.eval(), theirs.eval()
    x = rng.normal(size=SHAPE).astype(np.float32)
    g = rng.normal(size=SHAPE).astype(np.float32)
    y, dx = jax.jit(jax.value_and_grad(lambda a: jnp.sum(ours(a) * g)))(jnp.asarray(x))
    tx = torch.tensor(x, requires_grad=True)
    ty = (theirs(tx) * torch.tensor(g)).sum()
    ty.backward()
    np.testing.assert_allclose(y, ty.item(), rtol=1e-5)
    np.testing.assert_allclose(dx, tx.grad.numpy(), atol=1e-5, rtol=1e-4)


def test_load_pytrees_checks_everything_first(rng):
    norm = nn.InstanceNorm2d(3)
    params, stats = norm.pytrees()
    before = _snapshot(norm)
    with pytest.raises(ValueError, match="missing keys"):
        norm.load_pytrees(params, {})
    with pytest.raises(ValueError, match="size mismatch"):
        norm.load_pytrees({**params, "weight": jnp.ones(2)}, stats)
    with pytest.raises(TypeError, match="traced"):
        jax.jit(lambda p: norm.load_pytrees(p, stats))(params)
    _assert_tree_equal(_snapshot(norm), before)
    norm.load_pytrees({**params, "weight": jnp.full(3, 2.0)}, stats)
    np.testing.assert_array_equal(norm.weight.numpy(), [2.0, 2.0, 2.0])


def _is_tracer(value):
    return isinstance(value, jax.core.Tracer)


class ListHeld(nn.Module):
    """Its norm sits in a plain list: not registered, so not in pytrees() or state_dict(), as in
    PyTorch (whose state_dict skips a plain list too)."""

    def __init__(self):
        super().__init__()
        self.blocks = [nn.InstanceNorm2d(3)]

    def forward(self, x):
        return self.blocks[0](x)


class TorchListHeld(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = [torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)]


def test_unregistered_submodule_never_keeps_a_tracer_under_functional_call(rng):
    """Regression: the pure call lifted the tracer guard for every Tensor while it ran, so the listed norm
    stored traced running statistics (a leaked tracer) that new_stats did not contain."""
    model = ListHeld()
    hidden = model.blocks[0]
    assert model.pytrees() == ({}, {}) and list(model.state_dict()) == list(TorchListHeld().state_dict()) == []
    x = jnp.asarray((rng.normal(size=SHAPE) + 1).astype(np.float32))
    before = _snapshot(hidden)
    with pytest.raises(TypeError, match="plain list"):
        jax.jit(lambda x: model.functional_call({}, {}, x, training=True))(x)
    with pytest.raises(TypeError, match="plain list"):  # eagerly too: the update would escape new_stats
        model.functional_call({}, {}, x, training=True)
    assert not any(_is_tracer(v) for v in hidden.state_dict().values())
    _assert_tree_equal(_snapshot(hidden), before)
    hidden.eval()  # reading its own state stores nothing: allowed, and equal to PyTorch's eval
    y, new_stats = jax.jit(lambda x: model.functional_call({}, {}, x, training=False))(x)
    theirs = TorchListHeld().blocks[0].eval()
    np.testing.assert_allclose(y, theirs(torch.tensor(np.asarray(x))).detach().numpy(), atol=1e-6)
    assert new_stats == {}


def test_functional_call_lets_only_the_covered_tensors_hold_tracers(rng):
    """Regression: inside the pure call, any Tensor could be given a tracer (here running statistics held
    outside the module, updated by F.instance_norm in forward)."""
    outside_mean, outside_var = Tensor(np.zeros(3, np.float32)), Tensor(np.ones(3, np.float32))

    class UsesOutsideStats(nn.Module):
        def forward(self, x):
            return F.instance_norm(x, outside_mean, outside_var, training=True)

    x = jnp.asarray(rng.normal(size=SHAPE).astype(np.float32))
    with pytest.raises(TypeError, match="Module.functional_call"):
        jax.jit(lambda x: UsesOutsideStats().functional_call({}, {}, x, training=True))(x)
    assert not _is_tracer(outside_mean.data) and not _is_tracer(outside_var.data)
    np.testing.assert_array_equal(outside_mean.numpy(), np.zeros(3))


class Counter(nn.Module):
    """Counts its calls by reassigning a buffer, the PyTorch idiom."""

    def __init__(self):
        super().__init__()
        self.register_buffer("calls", Tensor(0))
        self.norm = nn.InstanceNorm1d(2)

    def forward(self, x):
        self.calls = self.calls + 1
        return self.norm(x)


class TorchCounter(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("calls", torch.tensor(0))
        self.norm = torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True)

    def forward(self, x):
        self.calls = self.calls + 1
        return self.norm(x)


def test_buffer_reassigned_in_forward_comes_back_in_new_stats_and_never_stays(rng):
    """Regression: the reassigned buffer (a new Tensor holding a tracer) stayed in the module, and
    new_stats held the old value."""
    ours, theirs = Counter(), TorchCounter()
    calls = ours.calls
    x = (rng.normal(size=(2, 2, 5)) + 1).astype(np.float32)
    step = jax.jit(lambda p, s, x: ours.functional_call(p, s, x, training=True))
    params, stats = ours.pytrees()
    for _ in range(2):
        y, stats = step(params, stats, x)
        ty = theirs(torch.tensor(x))
    np.testing.assert_allclose(y, ty.detach().numpy(), atol=3e-5)
    assert int(stats["calls"]) == int(theirs.calls) == 2
    np.testing.assert_allclose(stats["norm.running_mean"], theirs.norm.running_mean.numpy(), atol=1e-6)
    assert ours.calls is calls and calls.item() == 0 and not _is_tracer(calls.data)


def test_functional_call_with_traced_inputs_needs_an_explicit_mode(rng):
    """Regression: under jax.jit, training=None read the module's mode once, at trace time, and the
    compiled function kept it after module.eval()."""
    norm = nn.InstanceNorm1d(2)
    params, stats = norm.pytrees()
    x = (rng.normal(size=(2, 2, 5)) + 3).astype(np.float32)
    def current_mode(p, s, x):
        return norm.functional_call(p, s, x)

    with pytest.raises(TypeError, match="training=True or training=False"):
        jax.jit(current_mode)(params, stats, x)
    with pytest.raises(TypeError, match="training=True or training=False"):
        jax.vmap(current_mode, in_axes=(None, None, 0))(params, stats, x[None])

    def torch_out(training):  # a fresh module each time: the same initial state as `stats`
        theirs = torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True).train(training)
        return theirs(torch.tensor(x)).detach().numpy()

    step = jax.jit(lambda p, s, x, training: norm.functional_call(p, s, x, training=training), static_argnums=3)
    for training in (True, False, True):  # each mode as asked, whatever the module's own
        norm.train(not training)
        np.testing.assert_allclose(step(params, stats, x, training)[0], torch_out(training), atol=3e-5)
    y, _ = norm.eval().functional_call(params, stats, x)  # concrete inputs: None still means the current mode
    np.testing.assert_allclose(y, torch_out(False), atol=3e-5)


def test_vmap_over_functional_call_is_one_module_per_member_like_torch(rng):
    """jax.vmap over (params, stats, x): three independent InstanceNorm1d(eps=1e-3, momentum=0.35)
    members, each checked against its own torch module (outputs and running statistics)."""
    members, c, shape = 3, 2, (2, 2, 6)
    norm = nn.InstanceNorm1d(c, eps=1e-3, momentum=0.35)
    theirs = [torch.nn.InstanceNorm1d(c, eps=1e-3, momentum=0.35, affine=True, track_running_stats=True)
              for _ in range(members)]
    for t in theirs:
        with torch.no_grad():
            t.weight.copy_(torch.tensor(rng.normal(size=c).astype(np.float32)))
            t.bias.copy_(torch.tensor(rng.normal(size=c).astype(np.float32)))
            t.running_var.copy_(torch.tensor(rng.uniform(0.005, 0.02, size=c).astype(np.float32)))
    states = [{k: v.numpy() for k, v in t.state_dict().items()} for t in theirs]
    params = {k: jnp.stack([s[k] for s in states]) for k in ("weight", "bias")}
    stats = {k: jnp.stack([s[k] for s in states]) for k in ("running_mean", "running_var")}
    stats["num_batches_tracked"] = jnp.zeros(members, jnp.int32)
    x = (rng.normal(size=(members, *shape)) * 0.05).astype(np.float32)
    for training in (True, False):  # train (stats move), then eval with the moved stats
        step = jax.vmap(lambda p, s, x, training=training: norm.functional_call(p, s, x, training=training))
        y, stats = jax.jit(step)(params, stats, x)
        for i, t in enumerate(theirs):
            np.testing.assert_allclose(y[i], t.train(training)(torch.tensor(x[i])).detach().numpy(),
                                       atol=5e-5, rtol=1e-5)
            for k in ("running_mean", "running_var"):
                np.testing.assert_allclose(stats[k][i], getattr(t, k).numpy(), atol=1e-7, rtol=1e-5)
        np.testing.assert_array_equal(stats["num_batches_tracked"], np.ones(members))  # counted once


class Grows(nn.Module):
    """Registers a buffer on its first call: a change of structure, which functional_call refuses."""

    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm1d(2)

    def forward(self, x):
        if "seen" not in self._buffers:
            self.register_buffer("seen", Tensor(1))
        return self.norm(x)


def test_functional_call_refuses_changes_of_structure_and_never_changes_the_module(rng):
    model = Grows()
    params, stats = model.pytrees()
    x = (rng.normal(size=(2, 2, 5)) + 1).astype(np.float32)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="register buffer 'seen'.*inside Module.functional_call"):
        model.functional_call(params, stats, x, training=True)
    assert "seen" not in model._buffers and list(model.state_dict()) == list(before)
    _assert_tree_equal(_snapshot(model), before)
    model(x)  # eagerly it may: an ordinary PyTorch-style module
    assert model.seen.item() == 1


def test_functional_call_modes_are_its_own(rng):
    """training= applies to the call only; forward switching modes inside stays inside the call."""

    class SwitchesToEval(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.InstanceNorm1d(2)

        def forward(self, x):
            self.eval()  # the call's own mode from here on
            return self.norm(x)

    model = SwitchesToEval()
    params, stats = model.pytrees()
    x = (rng.normal(size=(2, 2, 5)) * 2 + 3).astype(np.float32)
    y, new_stats = model.functional_call(params, stats, x, training=True)
    theirs = torch.nn.InstanceNorm1d(2, affine=True, track_running_stats=True).eval()
    np.testing.assert_allclose(y, theirs(torch.tensor(x)).detach().numpy(), atol=3e-5)
    _assert_tree_equal(new_stats, stats)  # evaluated: nothing moved
    assert model.training and model.norm.training  # the module's own mode is untouched
