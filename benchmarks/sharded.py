"""Instance norm over 8 host CPU devices: a batch-sharded forward+backward, side by side.

Run from the repository root::

    python benchmarks/sharded.py                     # writes benchmarks/results/sharded.md and README's section
    python benchmarks/sharded.py --quick --out /tmp  # a small shape, a smoke run

The input is split along its batch axis over 8 host CPU devices (the script asks
XLA for them before JAX starts: ``--xla_force_host_platform_device_count=8``)
and each contender computes the output and the gradients to the input, weight
and bias of a fixed cotangent, under ``jax.jit``:

- lucid (native kernel): the default on CPU; every device runs lucid's kernels
  on its block (``custom_partitioning``), statistics never leave it;
- lucid (XLA path): the same program under ``pure_xla()``, partitioned by XLA;
- PyTorch: ``instance_norm`` forward and ``backward`` on the whole batch in one
  process, all threads: the same total work;
- copy: a jitted ``x * c`` of the sharded array, the memory-bandwidth floor.

Timing as in ``run.py``: interleaved rounds, the minimum of each.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import torch
import torch.nn.functional as TF
from cases import Case, lucid_forward_backward, make_inputs
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from run import EPS, _rerun_under_the_requested_allocator, allocator_mode, machine_line, measure, update_readme

import lucid.nn.functional as F

FULL_SHAPE = (32, 64, 64, 64)
QUICK_SHAPE = (16, 8, 16, 16)
README_START = "<!-- sharded-results:start -->"
README_END = "<!-- sharded-results:end -->"


def contenders(shape: tuple[int, ...]) -> dict[str, callable]:
    case = Case(shape)
    inputs = make_inputs(case)
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    split = NamedSharding(mesh, P("d"))
    x, g = jax.device_put((inputs.x, inputs.g), split)
    w, b = jnp.asarray(inputs.weight), jnp.asarray(inputs.bias)
    benches = {}
    c = jnp.asarray(1.0, x.dtype)
    copy = jax.jit(lambda x, c: x * c).lower(x, c).compile()
    benches["copy"] = lambda: jax.block_until_ready(copy(x, c))
    fn = lucid_forward_backward(case)
    kernel = jax.jit(fn).lower(x, w, b, g).compile()
    assert "lucid_instance_norm_backward" in kernel.as_text(), "the native kernel should run on every shard"
    benches["lucid (native kernel)"] = lambda: jax.block_until_ready(kernel(x, w, b, g))
    with F.pure_xla():
        xla = jax.jit(fn).lower(x, w, b, g).compile()
    benches["lucid (XLA path)"] = lambda: jax.block_until_ready(xla(x, w, b, g))
    tx = torch.from_numpy(inputs.x).requires_grad_()
    tw, tb = (torch.from_numpy(v).requires_grad_() for v in (inputs.weight, inputs.bias))
    tg = torch.from_numpy(inputs.g)

    def torch_step() -> None:
        for t in (tx, tw, tb):
            t.grad = None
        TF.instance_norm(tx, weight=tw, bias=tb, eps=EPS).backward(tg)

    benches["PyTorch (one process)"] = torch_step
    return benches


def markdown(shape: tuple[int, ...], seconds: dict[str, float], repeats: int) -> str:
    copy = seconds["copy"]
    lines = [
        machine_line(),
        "",
        f"Forward + backward of a `{'x'.join(map(str, shape))}` float32 input split along its batch axis over "
        f"8 host CPU devices (`--xla_force_host_platform_device_count=8`; this machine has {os.cpu_count()} "
        f"cores), under `jax.jit`; PyTorch runs the same total work in one process. Milliseconds per call, the "
        f"minimum of {repeats} interleaved rounds; ×copy over a jitted `x * c` of the sharded array. "
        f"Allocator: {allocator_mode()}.",
        "",
        "| contender | ms | ×copy | ÷ lucid (native kernel) |",
        "|---|---:|---:|---:|",
    ]
    kernel = seconds["lucid (native kernel)"]
    for name, s in seconds.items():
        if name != "copy":
            lines.append(f"| {name} | {1e3 * s:.3g} | {s / copy:.3g} | {s / kernel:.3g} |")
    lines.append(f"| copy | {1e3 * copy:.3g} | 1 | {copy / kernel:.3g} |")
    fastest = min((s, n) for n, s in seconds.items() if n != "copy")[1]
    lines += ["", f"Fastest: {fastest}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small shape and 2 rounds")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results", help="where sharded.md goes")
    parser.add_argument("--repeats", type=int, help="interleaved rounds (default 20, quick 2)")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--system-allocator", action="store_true", help="glibc's default allocator settings")
    args = parser.parse_args(argv)
    _rerun_under_the_requested_allocator(sys.argv)
    shape = QUICK_SHAPE if args.quick else FULL_SHAPE
    repeats = args.repeats or (2 if args.quick else 20)
    seconds = measure(contenders(shape), repeats, 0.02 if args.quick else 0.05)
    report = markdown(shape, seconds, repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sharded.md").write_text("# Instance norm over 8 host CPU devices\n\n" + report + "\n")
    print(report)
    if not (args.quick or args.no_readme):
        update_readme(report, README_START, README_END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
