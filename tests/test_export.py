"""``jax.export`` of jitted lucid pipelines: lowered for every backend on a CPU-only
machine, serialized, deserialized and run on CPU against the jitted original and PyTorch.

Exports are traced inside ``F.pure_xla()``: a serialized program cannot hold
lucid's native CPU kernel (an install-local custom call), and the jitted
originals they are compared with bit for bit run inside it too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from oracles import np_instance_norm, torch_instance_norm

import lucid.nn.functional as F
from lucid.nn import _native

PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
MOMENTUM = 0.1


@pytest.fixture(autouse=True)
def _pure_xla():
    with F.pure_xla():
        yield


@jax.jit
def pipeline(params, stats, x, g):
    """A training step and an evaluation: the output, the gradients of ``sum(y * g)``,
    the updated running statistics, and the evaluation output with those statistics."""

    def loss(params, x):
        y, new_stats = F.instance_norm_apply(params, stats, x, momentum=MOMENTUM)
        return jnp.sum(y * g), (y, new_stats)

    (_, (y, new_stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    y_eval, _ = F.instance_norm_apply(params, new_stats, x, training=False)
    return {"y": y, "dx": dx, "dw": dparams["weight"], "db": dparams["bias"],
            "running_mean": new_stats["running_mean"], "running_var": new_stats["running_var"],
            "num_batches_tracked": new_stats["num_batches_tracked"], "y_eval": y_eval}


def _args(rng: np.random.Generator, shape: tuple[int, ...]) -> tuple:
    c = shape[1]
    params = {"weight": rng.normal(size=c).astype(np.float32), "bias": rng.normal(size=c).astype(np.float32)}
    stats = {"running_mean": rng.normal(size=c).astype(np.float32),
             "running_var": rng.uniform(0.5, 2.0, size=c).astype(np.float32),
             "num_batches_tracked": np.int32(3)}
    x = (rng.normal(size=shape) * 2.5 + 1.5).astype(np.float32)
    g = rng.normal(size=shape).astype(np.float32)
    return params, stats, x, g


def _assert_matches_torch(out: dict, params: dict, stats: dict, x: np.ndarray, g: np.ndarray) -> None:
    t = torch_instance_norm(x, params["weight"], params["bias"], stats["running_mean"], stats["running_var"],
                            momentum=MOMENTUM, grad_out=g)
    for key in ("y", "dx", "dw", "db", "running_mean", "running_var"):
        np.testing.assert_allclose(out[key], t[key], rtol=1e-4, atol=5e-5, err_msg=key)
    t_eval = torch_instance_norm(x, params["weight"], params["bias"], t["running_mean"], t["running_var"],
                                 training=False)
    np.testing.assert_allclose(out["y_eval"], t_eval["y"], rtol=1e-4, atol=5e-5)
    assert int(out["num_batches_tracked"]) == int(stats["num_batches_tracked"]) + 1


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(np.asarray(a[key]), np.asarray(b[key]), err_msg=key)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_lowers_for_each_platform_and_round_trips(rng, platform):
    args = _args(rng, (2, 3, 6, 5))
    exported = export.export(pipeline, platforms=(platform,))(*args)
    blob = exported.serialize()
    assert isinstance(blob, (bytes, bytearray)) and len(blob) > 0
    restored = export.deserialize(blob)
    assert restored.platforms == (platform,)
    assert restored.in_avals == exported.in_avals and restored.out_avals == exported.out_avals
    assert restored.mlir_module() == exported.mlir_module()
    if platform == "cpu":
        out = restored.call(*args)
        _assert_identical(out, pipeline(*args))
        _assert_matches_torch(out, *args)
    else:
        with pytest.raises(ValueError, match=f"exported for platforms.*{platform}.*used on.*cpu"):
            restored.call(*args)


def test_one_artifact_for_all_platforms_with_a_symbolic_batch_runs_on_cpu(rng):
    """One serialized module holds all four lowerings and any batch size."""
    (batch,) = export.symbolic_shape("b")
    params, stats, x, g = _args(rng, (5, 3, 6, 5))
    spec = jax.ShapeDtypeStruct((batch, 3, 6, 5), jnp.float32)
    exported = export.export(pipeline, platforms=PLATFORMS)(params, stats, spec, spec)
    restored = export.deserialize(exported.serialize())
    assert restored.platforms == PLATFORMS
    assert restored.mlir_module() == exported.mlir_module()
    for n in (2, 5):
        args = (params, stats, x[:n], g[:n])
        out = restored.call(*args)
        _assert_matches_torch(out, *args)
        if n == 2:  # the shape the other tests compiled the jitted original for
            # A differently compiled module of the same math: equal up to float32 rounding.
            for key, value in pipeline(*args).items():
                np.testing.assert_allclose(out[key], value, rtol=1e-6, atol=1e-6, err_msg=key)


def test_sharded_pipeline_exports_for_all_platforms_and_runs_on_eight_devices(rng):
    """A pipeline whose input is split along a spatial axis over an explicit mesh of 8."""
    params, stats, x, g = _args(rng, (2, 3, 32, 6))
    mesh = jax.make_mesh((8,), ("d",), axis_types=(AxisType.Explicit,))
    split, replicated = NamedSharding(mesh, P(None, None, "d")), NamedSharding(mesh, P())
    with jax.set_mesh(mesh):
        sharded = jax.jit(pipeline.__wrapped__, in_shardings=(replicated, replicated, split, split))
        specs = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=split) for a in (x, g)]
        exported = export.export(sharded, platforms=PLATFORMS)(params, stats, *specs)
        restored = export.deserialize(exported.serialize())
        assert restored.platforms == PLATFORMS and restored.nr_devices == 8
        xs, gs = jax.device_put((x, g), split)
        ps, ss = jax.device_put((params, stats), replicated)
        out = restored.call(ps, ss, xs, gs)
        assert out["y"].sharding.is_equivalent_to(split, x.ndim)
        _assert_identical(out, exported.call(ps, ss, xs, gs))
    for key, value in pipeline(params, stats, x, g).items():  # one device
        np.testing.assert_allclose(out[key], value, rtol=2e-5, atol=2e-5, err_msg=key)
    np.testing.assert_allclose(out["y"], np_instance_norm(x, params["weight"], params["bias"]), rtol=1e-5, atol=2e-5)
    _assert_matches_torch(out, params, stats, x, g)


def test_export_with_the_native_kernel_is_refused_and_pure_xla_holds_no_custom_call(rng):
    """Outside ``pure_xla`` the CPU lowering carries lucid's kernel, which lucid refuses to
    export, naming the way out (never a silently unportable artifact); inside, no custom call is left."""
    args = _args(rng, (2, 3, 6, 5))
    assert F.native_kernel_status().loaded
    assert not F.native_kernel_available()  # this module's pure_xla fixture
    with F.pure_xla():
        portable = export.export(pipeline, platforms=PLATFORMS)(*args)
    assert "lucid_instance_norm_forward" not in portable.mlir_module()
    with _native._default_implementation("native"):  # undo this module's pure_xla fixture
        with pytest.raises(ValueError, match=r"cannot be exported.*lucid\.nn\.functional\.pure_xla\(\)"):
            export.export(pipeline, platforms=("cpu",))(*args)
