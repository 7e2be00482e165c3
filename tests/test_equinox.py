"""``lucid.equinox.InstanceNorm`` against ``lucid.nn.functional.instance_norm_apply``, inside Equinox.

The layer normalizes one unbatched sample by calling the functional API on
``x[None]``; batched with ``jax.vmap(..., axis_name=...)`` its running statistics
must be those of ``instance_norm_apply`` over the whole ``(N, C, ...)`` batch.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from oracles import np_instance_norm
from test_examples import read_png, run_example
from tree_asserts import assert_same_tree, assert_ulps

import lucid.nn.functional as F
from lucid.equinox import InstanceNorm

C = 4


def _x(rng, shape):
    """A batch ``(N, C, *spatial)`` with per-instance scales and offsets."""
    scale = rng.uniform(0.5, 3.0, size=shape[:2] + (1,) * (len(shape) - 2))
    offset = rng.normal(size=shape[:2] + (1,) * (len(shape) - 2)) * 4
    return jnp.asarray(rng.normal(size=shape) * scale + offset, jnp.float32)


def _make(rng, **kwargs):
    """A layer and its state with random weight, bias and running statistics; also as functional pytrees."""
    norm, state = eqx.nn.make_with_state(InstanceNorm)(C, **kwargs)
    params, stats = {}, {}
    if norm.weight is not None:
        params = {k: jnp.asarray(rng.normal(size=C), jnp.float32) for k in ("weight", "bias")}
        norm = eqx.tree_at(lambda m: (m.weight, m.bias), norm, (params["weight"], params["bias"]))
    if norm.state_index is not None:
        stats = {"running_mean": jnp.asarray(rng.normal(size=C), jnp.float32),
                 "running_var": jnp.asarray(rng.uniform(0.5, 2.0, size=C), jnp.float32),
                 "num_batches_tracked": jnp.asarray(2, jnp.int32)}
        state = state.set(norm.state_index, stats)
    return norm, state, params, stats


def _stats(norm, state):
    return {} if norm.state_index is None else state.get(norm.state_index)


def _batched(norm):
    return jax.vmap(norm, axis_name="batch", in_axes=(0, None), out_axes=(0, None))


# ---------------------------------------------------------------- same numbers as the functional API


@pytest.mark.parametrize("spatial", [(9,), (5, 6), (3, 4, 5)])
@pytest.mark.parametrize("affine,track", [(True, True), (False, True), (True, False), (False, False)])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_vmap_with_axis_name_matches_functional_over_the_whole_batch(rng, spatial, affine, track, momentum):
    norm, state, params, stats = _make(rng, axis_name="batch", affine=affine, track_running_stats=track,
                                       momentum=momentum)
    for _ in range(3):
        x = _x(rng, (5, C, *spatial))
        y, state = _batched(norm)(x, state)
        y_ref, stats = F.instance_norm_apply(params, stats, x, momentum=momentum)
        np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
        assert_same_tree(_stats(norm, state), stats)
    inference = eqx.nn.inference_mode(norm)
    assert inference.inference is True and norm.inference is False
    x = _x(rng, (5, C, *spatial))
    y, state_after = _batched(inference)(x, state)
    y_ref, _ = F.instance_norm_apply(params, stats, x, training=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    assert_same_tree(_stats(norm, state_after), stats)  # inference changes nothing


def test_a_tuple_of_axis_names_averages_over_nested_vmaps(rng):
    """Two named axes (say devices and per-device batch): the statistics of all their samples."""
    norm, state, params, stats = _make(rng, axis_name=("outer", "inner"))
    x = _x(rng, (6, C, 5, 5))
    inner = jax.vmap(norm, axis_name="inner", in_axes=(0, None), out_axes=(0, None))
    outer = jax.vmap(inner, axis_name="outer", in_axes=(0, None), out_axes=(0, None))
    y, state = outer(x.reshape(2, 3, C, 5, 5), state)
    y_ref, stats = F.instance_norm_apply(params, stats, x)
    np.testing.assert_array_equal(np.asarray(y).reshape(x.shape), np.asarray(y_ref))
    assert_same_tree(_stats(norm, state), stats, ulps=4)


def test_one_unbatched_sample_is_a_batch_of_one(rng):
    norm, state, params, stats = _make(rng)
    x = _x(rng, (1, C, 7, 7))
    y, state = norm(x[0], state)
    y_ref, stats = F.instance_norm_apply(params, stats, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref[0]))
    assert_same_tree(_stats(norm, state), stats)
    # the call's inference argument overrides the field; the key is accepted and ignored
    y, state = norm(x[0], state, inference=True, key=jax.random.key(0))
    y_ref, _ = F.instance_norm_apply(params, stats, x, training=False)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref[0]))
    assert_same_tree(_stats(norm, state), stats)


def test_without_axis_name_vmap_gives_one_state_per_sample(rng):
    """The documented behaviour: each vmapped sample is its own batch of one."""
    norm, state, params, stats = _make(rng)
    x = _x(rng, (3, C, 6, 6))
    with pytest.raises(ValueError, match="axis spec None but output was batched"):
        jax.vmap(norm, in_axes=(0, None), out_axes=(0, None))(x, state)
    y, states = jax.vmap(norm, in_axes=(0, None), out_axes=(0, 0))(x, state)
    for i in range(3):
        y_ref, stats_i = F.instance_norm_apply(params, stats, x[i:i + 1])
        np.testing.assert_array_equal(np.asarray(y[i]), np.asarray(y_ref[0]))
        # one batched program against single calls: float32 ulps
        assert_same_tree(jax.tree.map(lambda v, i=i: v[i], _stats(norm, states)), stats_i, ulps=4)
    # inference updates nothing, so it batches without a name
    y, _ = jax.vmap(eqx.nn.inference_mode(norm), in_axes=(0, None), out_axes=(0, None))(x, state)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(F.instance_norm_apply(params, stats, x, training=False)[0]))


def test_far_from_zero_with_an_outlier_stays_accurate(rng):
    """Mean 1e4 and one pixel 1e3 away: output within float32 ulps of a float64 reference."""
    x = rng.normal(size=(3, C, 16, 16)) + 1e4
    x[2, 1, 5, 9] += 1e3
    x32 = np.asarray(x, np.float32)
    norm, state = eqx.nn.make_with_state(InstanceNorm)(C, axis_name="batch")
    y, state = _batched(norm)(jnp.asarray(x32), state)
    np.testing.assert_allclose(np.asarray(y), np_instance_norm(x32), atol=1e-5)
    np.testing.assert_allclose(np.asarray(state.get(norm.state_index)["running_mean"]),
                               0.1 * x32.astype(np.float64).mean(axis=(2, 3)).mean(0), rtol=1e-6)


# ---------------------------------------------------------------- Equinox transforms and training


def test_filter_jit_and_filter_grad_match_jax_grad_of_the_functional_call(rng):
    norm, state, params, stats = _make(rng, axis_name="batch", momentum=0.3)
    x = _x(rng, (6, C, 5, 5))
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)

    @eqx.filter_jit
    def step(norm, state, x):
        def loss(norm, x):
            y, new_state = _batched(norm)(x, state)
            return jnp.sum(y * g), new_state
        return eqx.filter_grad(loss, has_aux=True)(norm, x)

    @jax.jit
    def step_ref(params, stats, x):
        def loss(params, x):
            y, new_stats = F.instance_norm_apply(params, stats, x, momentum=0.3)
            return jnp.sum(y * g), new_stats
        return jax.grad(loss, argnums=(0, 1), has_aux=True)(params, x)

    grads, state = step(norm, state, x)
    (params_grads, x_grad_ref), stats = step_ref(params, stats, x)
    for k in ("weight", "bias"):
        assert_ulps(getattr(grads, k), params_grads[k])
    assert_same_tree(_stats(norm, state), stats)
    x_grad = eqx.filter_jit(jax.grad(lambda x: jnp.sum(_batched(norm)(x, state)[0] * g)))(x)
    assert_ulps(x_grad, x_grad_ref)
    assert float(jnp.abs(x_grad).max()) > 0.1


def test_in_a_sequential_model_trained_with_optax(rng):
    """A stateful layer inside eqx.nn.Sequential; one Adam step against the functional computation."""
    model, state = eqx.nn.make_with_state(eqx.nn.Sequential)([
        eqx.nn.Conv2d(2, C, 3, padding=1, use_bias=False, key=jax.random.key(0)),
        InstanceNorm(C, axis_name="batch"),
        eqx.nn.Lambda(jax.nn.relu),
    ])
    tx = optax.adam(0.05)
    opt_state = tx.init(eqx.filter(model, eqx.is_array))
    tree = {"kernel": model.layers[0].weight, "norm": F.instance_norm_init(C)[0]}
    stats = F.instance_norm_init(C)[1]
    opt_state_ref = tx.init(tree)

    @eqx.filter_jit
    def train_step(model, state, opt_state, x, target):
        def loss(model):
            y, new_state = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
            return jnp.mean((y - target) ** 2), new_state
        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(model)
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, opt_state, value

    def loss_ref(tree, stats, x, target):
        h = jax.lax.conv_general_dilated(x, tree["kernel"], (1, 1), ((1, 1), (1, 1)))
        y, new_stats = F.instance_norm_apply(tree["norm"], stats, h)
        return jnp.mean((jax.nn.relu(y) - target) ** 2), new_stats

    for _ in range(3):
        x = _x(rng, (4, 2, 8, 8))
        target = jnp.asarray(rng.uniform(size=(4, C, 8, 8)), jnp.float32)
        model, state, opt_state, value = train_step(model, state, opt_state, x, target)
        (expected, stats), grads = jax.value_and_grad(loss_ref, has_aux=True)(tree, stats, x, target)
        updates, opt_state_ref = tx.update(grads, opt_state_ref, tree)
        tree = optax.apply_updates(tree, updates)
        assert_ulps(value, expected)
    norm = model.layers[1]
    assert_ulps(model.layers[0].weight, tree["kernel"], ulps=64)
    for k in ("weight", "bias"):
        assert_ulps(getattr(norm, k), tree["norm"][k], ulps=64)
    for k in ("running_mean", "running_var"):
        assert_ulps(state.get(norm.state_index)[k], stats[k], ulps=64)
    assert int(state.get(norm.state_index)["num_batches_tracked"]) == 3


def test_state_round_trips_through_tree_serialise_leaves(rng, tmp_path):
    norm, state, params, stats = _make(rng, axis_name="batch", momentum=None)
    for _ in range(4):
        _, state = _batched(norm)(_x(rng, (3, C, 6, 6)), state)
    norm = eqx.nn.inference_mode(norm)
    x = _x(rng, (2, C, 6, 6))
    expected, _ = _batched(norm)(x, state)

    path = tmp_path / "norm.eqx"
    eqx.tree_serialise_leaves(path, (norm, state))
    like = eqx.nn.make_with_state(InstanceNorm)(C, axis_name="batch", momentum=None)
    restored, restored_state = eqx.tree_deserialise_leaves(path, like)
    assert restored.inference is True  # the flag is a leaf and is saved too
    assert_same_tree(restored_state.get(restored.state_index), state.get(norm.state_index))
    np.testing.assert_array_equal(np.asarray(restored.weight), np.asarray(params["weight"]))
    y, _ = _batched(restored)(x, restored_state)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
    assert int(restored_state.get(restored.state_index)["num_batches_tracked"]) == 6


def test_float64_default_dtype_under_x64(rng):
    with jax.enable_x64(True):
        norm, state = eqx.nn.make_with_state(InstanceNorm)(C)
        assert norm.weight.dtype == jnp.float64
        assert state.get(norm.state_index)["running_var"].dtype == jnp.float64
    norm, state = eqx.nn.make_with_state(InstanceNorm)(C, dtype=jnp.bfloat16)
    assert norm.bias.dtype == state.get(norm.state_index)["running_mean"].dtype == jnp.bfloat16


# ---------------------------------------------------------------- bad settings and inputs


def test_bad_settings_raise_at_construction():
    with pytest.raises(ValueError, match="momentum must be in"):
        InstanceNorm(C, momentum=-0.1)
    with pytest.raises(TypeError, match="momentum must be a number"):
        InstanceNorm(C, momentum=jnp.asarray(0.1))
    with pytest.raises(TypeError, match="inference must be a Python bool"):
        InstanceNorm(C, inference=0)
    with pytest.raises(TypeError, match="affine must be a Python bool"):
        InstanceNorm(C, affine="yes")
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        InstanceNorm(-1)


def test_bad_inputs_raise_at_trace_time_and_leave_the_state_usable(rng):
    norm, state, params, stats = _make(rng, axis_name="batch")
    jitted = eqx.filter_jit(lambda norm, state, x: _batched(norm)(x, state))
    with pytest.raises(ValueError, match=f"expected {C} channels on axis 0.*jax.vmap"):
        eqx.filter_jit(norm)(jnp.zeros((2, C, 4, 4)), state)  # a batch passed to the unbatched layer
    with pytest.raises(ValueError, match="unbatched sample"):
        norm(jnp.zeros((C,)), state)
    with pytest.raises(ValueError, match=r"trains inside jax.vmap\(\.\.\., axis_name='batch'\)"):
        norm(jnp.zeros((C, 4, 4)), state)
    with pytest.raises(TypeError, match="floating-point"):
        jitted(norm, state, jnp.zeros((2, C, 4, 4), jnp.int32))
    with pytest.raises(ValueError, match="more than 1 spatial element"):
        jitted(norm, state, jnp.zeros((2, C, 1)))
    with pytest.raises(TypeError, match="inference must be a Python bool"):
        norm(jnp.zeros((C, 4, 4)), state, inference="no")
    # the state was never replaced: it is still valid and unchanged
    x = _x(rng, (2, C, 4, 4))
    y, state = jitted(norm, state, x)
    y_ref, stats = F.instance_norm_apply(params, stats, x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(y_ref))
    assert_same_tree(_stats(norm, state), stats, ulps=4)  # one jitted program against eager calls
    # a layer without parameters or statistics still checks the channel count
    bare, bare_state = eqx.nn.make_with_state(InstanceNorm)(C, affine=False, track_running_stats=False)
    with pytest.raises(ValueError, match=f"expected {C} channels"):
        bare(jnp.zeros((C + 1, 4, 4)), bare_state)


# ---------------------------------------------------------------- the example


def test_equinox_example_trains_and_writes_its_plot(tmp_path):
    report, _ = run_example("equinox_layer.py", "--steps", "60", "--out", str(tmp_path / "out"), cwd=tmp_path)
    plot = read_png(tmp_path / "out" / "equinox_layer_loss.png")
    assert plot.shape[0] > 200 and plot.shape[1] > 300
    assert report["steps"] == 60 and report["num_batches_tracked"] == 60
    assert report["loss_last"] < report["loss_first"] - 0.1
    assert 0.4 < report["eval_accuracy"] <= 1.0  # four classes: chance is 0.25
    assert report["eval_matches_functional"] is True
