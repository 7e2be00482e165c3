"""The bridge from modules to pure JAX: pytrees(), apply(), load_pytrees(), and what happens
when a module meets a traced value."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lucid.nn as nn
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
            y, new_stats = bridged.apply(params, stats, x, training=True)
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
    np.testing.assert_allclose(bridged.eval()(x).numpy(), eager.eval()(x).numpy(), atol=1e-5)


def test_apply_is_pure_and_matches_the_eager_module(rng):
    norm = nn.InstanceNorm2d(3, momentum=0.3)
    x = (rng.normal(size=SHAPE) + 2).astype(np.float32)
    params, stats = norm.pytrees()
    before = _snapshot(norm)
    y, new_stats = norm.apply(params, stats, x, training=True)
    _assert_tree_equal(_snapshot(norm), before)
    assert isinstance(y, jax.Array) and norm.training
    norm.eval()
    y_eval, same = norm.apply(params, new_stats, x)  # training=None: the module's own mode
    assert not norm.training
    _assert_tree_equal(same, new_stats)
    eager = nn.InstanceNorm2d(3, momentum=0.3)
    np.testing.assert_array_equal(y, eager(x).numpy())
    _assert_tree_equal(new_stats, eager.pytrees()[1])
    np.testing.assert_array_equal(y_eval, eager.eval()(x).numpy())


def test_apply_checks_its_pytrees_and_restores_the_module_on_error(rng):
    norm = nn.InstanceNorm2d(3)
    params, stats = norm.pytrees()
    before = {k: v for k, v in norm.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing \['bias'\]"):
        norm.apply({"weight": params["weight"]}, stats, np.ones(SHAPE, np.float32))
    with pytest.raises(ValueError, match="shape"):
        norm.apply({**params, "bias": jnp.zeros(4)}, stats, np.ones(SHAPE, np.float32))
    with pytest.raises(ValueError, match="num_features"):  # raised inside forward, with the pytrees swapped in
        norm.apply(params, stats, np.ones((2, 4, 3, 3), np.float32), training=False)
    assert all(norm.state_dict()[k] is v for k, v in before.items())  # the very same arrays
    assert norm.training


def test_module_on_a_traced_value_trains_only_through_the_bridge(rng):
    norm = nn.InstanceNorm2d(3)
    x = jnp.asarray(rng.normal(size=SHAPE).astype(np.float32))
    before = _snapshot(norm)
    with pytest.raises(TypeError, match=r"module\.apply"):
        jax.jit(lambda a: norm(a).data)(x)
    with pytest.raises(TypeError, match=r"module\.apply"):
        jax.grad(lambda a: norm(a).data.sum())(x)
    _assert_tree_equal(_snapshot(norm), before)
    assert not any(isinstance(v, jax.core.Tracer) for v in norm.state_dict().values())

    # nothing to store: these work under jit and match eager
    untracked = nn.InstanceNorm2d(3, track_running_stats=False)
    np.testing.assert_allclose(jax.jit(lambda a: untracked(a).data)(x), untracked(x).numpy(), atol=1e-6)
    norm.eval()
    np.testing.assert_allclose(jax.jit(lambda a: norm(a).data)(x), norm(x).numpy(), atol=1e-6)
    _assert_tree_equal(_snapshot(norm), before)


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
