"""nn.Module, Parameter, buffers, state dicts and InstanceNorm1d/2d/3d, against torch.nn."""

import copy
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import lucid
import lucid.nn as nn
from lucid import Tensor

SHAPES = {"1d": (2, 3, 5), "2d": (2, 3, 4, 5), "3d": (2, 3, 3, 4, 2)}
OURS = {"1d": nn.InstanceNorm1d, "2d": nn.InstanceNorm2d, "3d": nn.InstanceNorm3d}
THEIRS = {"1d": torch.nn.InstanceNorm1d, "2d": torch.nn.InstanceNorm2d, "3d": torch.nn.InstanceNorm3d}
FLAGS = [(True, True), (True, False), (False, True), (False, False)]  # (affine, track_running_stats)


def _torch_norm(kind, c, rng, **kwargs):
    """A torch InstanceNorm with random (non-default) parameters and running statistics."""
    norm = THEIRS[kind](c, **kwargs)
    with torch.no_grad():
        if norm.affine:
            norm.weight.copy_(torch.tensor(rng.normal(size=c).astype(np.float32)))
            norm.bias.copy_(torch.tensor(rng.normal(size=c).astype(np.float32)))
        if norm.track_running_stats:
            norm.running_mean.copy_(torch.tensor(rng.normal(size=c).astype(np.float32)))
            norm.running_var.copy_(torch.tensor(rng.uniform(0.5, 2, size=c).astype(np.float32)))
            norm.num_batches_tracked.fill_(7)
    return norm


def _state(module):
    """A NumPy snapshot of everything a call could change: parameters, their grads, buffers."""
    out = {k: np.array(v) for k, v in module.state_dict().items()}
    out.update({f"{k}.grad": None if p.grad is None else np.array(p.grad) for k, p in module.named_parameters()})
    return out


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, k
        else:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ---------------------------------------------------------------- parity with torch.nn


# Every pair of (kind, affine, track_running_stats, training) values occurs in some row: each
# combination compiles anew, and the core's tests cover the full product against torch.
PAIRWISE = [
    ("1d", True, True, True), ("1d", False, False, False), ("2d", True, False, True),
    ("2d", False, True, False), ("3d", True, True, False), ("3d", False, False, True),
]


@pytest.mark.parametrize("kind,affine,track,training", PAIRWISE)
def test_matches_torch_outputs_grads_and_running_stats(rng, kind, affine, track, training):
    shape = SHAPES[kind]
    c = shape[1]
    theirs = _torch_norm(kind, c, rng, affine=affine, track_running_stats=track, momentum=0.3)
    ours = OURS[kind](c, affine=affine, track_running_stats=track, momentum=0.3)
    ours.load_state_dict(theirs.state_dict())
    theirs.train(training)
    assert ours.train(training) is ours and ours.training is training
    for step in range(2):  # grads accumulate over both steps, on both sides
        x = (rng.normal(size=shape) * (step + 1) + step).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        tx, ox = torch.tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
        ty, oy = theirs(tx), ours(ox)
        assert isinstance(oy, Tensor) and oy.shape == shape and oy.dtype == jnp.float32
        np.testing.assert_allclose(oy.numpy(), ty.detach().numpy(), atol=3e-5, rtol=1e-5)
        ty.backward(torch.tensor(g))
        oy.backward(g)
        np.testing.assert_allclose(ox.grad, tx.grad.numpy(), atol=3e-5, rtol=1e-4)
        if affine:
            np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(ours.bias.grad, theirs.bias.grad.numpy(), atol=1e-4, rtol=1e-4)
        if track:
            np.testing.assert_allclose(ours.running_mean.numpy(), theirs.running_mean.numpy(), atol=1e-6, rtol=1e-6)
            np.testing.assert_allclose(ours.running_var.numpy(), theirs.running_var.numpy(), atol=1e-6, rtol=1e-6)
    if track:
        # torch's InstanceNorm never counts batches; lucid does (momentum=None needs the count).
        assert int(ours.num_batches_tracked.item()) == 7 + (2 if training else 0)


@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_unbatched_input_is_a_batch_of_one(rng, kind):
    c = SHAPES[kind][1]
    theirs = _torch_norm(kind, c, rng, affine=True, track_running_stats=True)
    ours = OURS[kind](c)
    ours.load_state_dict(theirs.state_dict())
    x = rng.normal(size=SHAPES[kind][1:]).astype(np.float32)  # (C, *spatial)
    g = rng.normal(size=x.shape).astype(np.float32)
    tx, ox = torch.tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
    ty, oy = theirs(tx), ours(ox)
    assert oy.shape == x.shape
    np.testing.assert_allclose(oy.numpy(), ty.detach().numpy(), atol=3e-5)
    if kind == "2d":  # the batch axis is added and removed inside the recorded op
        ty.backward(torch.tensor(g))
        oy.backward(g)
        np.testing.assert_allclose(ox.grad, tx.grad.numpy(), atol=3e-5, rtol=1e-4)
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(ours.running_mean.numpy(), theirs.running_mean.numpy(), atol=1e-6)
    np.testing.assert_allclose(ours.running_var.numpy(), theirs.running_var.numpy(), rtol=1e-6)


def test_loaded_torch_checkpoint_trains_like_torch(rng):
    """A torch InstanceNorm2d(affine, tracking) state dict; several SGD steps; then eval."""
    shape, lr = SHAPES["2d"], 0.1
    theirs = _torch_norm("2d", shape[1], rng, affine=True, track_running_stats=True)
    ours = nn.InstanceNorm2d(shape[1])
    ours.load_state_dict(theirs.state_dict())
    for _ in range(3):
        x = (rng.normal(size=shape) * 2 + 1).astype(np.float32)
        target = rng.normal(size=shape).astype(np.float32)
        tloss = ((theirs(torch.tensor(x)) - torch.tensor(target)) ** 2).mean()
        oloss = ((ours(Tensor(x)) - target) ** 2).mean()
        np.testing.assert_allclose(oloss.item(), tloss.item(), rtol=1e-5)
        theirs.zero_grad()
        ours.zero_grad()
        tloss.backward()
        oloss.backward()
        with torch.no_grad():
            for (name, tp), p in zip(theirs.named_parameters(), ours.parameters()):
                np.testing.assert_allclose(p.grad, tp.grad.numpy(), atol=1e-6, rtol=1e-4, err_msg=name)
                tp -= lr * tp.grad
                p.data = p.data - lr * p.grad
        for k in ("weight", "bias", "running_mean", "running_var"):
            np.testing.assert_allclose(ours.state_dict()[k], theirs.state_dict()[k].numpy(), atol=1e-6, rtol=1e-5)
    theirs.eval()
    ours.eval()
    x = rng.normal(size=shape).astype(np.float32)
    np.testing.assert_allclose(ours(x), theirs(torch.tensor(x)).detach().numpy(), atol=3e-5)


def test_momentum_none_is_the_cumulative_average(rng):
    """ERRATA 3 (torch's InstanceNorm freezes the stats here, so NumPy is the oracle)."""
    norm = nn.InstanceNorm1d(3, momentum=None, affine=False)
    means, variances = [], []
    for k in range(4):
        x = (rng.normal(size=(2, 3, 6)) * (k + 1) + k).astype(np.float32)
        norm(Tensor(x))
        means.append(x.astype(np.float64).mean(axis=2).mean(axis=0))
        variances.append(x.astype(np.float64).var(axis=2, ddof=1).mean(axis=0))
    np.testing.assert_allclose(norm.running_mean.numpy(), np.mean(means, axis=0), atol=1e-5)
    np.testing.assert_allclose(norm.running_var.numpy(), np.mean(variances, axis=0), rtol=1e-5)
    assert norm.num_batches_tracked.item() == 4 and norm.num_batches_tracked.dtype == jnp.int32


def test_running_stats_are_updated_in_place(rng):
    norm = nn.InstanceNorm2d(3)
    rm, rv, count = norm.running_mean, norm.running_var, norm.num_batches_tracked
    x = rng.normal(size=SHAPES["2d"]).astype(np.float32) + 2
    norm(x)
    assert norm.running_mean is rm and norm.running_var is rv and norm.num_batches_tracked is count
    np.testing.assert_allclose(rm.numpy(), 0.1 * x.astype(np.float64).mean(axis=(0, 2, 3)), atol=1e-6)
    assert count.item() == 1
    norm.eval()(x)
    assert count.item() == 1  # eval changes nothing
    norm.reset_running_stats()
    assert norm.running_mean is rm and count.item() == 0
    np.testing.assert_array_equal(rm.numpy(), np.zeros(3))
    np.testing.assert_array_equal(rv.numpy(), np.ones(3))


# ---------------------------------------------------------------- errors change nothing


@pytest.mark.parametrize("kind,bad_ndim", [("1d", 1), ("1d", 4), ("2d", 2), ("2d", 5), ("3d", 3), ("3d", 6)])
def test_wrong_rank_raises_torch_message(kind, bad_ndim):
    c = SHAPES[kind][1]
    x = np.ones((c,) * bad_ndim, np.float32)
    with pytest.raises(ValueError) as theirs:
        THEIRS[kind](c)(torch.tensor(x))
    ours = OURS[kind](c)
    before = _state(ours)
    with pytest.raises(ValueError) as err:
        ours(Tensor(x))
    assert str(err.value) == str(theirs.value)
    assert re.fullmatch(r"expected \dD or \dD input \(got \dD input\)", str(err.value))
    _assert_same_state(_state(ours), before)


@pytest.mark.parametrize("affine,track", FLAGS)
def test_channel_mismatch(rng, affine, track):
    x = rng.normal(size=(2, 4, 3, 5)).astype(np.float32)  # 4 channels into a 3-channel norm
    ours = nn.InstanceNorm2d(3, affine=affine, track_running_stats=track)
    before = _state(ours)
    if affine or track:
        message = "expected input's size at dim=1 to match num_features (3), but got: 4."
        with pytest.raises(ValueError, match=re.escape(message)):
            ours(Tensor(x))
        with pytest.raises(ValueError, match=re.escape("at dim=0")):
            ours(Tensor(x[0]))
        _assert_same_state(_state(ours), before)
    else:  # nothing to mismatch: plain instance norm of any channel count, as torch (which warns)
        with pytest.warns(UserWarning):
            expected = torch.nn.InstanceNorm2d(3)(torch.tensor(x)).numpy()
        np.testing.assert_allclose(ours(x), expected, atol=3e-5)


def test_failed_calls_change_no_state(rng):
    norm = nn.InstanceNorm2d(3)
    x = rng.normal(size=SHAPES["2d"]).astype(np.float32)
    norm(Tensor(x)).sum().backward()  # non-trivial state: stats updated once, grads present
    before = _state(norm)
    bad_inputs = [
        (TypeError, x.astype(np.int32)),  # not floating point
        (ValueError, x[:, :, :1, :1]),  # one spatial element: variance undefined in training
        (ValueError, x[:, :2]),  # channel mismatch
    ]
    for error, bad in bad_inputs:
        with pytest.raises(error):
            norm(Tensor(bad))
    norm.momentum = 2.0  # a bad setting, caught by the core at call time
    with pytest.raises(ValueError, match="momentum"):
        norm(Tensor(x))
    _assert_same_state(_state(norm), before)


def test_constructor_checks():
    with pytest.raises(ValueError, match="num_features"):
        nn.InstanceNorm2d(0)
    with pytest.raises(ValueError, match="eps"):
        nn.InstanceNorm2d(2, eps=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        nn.InstanceNorm2d(2, momentum=1.5)
    with pytest.raises(TypeError, match="affine"):
        nn.InstanceNorm2d(2, affine=1)
    with pytest.raises(TypeError, match="dtype"):
        nn.InstanceNorm2d(2, dtype=jnp.int32)


# ---------------------------------------------------------------- attributes, defaults, state dicts


@pytest.mark.parametrize("kind", sorted(SHAPES))
@pytest.mark.parametrize("affine,track", FLAGS)
def test_state_dict_keys_shapes_and_attributes_match_torch(kind, affine, track):
    ours = OURS[kind](5, affine=affine, track_running_stats=track)
    theirs = THEIRS[kind](5, affine=affine, track_running_stats=track)
    ours_sd, theirs_sd = ours.state_dict(), theirs.state_dict()
    assert list(ours_sd) == list(theirs_sd)
    for k in theirs_sd:
        assert ours_sd[k].shape == tuple(theirs_sd[k].shape), k
        np.testing.assert_array_equal(ours_sd[k], theirs_sd[k].numpy())
    for name in ("weight", "bias"):
        assert (getattr(ours, name) is None) == (not affine)
        assert affine is False or isinstance(getattr(ours, name), nn.Parameter)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert (getattr(ours, name) is None) == (not track)
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    if track:
        assert ours.num_batches_tracked.dtype == jnp.int32 and not ours.running_mean.requires_grad
    expected_repr = re.sub(r", bias=\w+", "", repr(theirs))  # torch >= 2.x also prints its `bias` flag
    assert repr(ours) == expected_repr


def test_defaults_are_the_reference_pages():
    norm = nn.InstanceNorm2d(4)
    assert (norm.eps, norm.momentum, norm.affine, norm.track_running_stats) == (1e-5, 0.1, True, True)
    assert norm.training
    np.testing.assert_array_equal(norm.weight.numpy(), np.ones(4))
    np.testing.assert_array_equal(norm.running_var.numpy(), np.ones(4))


@pytest.mark.parametrize("source", ["torch", "numpy", "jax", "tensor"])
def test_load_state_dict_accepts_every_array_kind(rng, source):
    theirs = _torch_norm("2d", 3, rng, affine=True, track_running_stats=True)
    convert = {
        "torch": lambda t: t,
        "numpy": lambda t: t.numpy(),  # int64 num_batches_tracked
        "jax": lambda t: jnp.asarray(t.numpy()),
        "tensor": lambda t: Tensor(t.numpy()),
    }[source]
    ours = nn.InstanceNorm2d(3)
    result = ours.load_state_dict({k: convert(v) for k, v in theirs.state_dict().items()})
    assert result.missing_keys == [] and result.unexpected_keys == []
    for k, v in theirs.state_dict().items():
        np.testing.assert_array_equal(ours.state_dict()[k], v.numpy())
    assert ours.num_batches_tracked.dtype == jnp.int32 and ours.num_batches_tracked.item() == 7
    assert ours.weight.dtype == jnp.float32 and ours.weight.requires_grad


def test_load_state_dict_strict_errors_change_nothing(rng):
    ours = nn.InstanceNorm2d(3)
    theirs = _torch_norm("2d", 3, rng, affine=True, track_running_stats=True).state_dict()
    before = _state(ours)
    missing = {k: v for k, v in theirs.items() if k != "running_var"}
    with pytest.raises(ValueError, match=r"missing keys \['running_var'\]"):
        ours.load_state_dict(missing)
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        ours.load_state_dict({**theirs, "extra": torch.zeros(3)})
    for strict in (True, False):
        with pytest.raises(ValueError, match="size mismatch for 'bias'"):
            ours.load_state_dict({**theirs, "bias": torch.zeros(4)}, strict=strict)
    with pytest.raises(TypeError, match="'weight'"):
        ours.load_state_dict({**theirs, "weight": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match="fit in int32"):
        ours.load_state_dict({**theirs, "num_batches_tracked": torch.tensor(2**40)})
    with pytest.raises(TypeError, match="mapping"):
        ours.load_state_dict([("weight", np.ones(3))])
    _assert_same_state(_state(ours), before)
    result = ours.load_state_dict({"weight": theirs["weight"], "extra": torch.zeros(1)}, strict=False)
    assert result.missing_keys == ["bias", "running_mean", "running_var", "num_batches_tracked"]
    assert result.unexpected_keys == ["extra"]
    np.testing.assert_array_equal(ours.weight.numpy(), theirs["weight"].numpy())
    np.testing.assert_array_equal(ours.bias.numpy(), before["bias"])


def test_load_state_dict_keeps_the_tensor_objects(rng):
    ours = nn.InstanceNorm2d(3)
    weight, rm = ours.weight, ours.running_mean
    ours.load_state_dict(_torch_norm("2d", 3, rng, affine=True, track_running_stats=True).state_dict())
    assert ours.weight is weight and ours.running_mean is rm  # an optimizer's references stay valid


# ---------------------------------------------------------------- Module machinery, against torch.nn.Module


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(np.full(3, 2.0, np.float32))
        self.norm = nn.InstanceNorm2d(3)
        self.inner = Inner()
        self.register_buffer("step", Tensor(0.0))
        self.register_buffer("cache", Tensor([1.0]), persistent=False)

    def forward(self, x):
        return self.inner(self.norm(x) * self.scale.reshape(3, 1, 1))


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = nn.InstanceNorm2d(3, momentum=None, affine=False)

    def forward(self, x):
        return self.norm(x)


class TorchNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((3,), 2.0))
        self.norm = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
        self.inner = TorchInner()
        self.register_buffer("step", torch.tensor(0.0))
        self.register_buffer("cache", torch.tensor([1.0]), persistent=False)


class TorchInner(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.norm = torch.nn.InstanceNorm2d(3, momentum=None, affine=False, track_running_stats=True)


def test_container_traversal_and_repr_match_torch():
    ours, theirs = Net(), TorchNet()
    assert list(ours.state_dict()) == list(theirs.state_dict())
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [type(m).__name__ for m in ours.children()] == ["InstanceNorm2d", "Inner"]
    assert [n for n, _ in ours.named_parameters(recurse=False)] == ["scale"]
    assert len(list(ours.parameters())) == 3 and len(list(ours.buffers())) == 8
    assert repr(ours).replace("Inner", "TorchInner").replace("Net(", "TorchNet(", 1) == re.sub(
        r", bias=\w+", "", repr(theirs))


def test_apply_visits_children_first_then_self_like_torch():
    """Module.apply(fn) has PyTorch's meaning: the same visiting order, returns self, and an
    initializer written for PyTorch (in place under no_grad) works unchanged."""
    ours, theirs = Net(), TorchNet()
    theirs.inner.alias = theirs.norm  # a module reachable twice is visited twice, by both
    ours.inner.alias = ours.norm
    visited = {"ours": [], "theirs": []}
    assert ours.apply(lambda m: visited["ours"].append(type(m).__name__)) is ours
    assert theirs.apply(lambda m: visited["theirs"].append(type(m).__name__)) is theirs
    assert visited["ours"] == [n.replace("Torch", "") for n in visited["theirs"]]

    def init(m, lib):
        if isinstance(m, (nn.InstanceNorm2d, torch.nn.InstanceNorm2d)) and m.weight is not None:
            with lib.no_grad():
                m.weight.fill_(0.5)
                m.bias.add_(m.weight, alpha=2.0)

    ours.apply(lambda m: init(m, lucid))
    theirs.apply(lambda m: init(m, torch))
    np.testing.assert_array_equal(ours.norm.weight.numpy(), theirs.norm.weight.detach().numpy())
    np.testing.assert_array_equal(ours.norm.bias.numpy(), theirs.norm.bias.detach().numpy())
    with pytest.raises(TypeError, match="functional_call"):  # the pure call's old name
        ours.apply(*ours.pytrees(), np.ones((1, 3, 2, 2), np.float32))


def test_train_eval_and_zero_grad_reach_every_module():
    net = Net()
    assert net.eval() is net and not any(m.training for m in net.modules())
    net.train()
    assert all(m.training for m in net.modules())
    for p in net.parameters():
        p.grad = Tensor(np.ones(p.shape, np.float32))
    grads = [p.grad for p in net.parameters()]
    net.zero_grad(set_to_none=False)
    assert all(p.grad is g and np.all(p.grad.numpy() == 0) for p, g in zip(net.parameters(), grads))
    net.zero_grad()
    assert all(p.grad is None for p in net.parameters())
    with pytest.raises(TypeError, match="bool"):
        net.train("yes")


def test_registration_rules():
    net = Net()
    with pytest.raises(TypeError, match="Parameter or None expected"):
        net.scale = Tensor([1.0, 2.0, 3.0])
    with pytest.raises(TypeError, match="buffer 'step'"):
        net.step = np.zeros(())
    net.step = Tensor(5.0)  # a Tensor replaces a buffer
    assert net.state_dict()["step"] == 5.0
    net.scale = None
    assert net.scale is None and "scale" not in net.state_dict()
    with pytest.raises(ValueError, match="already exists"):
        net.register_buffer("forward", Tensor(0.0))
    with pytest.raises(ValueError, match="'.'"):
        net.register_buffer("a.b", Tensor(0.0))
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        net.missing  # noqa: B018 (the attribute access itself is what must raise)
    del net.norm
    assert "norm.weight" not in net.state_dict()

    class Forgot(nn.Module):
        def __init__(self):
            self.w = nn.Parameter([1.0])

    with pytest.raises(AttributeError, match="super"):
        Forgot()
    with pytest.raises(NotImplementedError):
        nn.Module()(1)
    assert repr(nn.Module()) == repr(torch.nn.Module()) == "Module()"
    assert repr(nn.Parameter([1.0])) == "Parameter containing:\nTensor([1.], grad=None)"


@pytest.mark.parametrize("kind", ["1d", "3d"])
def test_non_default_eps_and_momentum_match_torch(rng, kind):
    """eps=1e-3 on small-variance input (it moves the output by ~10%), momentum=0.35: two
    training steps (outputs, grads, running statistics), then eval with the running statistics."""
    shape, c = SHAPES[kind], SHAPES[kind][1]
    theirs = _torch_norm(kind, c, rng, affine=True, track_running_stats=True, eps=1e-3, momentum=0.35)
    with torch.no_grad():
        theirs.running_var.mul_(0.01)  # small running variances: eps matters in eval too
    ours = OURS[kind](c, eps=1e-3, momentum=0.35)
    ours.load_state_dict(theirs.state_dict())
    for _ in range(2):
        x = (rng.normal(size=shape) * 0.05).astype(np.float32)
        g = rng.normal(size=shape).astype(np.float32)
        tx, ox = torch.tensor(x, requires_grad=True), Tensor(x, requires_grad=True)
        ty, oy = theirs(tx), ours(ox)
        np.testing.assert_allclose(oy.numpy(), ty.detach().numpy(), atol=5e-5, rtol=1e-5)
        ty.backward(torch.tensor(g))
        oy.backward(g)
        np.testing.assert_allclose(ox.grad, tx.grad.numpy(), atol=5e-4, rtol=1e-4)
        np.testing.assert_allclose(ours.weight.grad, theirs.weight.grad.numpy(), atol=1e-4, rtol=1e-4)
        for name in ("running_mean", "running_var"):
            np.testing.assert_allclose(ours.state_dict()[name], theirs.state_dict()[name].numpy(), atol=1e-7, rtol=1e-5)
    theirs.eval()
    x = (rng.normal(size=shape) * 0.05).astype(np.float32)
    np.testing.assert_allclose(ours.eval()(x), theirs(torch.tensor(x)).detach().numpy(), atol=5e-5, rtol=1e-5)


def test_deepcopy_of_a_trained_module_is_independent_like_torch(rng):
    """copy.deepcopy (a best-model snapshot) after training: the same state, then each module moves
    on its own, as in PyTorch."""
    x1, x2 = ((rng.normal(size=SHAPES["2d"]) * 2 + 1).astype(np.float32) for _ in range(2))
    ours, theirs = nn.InstanceNorm2d(3), torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True)
    (ours(Tensor(x1)) ** 2 * Tensor(x2)).sum().backward()
    (theirs(torch.tensor(x1)) ** 2 * torch.tensor(x2)).sum().backward()
    our_copy, their_copy = copy.deepcopy(ours), copy.deepcopy(theirs)
    assert our_copy.weight.grad is their_copy.weight.grad is None  # a copied Parameter starts without one
    np.testing.assert_allclose(ours.weight.grad.numpy(), theirs.weight.grad.numpy(), atol=1e-4, rtol=1e-4)
    assert our_copy.weight is not ours.weight and our_copy.running_mean is not ours.running_mean
    our_copy(x2)
    their_copy(torch.tensor(x2))
    (our_copy(Tensor(x1)) * Tensor(x2)).sum().backward()
    (their_copy(torch.tensor(x1)) * torch.tensor(x2)).sum().backward()
    for name in ("running_mean", "running_var"):
        np.testing.assert_allclose(our_copy.state_dict()[name], their_copy.state_dict()[name].numpy(), rtol=1e-5)
        np.testing.assert_allclose(ours.state_dict()[name], theirs.state_dict()[name].numpy(), rtol=1e-5)
    assert (our_copy.num_batches_tracked.item(), ours.num_batches_tracked.item()) == (3, 1)  # torch counts none
    for module, torch_module in ((our_copy, their_copy), (ours, theirs)):
        np.testing.assert_allclose(module.bias.grad.numpy(), torch_module.bias.grad.numpy(), atol=1e-4, rtol=1e-4)
