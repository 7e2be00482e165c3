"""What XLA makes of lucid: the kernels of the optimized forward and forward+backward.

Run from the repository root::

    python benchmarks/hlo.py                                   # 8x64x128x128 float32
    python benchmarks/hlo.py --shape 16,80,4000 --dtype bfloat16
    python benchmarks/hlo.py --channels-last --full            # also print the whole HLO
    python benchmarks/hlo.py --pure-xla                        # the XLA path (GPU/TPU, export), on CPU

For each program it lists the top-level instructions of the compiled module in
schedule order (each fusion is one kernel, one pass over its operands) with
the operations fused into it, and estimates the memory traffic in multiples of
the input size: a copy reads the input once and writes it once, so an
instance norm forward cannot do better than about ``1 + 1`` and every extra
input-sized read or write shows up here. A top-level result of input size
that is not a program output is a temporary: it costs a write and a read.
"""

from __future__ import annotations

import argparse
import contextlib
import re
import sys
from collections import Counter
from collections.abc import Callable
from typing import NamedTuple

import jax
import numpy as np
from cases import Case, lucid_arrays, lucid_forward, lucid_forward_backward, make_inputs

import lucid.nn.functional as F

_DTYPE_BYTES = {
    "pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2,
    "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8, "c64": 8, "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*)\[([0-9,]*)\]")
#: Instructions that move no data: aliases, views and bookkeeping.
_FREE = {"parameter", "get-tuple-element", "bitcast", "tuple", "constant"}
#: Fused operations left out of a kernel's summary: they only feed the others.
_PLUMBING = _FREE | {"broadcast", "reshape"}


class Instruction(NamedTuple):
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    arguments: str  # the text between the opcode's parentheses
    attributes: str
    is_root: bool


def shape_bytes(shape: str) -> int:
    """Bytes of an HLO shape such as ``f32[8,64]{1,0}`` or a tuple of them."""
    total = 0
    for dtype, dims in _ARRAY.findall(shape):
        total += int(np.prod([int(d) for d in dims.split(",") if d], dtype=np.int64)) * _DTYPE_BYTES.get(dtype, 4)
    return total


def _closing(text: str, start: int) -> int:
    """Index of the parenthesis closing the one at ``text[start]``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise ValueError(f"unbalanced parentheses in {text!r}")


def parse_instruction(line: str) -> Instruction:
    lhs, rhs = line.strip().split(" = ", 1)
    is_root = lhs.startswith("ROOT ")
    name = lhs.removeprefix("ROOT ").strip().lstrip("%")
    if rhs.startswith("("):
        end = _closing(rhs, 0)
        shape, rest = rhs[: end + 1], rhs[end + 1:].lstrip()
    else:
        shape, rest = rhs.split(" ", 1)
    paren = rest.index("(")
    opcode = rest[:paren]
    end = _closing(rest, paren)
    arguments = rest[paren + 1: end]
    operands = tuple(re.findall(r"%([\w.\-]+)", arguments))
    return Instruction(name, shape, opcode, operands, arguments, rest[end + 1:], is_root)


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """The computations of an HLO module by name, and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if not line.strip() or line.startswith("HloModule"):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            header = line.split()
            is_entry = header[0] == "ENTRY"
            current = header[1 if is_entry else 0].lstrip("%")
            computations[current] = []
            entry = current if is_entry else entry
        elif line.strip() == "}":
            current = None
        elif current is not None and " = " in line:
            computations[current].append(parse_instruction(line))
    return computations, entry


def _called(computations: dict[str, list[Instruction]], instruction: Instruction) -> list[Instruction]:
    """The body of a fusion (empty for other instructions)."""
    match = re.search(r"calls=%?([\w.\-]+)", instruction.attributes)
    if instruction.opcode != "fusion" or match is None:
        return []
    return computations.get(match.group(1), [])


def _bytes_read(computations: dict[str, list[Instruction]], instruction: Instruction, sizes: dict[str, int]) -> int:
    """Bytes an instruction reads from its operands.

    A fusion that only slices an operand (lucid's shift, the first element of
    every instance) reads the slices, not the whole operand.
    """
    body = _called(computations, instruction)

    def sliced_bytes(name: str) -> int | None:
        """Bytes of the slices that are the only uses of ``name`` (through conversions), else None."""
        users = [i for i in body if name in i.operands]
        if not users:
            return None
        total = 0
        for user in users:
            if user.opcode in ("slice", "dynamic-slice"):
                total += shape_bytes(user.shape)
            elif user.opcode in ("convert", "bitcast", "copy") and (inner := sliced_bytes(user.name)) is not None:
                total += inner
            else:
                return None
        return total

    total = 0
    for index, operand in enumerate(instruction.operands):
        size = sizes.get(operand, 0)
        parameter = next((i.name for i in body if i.opcode == "parameter" and i.arguments == str(index)), None)
        sliced = None if parameter is None else sliced_bytes(parameter)
        total += size if sliced is None else min(size, sliced)
    return total


def _fused_ops(computations: dict[str, list[Instruction]], instruction: Instruction) -> str:
    """The fused operations with their counts; a reduction also names its reduced dimensions,
    e.g. ``reduce{2,3}``, since reducing the minor (contiguous) dimensions or not matters most."""

    def label(i: Instruction) -> str:
        dims = re.search(r"dimensions=\{([0-9,]*)\}", i.attributes)
        return f"{i.opcode}{{{dims.group(1)}}}" if i.opcode == "reduce" and dims else i.opcode

    counts = Counter(label(i) for i in _called(computations, instruction) if i.opcode not in _PLUMBING)
    return " ".join(f"{op}" if n == 1 else f"{op}×{n}" for op, n in sorted(counts.items()))


def _program_outputs(body: list[Instruction]) -> set[str]:
    """Names of the instructions whose results the program returns, seen through tuples and views."""
    by_name = {i.name: i for i in body}
    pending = [next(i.name for i in body if i.is_root)]
    outputs: set[str] = set()
    while pending:
        name = pending.pop()
        outputs.add(name)
        instruction = by_name.get(name)
        if instruction is not None and instruction.opcode in _FREE - {"parameter"}:
            pending.extend(instruction.operands)
    return outputs


def report(title: str, compiled: jax.stages.Compiled, input_bytes: int) -> str:
    """A table of the compiled program's kernels and its traffic estimate."""
    computations, entry = parse_module(compiled.as_text())
    body = computations[entry]
    sizes = {i.name: shape_bytes(i.shape) for i in body}
    outputs = _program_outputs(body)
    rows, reads, writes, fusions = [], 0, 0, 0
    for i in body:
        if i.opcode in _FREE:
            continue
        fusions += i.opcode == "fusion"
        read = _bytes_read(computations, i, sizes)
        write = sizes[i.name]
        reads, writes = reads + read, writes + write
        kind = re.search(r"kind=(\w+)", i.attributes)
        library = re.search(r'"fusion_config":\{"kind":"__(\w+?)(?:_fusion)?"', i.attributes)
        parts = re.search(r'"outer_dimension_partitions":\[([^\]]*)\]', i.attributes)
        temporary = write >= input_bytes and i.name not in outputs
        rows.append((
            i.name + (" (temporary)" if temporary else ""),
            i.opcode + (f"/{kind.group(1)}" if kind else "") + (f" ({library.group(1)})" if library else ""),
            f"{read / input_bytes:.2f}",
            f"{write / input_bytes:.2f}",
            parts.group(1).replace('"', "") if parts and parts.group(1) else "-",
            _fused_ops(computations, i) or i.shape,
        ))
    memory = compiled.memory_analysis()
    temp = "n/a" if memory is None else f"{memory.temp_size_in_bytes / input_bytes:.2f}× input"
    header = ("instruction", "op", "reads ×in", "writes ×in", "threads", "fused ops (or shape)")
    widths = [max(len(str(r[k])) for r in [header, *rows]) for k in range(len(header) - 1)]
    lines = [
        f"{title}: {len(rows)} kernels ({fusions} fusions); temporaries {temp}; "
        f"estimated traffic: reads {reads / input_bytes:.2f}× + writes {writes / input_bytes:.2f}× input "
        f"(a copy: 1 + 1)",
    ]
    for row in [header, *rows]:
        lines.append("  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)) + "  " + row[-1])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="8,64,128,128", help="logical N,C,*spatial (default 8,64,128,128)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--channels-last", action="store_true", help="NHWC input with channel_axis=-1")
    parser.add_argument("--full", action="store_true", help="also print the whole optimized HLO of each program")
    parser.add_argument("--pure-xla", action="store_true",
                        help="trace inside lucid.nn.functional.pure_xla(): XLA operations only, no native kernel")
    args = parser.parse_args(argv)

    case = Case(tuple(int(s) for s in args.shape.split(",")), args.dtype, args.channels_last)
    x, w, b, g = lucid_arrays(case, make_inputs(case))
    programs: dict[str, tuple[Callable, tuple[jax.Array, ...]]] = {
        "forward": (lucid_forward(case), (x, w, b)),
        "forward+backward": (lucid_forward_backward(case), (x, w, b, g)),
    }
    path = "the XLA path" if args.pure_xla else "the default path"
    print(f"lucid ({path}) on {case.label} (array {case.array_shape}, {case.nbytes / 2**20:.1f} MiB input), "
          f"jax {jax.__version__}")
    for title, (fn, fn_args) in programs.items():
        with F.pure_xla() if args.pure_xla else contextlib.nullcontext():
            compiled = jax.jit(fn).lower(*fn_args).compile()
        print()
        print(report(title, compiled, case.nbytes))
        if args.full:
            print()
            print(compiled.as_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
