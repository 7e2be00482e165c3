"""``lucid.flax.InstanceNorm`` against ``lucid.nn.functional.instance_norm_apply``, inside Flax NNX.

The layer holds state and calls the functional API; every test runs the same
arguments through both and asserts the same numbers (bit for bit where the two
run the same program, float32 ulps where JAX transforms reorder a sum).
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx, traverse_util
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_instance_norm
from test_examples import read_png, run_example
from tree_asserts import assert_same_tree, assert_ulps

import lucid
import lucid.nn.functional as F
from lucid.flax import InstanceNorm

C = 5


def _x(rng, shape, channel_axis):
    """Data with a per-instance scale and offset (what instance norm removes)."""
    x = rng.normal(size=shape) * rng.uniform(0.5, 3.0, size=shape[:1] + (1,) * (len(shape) - 1))
    offset_shape = tuple(d if a in (0, channel_axis % len(shape)) else 1 for a, d in enumerate(shape))
    return jnp.asarray(x + rng.normal(size=offset_shape) * 4, jnp.float32)


def _randomize(model, rng):
    """Random weight/bias and running statistics, the same in the model and in returned pytrees."""
    params, stats = {}, {}
    if model.affine:
        for k in ("weight", "bias"):
            params[k] = jnp.asarray(rng.normal(size=C), jnp.float32)
            getattr(model, k)[...] = params[k]
    if model.track_running_stats:
        stats = {"running_mean": jnp.asarray(rng.normal(size=C), jnp.float32),
                 "running_var": jnp.asarray(rng.uniform(0.5, 2.0, size=C), jnp.float32),
                 "num_batches_tracked": jnp.asarray(3, jnp.int32)}
        for k, v in stats.items():
            getattr(model, k)[...] = v
    return params, stats


def _model_stats(model):
    return {k: getattr(model, k)[...] for k in ("running_mean", "running_var", "num_batches_tracked")
            if model.track_running_stats}


# ---------------------------------------------------------------- same numbers as the functional API


@pytest.mark.parametrize("shape,channel_axis", [((3, 6, 7, C), -1), ((3, C, 6, 7), 1), ((2, 9, C), -1),
                                                ((2, 4, 3, 5, C), 4), ((2, C, 9), 1)])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
def test_train_then_eval_matches_functional(rng, shape, channel_axis, affine, track):
    model = InstanceNorm(C, channel_axis=channel_axis, affine=affine, track_running_stats=track)
    params, stats = _randomize(model, rng)
    kwargs = dict(momentum=0.1, eps=1e-5, channel_axis=channel_axis)
    for _ in range(3):
        x = _x(rng, shape, channel_axis)
        y = model(x)
        y_ref, stats = F.instance_norm_apply(params, stats, x, training=True, **kwargs)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
        assert_same_tree(_model_stats(model), stats)
    if track:
        assert int(model.num_batches_tracked[...]) == 6  # 3 before, 3 training calls
    model.eval()
    x = _x(rng, shape, channel_axis)
    y_ref, _ = F.instance_norm_apply(params, stats, x, training=False, **kwargs)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(y_ref))
    assert_same_tree(_model_stats(model), stats)  # eval changes nothing


def test_mask_and_momentum_none_match_functional(rng):
    model = InstanceNorm(C, momentum=None, eps=1e-3)
    params, stats = _randomize(model, rng)
    for n_valid in (4, 7, 2):
        x = _x(rng, (3, 8, 8, C), -1)
        mask = jnp.asarray(np.arange(8)[None, None, :, None] < np.array([n_valid, 8, 3])[:, None, None, None])
        y = model(x, mask=mask)
        y_ref, stats = F.instance_norm_apply(params, stats, x, momentum=None, eps=1e-3, channel_axis=-1, mask=mask)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
        assert_same_tree(_model_stats(model), stats)
    # momentum=None is the cumulative average: after 3 + 3 batches, not the last batch's statistics.
    assert int(model.num_batches_tracked[...]) == 6


def test_far_from_zero_with_an_outlier_stays_accurate(rng):
    """Mean 1e4 and one pixel 1e3 away: output within float32 ulps of a float64 reference."""
    x = rng.normal(size=(2, 16, 16, C)) + 1e4
    x[1, 3, 7, 2] += 1e3
    x32 = np.asarray(x, np.float32)
    model = InstanceNorm(C)
    y = model(jnp.asarray(x32))
    expected = np_instance_norm(x32, channel_axis=-1)
    np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5)
    # the running mean moved a tenth of the way to the batch mean (1e4), far beyond rounding noise
    batch_mean = x32.astype(np.float64).mean(axis=(1, 2)).mean(0)
    np.testing.assert_allclose(np.asarray(model.running_mean[...]), 0.1 * batch_mean, rtol=1e-6)


def test_bfloat16_state_and_input(rng):
    model = InstanceNorm(C, channel_axis=1, dtype=jnp.bfloat16)
    params, stats = F.instance_norm_init(C, dtype=jnp.bfloat16)
    for v in (*nnx.state(model, nnx.Param).values(), model.running_mean, model.running_var):
        assert v[...].dtype == jnp.bfloat16
    x = _x(rng, (2, C, 6, 6), 1).astype(jnp.bfloat16)
    y_ref, stats = F.instance_norm_apply(params, stats, x, channel_axis=1)
    y = model(x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(y_ref, np.float32))
    assert_same_tree(_model_stats(model), stats)


# ---------------------------------------------------------------- NNX transforms and training


def test_nnx_jit_and_grad_match_jax_grad_of_the_functional_call(rng):
    model = InstanceNorm(C, momentum=0.3)
    params, stats = _randomize(model, rng)
    x = _x(rng, (4, 6, 6, C), -1)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    @nnx.jit
    def step(model, x):
        return nnx.grad(lambda model, x: jnp.sum(model(x) * g), argnums=(0, 1))(model, x)

    @jax.jit
    def step_ref(params, stats, x):
        def loss(params, x):
            y, new_stats = F.instance_norm_apply(params, stats, x, momentum=0.3, channel_axis=-1)
            return jnp.sum(y * g), new_stats
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    model_grads, x_grad = step(model, x)
    (params_grads, x_grad_ref), stats = step_ref(params, stats, x)
    assert isinstance(model_grads, nnx.State) and sorted(model_grads) == ["bias", "weight"]
    for k in ("weight", "bias"):
        assert_ulps(model_grads[k][...], params_grads[k])
    assert_ulps(x_grad, x_grad_ref)
    # the training call inside nnx.grad under nnx.jit updated the statistics (and only them)
    assert_same_tree(_model_stats(model), stats)
    assert float(jnp.abs(x_grad).max()) > 0.1  # a real gradient, not zeros


def test_optax_step_through_nnx_optimizer_matches_functional(rng):
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(2, C, (3, 3), use_bias=False, rngs=rngs)
            self.norm = InstanceNorm(C)

        def __call__(self, x):
            return self.norm(self.conv(x))

    model = Net(nnx.Rngs(0))
    tx = optax.adam(0.05)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    kernel = model.conv.kernel[...]
    params, stats = F.instance_norm_init(C)
    tree = {"kernel": kernel, "norm": params}
    opt_state = tx.init(tree)

    def forward_ref(tree, stats, x):
        h = jax.lax.conv_general_dilated(x, tree["kernel"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return F.instance_norm_apply(tree["norm"], stats, h, channel_axis=-1)

    @nnx.jit
    def train_step(model, optimizer, x, target):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    for _ in range(3):
        x = _x(rng, (4, 8, 8, 2), -1)
        target = jnp.asarray(rng.normal(size=(4, 8, 8, C)), jnp.float32)
        loss = train_step(model, optimizer, x, target)

        def loss_ref(tree, stats=stats, x=x, target=target):
            y, new_stats = forward_ref(tree, stats, x)
            return jnp.mean((y - target) ** 2), new_stats

        (loss_expected, stats), grads = jax.value_and_grad(loss_ref, has_aux=True)(tree)
        updates, opt_state = tx.update(grads, opt_state, tree)
        tree = optax.apply_updates(tree, updates)
        assert_ulps(loss, loss_expected)
    assert_ulps(model.conv.kernel[...], tree["kernel"], ulps=64)
    for k in ("weight", "bias"):
        assert_ulps(getattr(model.norm, k)[...], tree["norm"][k], ulps=64)
        assert float(jnp.abs(tree["norm"][k] - F.instance_norm_init(C)[0][k]).max()) > 0.05  # they trained
    for k in ("running_mean", "running_var"):
        assert_ulps(getattr(model.norm, k)[...], stats[k], ulps=64)
    assert int(model.norm.num_batches_tracked[...]) == 3
    # the optimizer keeps moments for parameters only
    paths = [path for path, _ in nnx.to_flat_state(nnx.state(optimizer.opt_state))]
    assert any("weight" in path for path in paths) and not any("running" in str(path) for path in paths)


def test_eval_train_view_and_call_override(rng):
    class Net(nnx.Module):
        def __init__(self):
            self.norm = InstanceNorm(C, channel_axis=1)
            self.dropout = nnx.Dropout(0.5, rngs=nnx.Rngs(0))

    net = Net()
    params, stats = _randomize(net.norm, rng)
    x = _x(rng, (2, C, 5, 5), 1)
    y_running, _ = F.instance_norm_apply(params, stats, x, training=False)
    y_instance, stats_after = F.instance_norm_apply(params, stats, x, training=True)

    net.eval()
    assert net.norm.use_running_average is True and net.dropout.deterministic is True
    np.testing.assert_array_equal(np.asarray(net.norm(x)), np.asarray(y_running))
    assert_same_tree(_model_stats(net.norm), stats)
    # the call's argument overrides the attribute, both ways
    np.testing.assert_array_equal(np.asarray(net.norm(x, use_running_average=False)), np.asarray(y_instance))
    assert_same_tree(_model_stats(net.norm), stats_after)
    net.train()
    assert net.norm.use_running_average is False
    view = nnx.view(net, use_running_average=True)
    assert view.norm.use_running_average is True and net.norm.use_running_average is False
    y_view, _ = F.instance_norm_apply(params, stats_after, x, training=False)
    np.testing.assert_array_equal(np.asarray(view.norm(x)), np.asarray(y_view))


def test_state_round_trips_through_nnx_state_update_and_a_file(rng, tmp_path):
    class Net(nnx.Module):
        def __init__(self):
            self.a = InstanceNorm(C, channel_axis=1, momentum=None)
            self.b = InstanceNorm(C, channel_axis=1, affine=False)

        def __call__(self, x):
            return self.b(self.a(x) ** 2)

    net = Net()
    _randomize(net.a, rng)
    for _ in range(4):
        net(_x(rng, (3, C, 6, 6), 1))
    net.eval()
    x = _x(rng, (2, C, 6, 6), 1)
    expected = net(x)

    fresh = Net()
    fresh.eval()
    nnx.update(fresh, nnx.state(net))
    np.testing.assert_array_equal(np.asarray(fresh(x)), np.asarray(expected))

    # through disk: the pure dict of the state in lucid's pickle-free .npz, back into a new model
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(net)), sep=".")
    lucid.save(flat, tmp_path / "net.npz")
    loaded = traverse_util.unflatten_dict(lucid.load(tmp_path / "net.npz"), sep=".")
    restored = Net()
    restored.eval()
    state = nnx.state(restored)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, loaded))
    nnx.update(restored, state)
    np.testing.assert_array_equal(np.asarray(restored(x)), np.asarray(expected))
    assert int(restored.a.num_batches_tracked[...]) == 7 and int(restored.b.num_batches_tracked[...]) == 4


def test_axis_name_averages_running_stats_over_the_whole_batch(rng):
    """Batch split over 8 devices under shard_map: each device's statistics are the whole batch's."""
    mesh = jax.make_mesh((8,), ("b",))
    model = InstanceNorm(C, axis_name="b")
    params, stats = _randomize(model, rng)
    x = _x(rng, (16, 6, 6, C), -1)
    graphdef, state = nnx.split(model)

    def local(state, x):
        model = nnx.merge(graphdef, state)
        y = model(x)
        return y, nnx.state(model)

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(P(), P("b")), out_specs=(P("b"), P())))
    y, new_state = sharded(jax.device_put(state, NamedSharding(mesh, P())),
                           jax.device_put(x, NamedSharding(mesh, P("b"))))
    nnx.update(model, new_state)
    y_ref, stats = F.instance_norm_apply(params, stats, x, channel_axis=-1)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    for k in ("running_mean", "running_var"):
        assert_ulps(getattr(model, k)[...], stats[k])
    assert int(model.num_batches_tracked[...]) == 4
    # evaluation ignores axis_name (nothing to average), so it runs outside the mapped function too
    model.eval()
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(F.instance_norm_apply(
        params, _model_stats(model), x, training=False, channel_axis=-1)[0]))


# ---------------------------------------------------------------- bad settings and inputs


def test_bad_settings_raise_at_construction():
    with pytest.raises(ValueError, match="momentum must be in"):
        InstanceNorm(C, momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a number"):
        InstanceNorm(C, momentum="0.1")
    with pytest.raises(TypeError, match="eps must be"):
        InstanceNorm(C, eps=None)
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        InstanceNorm(0)
    with pytest.raises(TypeError, match="channel_axis must be an int"):
        InstanceNorm(C, channel_axis=1.0)
    with pytest.raises(TypeError, match="use_running_average must be a Python bool"):
        InstanceNorm(C, use_running_average=None)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        InstanceNorm(C, dtype=jnp.int32)


def test_bad_inputs_raise_at_trace_time_and_change_nothing(rng):
    model = InstanceNorm(C, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match=f"expected {C} channels on axis 3"):
        nnx.jit(lambda m, x: m(x))(model, jnp.zeros((2, 4, 4, C + 1)))

    model = InstanceNorm(C)
    params, stats = _randomize(model, rng)
    cases = [
        (jnp.zeros((2, 4, 4, C), jnp.int32), {}, TypeError, "floating-point"),
        (jnp.zeros((2, 4, 4, C + 1)), {}, ValueError, f"expected {C} channels on axis 3"),
        (jnp.zeros((2, C)), {}, ValueError, "at least one"),
        (jnp.zeros((2, 1, 1, C)), {}, ValueError, "more than 1 spatial element"),
        (jnp.zeros((2, 4, 4, C)), {"mask": jnp.ones((3, 4, 4, 1), bool)}, ValueError, "does not broadcast"),
        (jnp.zeros((2, 4, 4, C)), {"use_running_average": 1}, TypeError, "use_running_average must be a Python bool"),
    ]
    for x, kwargs, error, message in cases:
        with pytest.raises(error, match=message):
            nnx.jit(lambda m, x, kwargs=kwargs: m(x, **kwargs))(model, x)
        assert_same_tree(_model_stats(model), stats)
    with pytest.raises(ValueError, match="channel_axis cannot be 0"):
        InstanceNorm(C, channel_axis=0)(jnp.zeros((C, 4, 4)))


# ---------------------------------------------------------------- the example


def test_flax_example_trains_and_writes_its_plot(tmp_path):
    report, _ = run_example("flax_nnx.py", "--steps", "60", "--out", str(tmp_path / "out"), cwd=tmp_path)
    plot = read_png(tmp_path / "out" / "flax_nnx_loss.png")
    assert plot.shape[0] > 200 and plot.shape[1] > 300
    assert report["steps"] == 60 and report["num_batches_tracked"] == 60
    assert report["loss_last"] < report["loss_first"] - 0.1
    assert 0.4 < report["eval_accuracy"] <= 1.0  # four classes: chance is 0.25
    assert report["eval_matches_functional"] is True
