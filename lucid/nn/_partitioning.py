"""The native kernels under sharding: every device runs the kernel on its own block.

An FFI call is opaque to XLA's SPMD partitioner, which would gather a sharded
input in front of it (and compute the whole batch on every device). The
kernels' calls are therefore wrapped with
``jax.experimental.custom_partitioning``, with a Shardy sharding rule over the
caller's own axes (leading ``vmap`` axes, batch, channels, every spatial
axis), so that nothing is reshaped across devices:

* leading, batch and channel axes may be split freely: each device runs the
  kernel on its block (weight and bias follow the channel split);
* when a spatial axis is split, each device runs lucid's ``jnp`` formulas on
  its block instead, with the per-instance sums combined by ``psum`` over the
  mesh axes that split space: only O(N·C) numbers cross devices, never ``x``.

Inside ``shard_map`` (every mesh axis manual) and on one device,
``custom_partitioning`` inlines the call: the kernel runs as is.

Operands and results come in three kinds, by shape: ``"x"`` is shaped like the
input, ``(*lead, N, C, *spatial)`` or ``(*lead, N, *spatial, C)``; ``"s"``
holds one number per instance, ``(*lead, N, C)``; ``"v"`` one per channel,
``(*lead, C)``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from jax.experimental.custom_partitioning import custom_partitioning
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def _factors(rank: int, channels_last: int, leading: int) -> dict[str, list[str]]:
    """Sharding-rule factor names of each kind of operand."""
    lead = [f"l{i}" for i in range(leading)]
    spatial = [f"s{i}" for i in range(rank - leading - 2)]
    x = [*lead, "n", *spatial, "c"] if channels_last else [*lead, "n", "c", *spatial]
    return {"x": x, "s": [*lead, "n", "c"], "v": [*lead, "c"]}


def _spatial_dims(rank: int, channels_last: int, leading: int) -> range:
    return range(leading + 1, rank - 1) if channels_last else range(leading + 2, rank)


def _kind_specs(x_spec: tuple, rank: int, channels_last: int, leading: int) -> dict[str, P]:
    """The partition spec of each kind of operand, following ``x``'s (spatial splits dropped)."""
    spec = (*x_spec, *(None,) * (rank - len(x_spec)))
    n, c = leading, (rank - 1 if channels_last else leading + 1)
    lead = spec[:leading]
    return {"x": P(*spec), "s": P(*lead, spec[n], spec[c]), "v": P(*lead, spec[c])}


def _axis_names(entry) -> tuple:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def shardwise(local: Callable, in_kinds: str, out_kinds: str) -> Callable:
    """``local`` as a function that each device runs on its block of sharded operands.

    Args:
        local: ``local(*operands, spatial_axis_name, **params)``, the
            computation on one block; ``spatial_axis_name`` is ``None`` when
            every spatial axis is whole on the device, else the mesh axes
            that split them (``local`` must then combine its sums across
            them).
        in_kinds, out_kinds: the kind of each operand and result (``"x"``,
            ``"s"`` or ``"v"``, see the module docstring); the first operand
            is ``x``.

    Returns:
        ``call(params, *operands)`` with ``params`` a hashable tuple of
        ``(name, value)`` pairs, among them ``channels_last`` and
        ``leading``, passed on to ``local``.
    """

    def run(params, *operands):
        return local(*operands, spatial_axis_name=None, **dict(params))

    call = custom_partitioning(run, static_argnums=(0,))

    def sharding_rule(params, mesh, operand_types, result_types):
        settings = dict(params)
        factors = _factors(len(operand_types[0].shape), settings["channels_last"], settings["leading"])
        operands = ", ".join(" ".join(factors[k]) for k in in_kinds)
        results = ", ".join(" ".join(factors[k]) for k in out_kinds)
        return f"{operands} -> {results}"

    def partition(params, mesh, arg_shapes, result_shape):
        settings = dict(params)
        rank = len(arg_shapes[0].shape)
        x_spec = tuple(arg_shapes[0].sharding.spec)
        dims = _spatial_dims(rank, settings["channels_last"], settings["leading"])
        split = tuple(a for d in dims if d < len(x_spec) for a in _axis_names(x_spec[d]))
        specs = _kind_specs(x_spec, rank, settings["channels_last"], settings["leading"])
        arg_shardings = tuple(NamedSharding(mesh, specs[k]) for k in in_kinds)
        result_shardings = [NamedSharding(mesh, specs[k]) for k in out_kinds]  # local returns a list
        lower = partial(local, spatial_axis_name=split or None, **settings)
        return mesh, lower, result_shardings, arg_shardings

    call.def_partition(partition=partition, sharding_rule=sharding_rule)
    return call
