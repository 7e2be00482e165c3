"""Many devices: ``jax.jit`` on sharded inputs, ``shard_map`` and ``pmap``.

Runs on the 8 host CPU devices that conftest configures. Every sharded result
is checked twice: against lucid on one device, and against an independent
oracle (PyTorch, float64 NumPy, or ``jax.grad`` of the plain ``jnp``
reference), so a bug common to the sharded and the one-device path cannot hide.
The compiled programs are also read: only per-instance statistics may cross
devices, never the input.
"""

from __future__ import annotations

import contextlib
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_instance_norm, ref_instance_norm, torch_instance_norm

import lucid.nn.functional as F

AXIS_TYPES = [AxisType.Explicit, AxisType.Auto]
MOMENTUM = 0.1

# name: (shape, how x is split over a mesh of 8 along the axis "d")
JIT_CASES = {
    "batch-2d": ((8, 2, 16, 16), P("d")),
    "channel-2d": ((2, 16, 16, 16), P(None, "d")),
    "space-2d": ((2, 2, 64, 16), P(None, None, "d")),
    "space-3d": ((2, 2, 4, 16, 8), P(None, None, None, "d")),
}
# On CPU, the native kernel runs on every device's block where the split leaves space whole;
# where it splits space, lucid's formulas run on the blocks with their sums combined.
KERNEL_CASES = ("batch-2d", "channel-2d")
MASKED_SHAPE = (4, 2, 32, 8)  # split (2 batch) x (4 row bands) on a 2 x 4 mesh


# --------------------------------------------------------------------------
# Problems and oracles
# --------------------------------------------------------------------------


def _problem(rng: np.random.Generator, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    c = shape[1]
    return {
        "x": (rng.normal(size=shape) * 2.5 + 1.5).astype(np.float32),
        "g": rng.normal(size=shape).astype(np.float32),  # the output cotangent
        "weight": rng.normal(size=c).astype(np.float32),
        "bias": rng.normal(size=c).astype(np.float32),
        "running_mean": rng.normal(size=c).astype(np.float32),
        "running_var": rng.uniform(0.5, 2.0, size=c).astype(np.float32),
    }


def _params_stats(p: dict) -> tuple[dict, dict]:
    params = {"weight": p["weight"], "bias": p["bias"]}
    stats = {"running_mean": p["running_mean"], "running_var": p["running_var"],
             "num_batches_tracked": np.int32(0)}
    return params, stats


def _prefix_mask(shape: tuple[int, ...], lengths: list[int]) -> np.ndarray:
    """Item ``n`` is valid on its first ``lengths[n]`` rows of axis 2: a padded batch.

    Split over devices along that axis, some devices hold all, some part and
    some none of an item's valid elements, so per-device counts differ.
    """
    rows = np.arange(shape[2]).reshape(1, 1, -1, *([1] * (len(shape) - 3)))
    valid = rows < np.asarray(lengths).reshape(-1, 1, 1, *([1] * (len(shape) - 3)))
    return np.broadcast_to(valid, (shape[0], 1) + tuple(shape[2:])).copy()


def _train(params, stats, x, g, mask=None, **names):
    """lucid's training step: output, new running statistics and the gradients of ``sum(y * g)``."""

    def loss(params, x):
        y, new_stats = F.instance_norm_apply(params, stats, x, mask=mask, momentum=MOMENTUM, **names)
        return jnp.sum(y * g), (y, new_stats)

    (_, (y, new_stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return {"y": y, "dx": dx, "dw": dparams["weight"], "db": dparams["bias"],
            "running_mean": new_stats["running_mean"], "running_var": new_stats["running_var"],
            "num_batches_tracked": new_stats["num_batches_tracked"]}


# One compiled program per input sharding; the one-device runs of a shape are shared across tests.
_train_jit = jax.jit(_train)


@jax.jit
def _train_and_reference_page_function(params, stats, x, g):
    """:func:`_train`, plus ``F.instance_norm`` (the reference page's signature) in
    training and in evaluation, all in one compiled program."""
    out = _train(params, stats, x, g)
    w, b = params["weight"], params["bias"]
    out["y_fn"] = F.instance_norm(x, None, None, w, b)
    out["y_eval"] = F.instance_norm(x, stats["running_mean"], stats["running_var"], w, b, training=False)
    return out


@jax.jit
def _reference_train(p: dict, mask: np.ndarray | None) -> dict[str, np.ndarray]:
    """The same step from the plain ``jnp`` reference and ``jax.grad``; running
    statistics from their definition (batch mean of instance means and unbiased variances)."""

    def loss(x, w, b):
        y, mean, var, count = ref_instance_norm(x, w, b, mask=mask)
        return jnp.sum(y * p["g"]), (y, mean, var, count)

    (_, (y, mean, var, count)), (dx, dw, db) = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
        p["x"], p["weight"], p["bias"])
    other = tuple(a for a in range(y.ndim) if a != 1)
    unbiased = var * count / jnp.maximum(count - 1, 1)
    return {"y": y, "dx": dx, "dw": dw, "db": db,
            "running_mean": (1 - MOMENTUM) * p["running_mean"] + MOMENTUM * jnp.mean(mean, axis=other),
            "running_var": (1 - MOMENTUM) * p["running_var"] + MOMENTUM * jnp.mean(unbiased, axis=other)}


def _torch_train(p: dict) -> dict[str, np.ndarray]:
    out = torch_instance_norm(p["x"], p["weight"], p["bias"], p["running_mean"], p["running_var"],
                              momentum=MOMENTUM, grad_out=p["g"])
    return {k: out[k] for k in ("y", "dx", "dw", "db", "running_mean", "running_var")}


def _assert_close(got: dict, expected: dict, *, tight: bool) -> None:
    """``tight``: another lucid run (same formulas, other summation order); else an oracle."""
    rtol, atol = (2e-5, 2e-5) if tight else (1e-4, 5e-5)
    for key, want in expected.items():
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(want), rtol=rtol, atol=atol, err_msg=key)


# --------------------------------------------------------------------------
# Reading the compiled program
# --------------------------------------------------------------------------

_COLLECTIVE = re.compile(
    r"=\s*(\([^=]*?\)|\S+)\s+(all-reduce|all-gather|all-to-all|collective-permute|reduce-scatter)(?:-start)?\("
)
_ARRAY_TYPE = re.compile(r"\b[a-z]+\d*\[([\d,]*)\]")


def collectives(hlo: str) -> list[tuple[str, list[int]]]:
    """Every cross-device op of a compiled HLO text, with the element count of each array it yields."""
    found = []
    for line in hlo.splitlines():
        m = _COLLECTIVE.search(line)
        if m:
            sizes = [math.prod(int(d) for d in dims.split(",") if d) for dims in _ARRAY_TYPE.findall(m.group(1))]
            found.append((m.group(2), sizes))
    return found


def assert_moves_only_statistics(hlo: str, shape: tuple[int, ...], num_devices: int, reduces: bool = True) -> list:
    """Only per-instance statistics cross devices.

    All-reduces carry at most ``N * C`` values per array (one per instance).
    Gathers, permutes and all-to-alls carry at most ``N * C * devices`` (the
    per-device partial sums of every instance); the input's shard is larger
    than that, so a gathered or permuted input fails. ``reduces``: a split that leaves
    whole instances and whole channels on every device (batch or channel splits) need not
    reduce anything across devices (``False`` skips that check).
    """
    per_instance = shape[0] * shape[1]
    shard = math.prod(shape) // num_devices
    assert per_instance * num_devices < shard, "test shapes too small to tell statistics from data"
    found = collectives(hlo)
    if reduces:
        assert any(op == "all-reduce" for op, _ in found), f"no statistics were reduced across devices: {found}"
    for op, sizes in found:
        limit = per_instance if op == "all-reduce" else per_instance * num_devices
        assert max(sizes) <= limit, f"{op} of {max(sizes)} elements (input shard: {shard}): {found}"
    return found


def test_collective_check_catches_a_gathered_input():
    """The HLO check itself can fail: gathering the input onto every device is caught."""
    shape, spec = JIT_CASES["space-2d"]
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    x = jax.device_put(np.ones(shape, np.float32), NamedSharding(mesh, spec))

    # A sum (an all-reduce of one value), then the whole input replicated on every device.
    gathering = jax.jit(lambda x: x + jnp.sum(x), out_shardings=NamedSharding(mesh, P()))
    hlo = gathering.lower(x).compile().as_text()
    assert any(op != "all-reduce" for op, _ in collectives(hlo))
    with pytest.raises(AssertionError, match="input shard"):
        assert_moves_only_statistics(hlo, shape, 8)


# --------------------------------------------------------------------------
# 1. jax.jit on sharded inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("in_context", [True, False], ids=["set_mesh", "device_put-only"])
@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
@pytest.mark.parametrize("case", sorted(JIT_CASES))
def test_jit_on_sharded_input_matches_one_device_and_torch(rng, axis_type, case, in_context):
    """Outputs, running statistics and gradients as on one device, the input's sharding kept, only
    statistics crossing devices, and on CPU the native kernel on every device's block: with the mesh
    in context (``jax.set_mesh``) and without (arrays placed with ``jax.device_put``, then ``jax.jit``).

    Regressions: on an ``Explicit`` mesh with a spatial axis split, the shift (the first spatial
    element, a slice to size 1 of a sharded axis) raised ``ShardingTypeError`` at trace time; on
    an ``Auto`` mesh outside ``set_mesh``, the kernel's opaque call made XLA gather the whole input
    onto every device and return a replicated output.
    """
    shape, spec = JIT_CASES[case]
    p = _problem(rng, shape)
    params, stats = _params_stats(p)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(axis_type,))
    split, replicated = NamedSharding(mesh, spec), NamedSharding(mesh, P())
    with jax.set_mesh(mesh) if in_context else contextlib.nullcontext():
        x, g = jax.device_put((p["x"], p["g"]), split)
        params_r, stats_r = jax.device_put((params, stats), replicated)
        step = _train_and_reference_page_function.lower(params_r, stats_r, x, g).compile()
        got = step(params_r, stats_r, x, g)

    for key in ("y", "dx", "y_fn", "y_eval"):
        assert got[key].sharding.is_equivalent_to(x.sharding, x.ndim), (key, got[key].sharding, x.sharding)
    _assert_close(got, _train_and_reference_page_function(params, stats, p["x"], p["g"]), tight=True)
    _assert_close(got, _torch_train(p), tight=False)
    assert int(got["num_batches_tracked"]) == 1
    np.testing.assert_allclose(got["y_fn"], np_instance_norm(p["x"], p["weight"], p["bias"]), rtol=1e-5, atol=2e-5)
    eval_expected = torch_instance_norm(p["x"], p["weight"], p["bias"], p["running_mean"], p["running_var"],
                                        training=False)["y"]
    np.testing.assert_allclose(got["y_eval"], eval_expected, rtol=1e-5, atol=2e-5)
    hlo = step.as_text()
    assert_moves_only_statistics(hlo, shape, 8, reduces=case != "channel-2d")
    uses_kernel = [k in hlo for k in ("lucid_instance_norm_forward", "lucid_instance_norm_backward")]
    assert uses_kernel == [case in KERNEL_CASES] * 2, uses_kernel


@pytest.mark.parametrize("axis_type", AXIS_TYPES, ids=str)
def test_jit_on_a_2d_mesh_batch_and_space_with_padding_mask(rng, axis_type):
    """Batch over one mesh axis, space over the other; a padding mask split with them."""
    shape = MASKED_SHAPE
    p = _problem(rng, shape)
    mask = _prefix_mask(shape, [32, 20, 9, 3])
    params, stats = _params_stats(p)
    mesh = jax.make_mesh((2, 4), ("b", "s"), axis_types=(axis_type, axis_type))
    split, replicated = NamedSharding(mesh, P("b", None, "s")), NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        x, g, m = jax.device_put((p["x"], p["g"], mask), split)
        params_r, stats_r = jax.device_put((params, stats), replicated)
        step = _train_jit.lower(params_r, stats_r, x, g, m).compile()
        got = step(params_r, stats_r, x, g, m)

    assert got["y"].sharding.is_equivalent_to(x.sharding, x.ndim)
    assert got["dx"].sharding.is_equivalent_to(x.sharding, x.ndim)
    _assert_close(got, _train_jit(params, stats, p["x"], p["g"], mask), tight=True)
    _assert_close(got, _reference_train(p, mask), tight=False)
    for n, length in enumerate([32, 20, 9, 3]):  # each item as if alone and unpadded
        alone = np_instance_norm(p["x"][n:n + 1, :, :length], p["weight"], p["bias"])
        np.testing.assert_allclose(np.asarray(got["y"])[n:n + 1, :, :length], alone, rtol=1e-5, atol=2e-5)
    assert_moves_only_statistics(step.as_text(), shape, 8)


def test_jit_explicit_spatial_split_stays_accurate_far_from_zero(rng):
    """With the spatial axis split, the shift is a mean over devices, not one element:
    it must still keep float32 outputs within 1e-4 of float64 at mean/std = 1e4."""
    shape = (2, 3, 64, 16)
    x = (1e4 + rng.normal(size=shape)).astype(np.float32)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P(None, None, "d")))
        y = jax.jit(lambda x: F.instance_norm(x))(xs)
    np.testing.assert_allclose(y, np_instance_norm(x), atol=1e-4)


# --------------------------------------------------------------------------
# 2. shard_map and pmap
# --------------------------------------------------------------------------


def _shard_map_train(mesh, x_spec, mask, **names):
    """A ``shard_map``-ped training step; statistics and parameter gradients come out replicated.

    ``check_vma`` (on by default) proves at trace time that they are the same on
    every device: an output spec of ``P()`` for a per-device value is an error.
    """
    mask_spec = None if mask is None else x_spec
    out_specs = {"y": x_spec, "dx": x_spec, "dw": P(), "db": P(),
                 "running_mean": P(), "running_var": P(), "num_batches_tracked": P()}

    def body(params, stats, x, g, mask):
        return _train(params, stats, x, g, mask, **names)

    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P(), P(), x_spec, x_spec, mask_spec),
                                 out_specs=out_specs))


def test_shard_map_axis_name_syncs_running_stats_and_keeps_instance_stats_local(rng):
    shape = (8, 3, 16, 16)
    p = _problem(rng, shape)
    params, stats = _params_stats(p)
    mesh = jax.make_mesh((8,), ("b",))
    split, replicated = NamedSharding(mesh, P("b")), NamedSharding(mesh, P())
    x, g = jax.device_put((p["x"], p["g"]), split)
    params_r, stats_r = jax.device_put((params, stats), replicated)

    step = _shard_map_train(mesh, P("b"), None, axis_name="b").lower(params_r, stats_r, x, g, None).compile()
    got = step(params_r, stats_r, x, g, None)
    _assert_close(got, _train_jit(params, stats, p["x"], p["g"]), tight=True)
    hlo = step.as_text()  # each device runs the native kernels on its block; only statistics are reduced
    assert "lucid_instance_norm_forward" in hlo and "lucid_instance_norm_backward" in hlo
    assert_moves_only_statistics(hlo, shape, 8)
    _assert_close(got, _torch_train(p), tight=False)

    # Without axis_name each device averages its own items only (the contrast).
    def local(stats, x):
        _, new = F.instance_norm_apply(params, stats, x, momentum=MOMENTUM)
        return new["running_mean"][None]

    per_device = jax.shard_map(local, mesh=mesh, in_specs=(P(), P("b")), out_specs=P("b"))(stats_r, x)
    for i in (0, 5):
        expected = torch_instance_norm(p["x"][i:i + 1], None, None, p["running_mean"], p["running_var"],
                                       momentum=MOMENTUM)["running_mean"]
        np.testing.assert_allclose(np.asarray(per_device)[i], expected, rtol=1e-5, atol=1e-6)
    assert not np.allclose(np.asarray(per_device)[0], got["running_mean"], atol=1e-3)


@pytest.mark.parametrize("layout, masked", [("space", False), ("batch+space", True)])
def test_shard_map_spatial_axis_name_reduces_sums_and_counts(rng, layout, masked):
    if layout == "space":
        shape, mesh = (2, 3, 32, 5), jax.make_mesh((8,), ("s",))
        x_spec, names = P(None, None, "s"), {"spatial_axis_name": "s"}
    else:
        shape, mesh = MASKED_SHAPE, jax.make_mesh((2, 4), ("b", "s"))
        x_spec, names = P("b", None, "s"), {"axis_name": "b", "spatial_axis_name": "s"}
    p = _problem(rng, shape)
    # Split in 4 or 8 bands of rows, some devices hold no valid element of an item.
    mask = _prefix_mask(shape, [32, 20, 9, 3][:shape[0]]) if masked else None
    params, stats = _params_stats(p)
    split, replicated = NamedSharding(mesh, x_spec), NamedSharding(mesh, P())
    x, g = jax.device_put((p["x"], p["g"]), split)
    m = None if mask is None else jax.device_put(mask, split)
    params_r, stats_r = jax.device_put((params, stats), replicated)

    step = _shard_map_train(mesh, x_spec, m, **names).lower(params_r, stats_r, x, g, m).compile()
    got = step(params_r, stats_r, x, g, m)
    _assert_close(got, _train_jit(params, stats, p["x"], p["g"], mask), tight=True)
    assert_moves_only_statistics(step.as_text(), shape, 8)
    _assert_close(got, _torch_train(p) if mask is None else _reference_train(p, mask), tight=False)


def test_pmap_axis_name_and_spatial_axis_name_match_torch(rng):
    """``jax.pmap`` (still public in this jax, now built on shard_map) with both names."""
    p = _problem(rng, (8, 3, 8, 6))
    params, stats = _params_stats(p)
    expected = _torch_train(p)

    def by_batch(x, g):  # a training step; the parameters' gradients are each device's share
        return _train(params, stats, x, g, axis_name="i")

    step = jax.pmap(by_batch, axis_name="i")
    blocks = [v.reshape(8, 1, *v.shape[1:]) for v in (p["x"], p["g"])]
    got = step(*blocks)
    hlo = step.lower(*blocks).compile().as_text()  # each device runs the native kernels on its block
    assert "lucid_instance_norm_forward" in hlo and "lucid_instance_norm_backward" in hlo
    for key in ("y", "dx"):
        np.testing.assert_allclose(got[key].reshape(p["x"].shape), expected[key], rtol=1e-4, atol=5e-5)
    for key in ("running_mean", "running_var"):
        np.testing.assert_allclose(got[key], np.broadcast_to(expected[key], (8, 3)), rtol=1e-5, atol=1e-6)
    for key in ("dw", "db"):  # per device: its own item's share
        np.testing.assert_allclose(got[key].sum(axis=0), expected[key], rtol=1e-4, atol=5e-5)

    # Space split in 8 row bands: (2, 3, 32, 6) -> (8 bands, 2, 3, 4, 6).
    q = _problem(rng, (2, 3, 32, 6))
    bands = q["x"].reshape(2, 3, 8, 4, 6).transpose(2, 0, 1, 3, 4)

    def by_space(x):
        return F.instance_norm_apply({"weight": q["weight"], "bias": q["bias"]}, None, x, spatial_axis_name="r")[0]

    y = jax.pmap(by_space, axis_name="r")(bands).transpose(1, 2, 0, 3, 4).reshape(q["x"].shape)
    np.testing.assert_allclose(y, np_instance_norm(q["x"], q["weight"], q["bias"]), rtol=1e-5, atol=2e-5)


def test_vmap_over_a_sharded_batch_runs_the_kernel_on_every_block(rng):
    """Per-example weights under ``vmap`` (the kernels' leading axis) with the mapped axis split over
    devices: each device runs the kernels on its examples, equal to one device."""
    xs = rng.normal(size=(8, 2, 3, 16, 16)).astype(np.float32)
    ws = rng.normal(size=(8, 3)).astype(np.float32)

    def per_example(x, w):
        return jax.grad(lambda x, w: jnp.sum(F.instance_norm_apply({"weight": w}, None, x)[0] ** 3),
                        argnums=(0, 1))(x, w)

    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Auto,))
    x_split, w_split = jax.device_put((xs, ws), NamedSharding(mesh, P("d")))
    step = jax.jit(jax.vmap(per_example)).lower(x_split, w_split).compile()
    got = step(x_split, w_split)
    hlo = step.as_text()
    assert "lucid_instance_norm_forward" in hlo and "lucid_instance_norm_backward" in hlo
    assert all(max(sizes) <= 8 * 2 * 3 for _, sizes in collectives(hlo)), collectives(hlo)
    assert got[0].sharding.is_equivalent_to(x_split.sharding, xs.ndim)
    for a, b in zip(got, jax.jit(jax.vmap(per_example))(xs, ws)):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_axis_names_outside_a_mapped_context_raise_a_clear_error():
    params, stats = F.instance_norm_init(2)
    x = np.ones((8, 2, 4, 4), np.float32)
    with pytest.raises(ValueError, match="spatial_axis_name='s' is not a mapped axis"):
        F.instance_norm_apply(params, stats, x, spatial_axis_name="s")
    # Under jax.jit the mesh axes are not mapped names: the compiler reduces by itself.
    mesh = jax.make_mesh((8,), ("d",))
    with jax.set_mesh(mesh):
        xs = jax.device_put(x, NamedSharding(mesh, P("d")))
        with pytest.raises(ValueError, match="axis_name='d' is not a mapped axis.*leave axis_name=None"):
            jax.jit(lambda x: F.instance_norm_apply(params, stats, x, axis_name="d"))(xs)
