"""One process of tests/test_multihost.py: two of these, two CPU devices each, one global array.

Usage: python multihost_worker.py PROCESS_ID PORT OUT.npz
"""

import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lucid.nn.functional as F

SHAPE = (8, 3, 16, 16)


def problem():
    """The same global problem in every process (and in the test's one-process oracle)."""
    rng = np.random.default_rng(7)
    x = (rng.normal(size=SHAPE) * 2 + 3).astype(np.float32)
    g = rng.normal(size=SHAPE).astype(np.float32)
    params, stats = F.instance_norm_init(SHAPE[1])
    params = {k: np.asarray(v) + rng.normal(size=SHAPE[1]).astype(np.float32) for k, v in params.items()}
    return x, g, params, {k: np.asarray(v) for k, v in stats.items()}


def train(params, stats, x, g):
    def loss(params, x):
        y, new_stats = F.instance_norm_apply(params, stats, x)
        return jnp.sum(y * g), (y, new_stats)

    (_, (y, new_stats)), (dparams, dx) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return {"y": y, "dx": dx, "dw": dparams["weight"], "db": dparams["bias"], **new_stats}


def main(process_id: int, port: int, out: str) -> None:
    # Set here, not at import: the test imports this module for problem() and train(), and its own
    # process keeps the suite's devices. (Read when JAX first starts its CPU backend.)
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    os.environ["JAX_PLATFORMS"] = "cpu"
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)
    x, g, params, stats = problem()
    mesh = jax.make_mesh((jax.device_count(),), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, P("d"))
    rows = slice(process_id * SHAPE[0] // 2, (process_id + 1) * SHAPE[0] // 2)  # this process's share
    xs, gs = (jax.make_array_from_process_local_data(split, v[rows]) for v in (x, g))
    step = jax.jit(train).lower(params, stats, xs, gs).compile()
    got = step(params, stats, xs, gs)
    local = {}
    for key, value in got.items():
        if key in ("y", "dx"):  # this process's rows, from its own devices' shards
            shards = sorted(value.addressable_shards, key=lambda s: s.index[0].start)
            local[key] = np.concatenate([np.asarray(s.data) for s in shards])
        else:
            local[key] = np.asarray(value.addressable_data(0))
    local["uses_kernel"] = np.asarray("lucid_instance_norm_backward" in step.as_text())
    local["sharded_like_x"] = np.asarray(got["y"].sharding.is_equivalent_to(split, len(SHAPE)))
    np.savez(out, **local)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])
