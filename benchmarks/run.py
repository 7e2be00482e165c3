"""Instance norm, side by side: lucid, PyTorch (CPU) and Flax against a plain copy.

Run from the repository root::

    python benchmarks/run.py            # the full suite: a few minutes on 2 cores
    python benchmarks/run.py --quick --out /tmp/bench   # tiny shapes, a few seconds

For every case, each contender's forward and forward+backward are compiled and
warmed up, then timed in interleaved rounds (copy, lucid, PyTorch, Flax, copy,
...), each round timing a small batch of calls; the table keeps each figure's
minimum over the rounds, the least disturbed by other work on the machine.

- copy: a jitted ``x * c`` over the same array, one read and one write: the
  memory-bandwidth floor, used as the unit (×copy) for both the forward
  and the forward+backward.
- lucid: the jitted ``F.instance_norm(x, weight=w, bias=b)`` (channels-last:
  ``instance_norm_apply(..., channel_axis=-1)`` on NHWC input); forward+backward
  is the jitted output plus the pullback of a fixed random cotangent ``g`` to
  ``x``, ``weight`` and ``bias``. On CPU this runs lucid's native kernels.
- lucid XLA: the same programs traced inside ``F.pure_xla()``: XLA operations
  only, what GPU/TPU users and ``jax.export`` get (same layout as lucid).
- lucid XLA channels-last: lucid XLA on the channels-last array Flax gets
  (``channel_axis=-1``): both of the XLA path's layouts meet Flax on every shape.
- PyTorch: ``torch.nn.functional.instance_norm`` on all cores, the forward under
  ``no_grad``; forward+backward is the forward then ``y.backward(g)`` (gradients
  reset every call). Channels-last input is a ``torch.channels_last`` tensor.
- Flax: ``flax.linen.InstanceNorm(epsilon=1e-5)`` on channels-last input (its
  only layout; channels-first data is transposed once, outside the timing),
  jitted ``apply``; forward+backward is ``jax.vjp`` to the input and the
  parameters, the same program shape as lucid's. Flax keeps no running
  statistics and uses its default fast (one-pass) variance.

The run happens under a steady allocator (``STEADY_ALLOCATOR``: glibc keeps
and reuses freed memory; the script re-executes itself with those settings),
so that every contender's time is computation and memory traffic, not the
operating system zeroing fresh pages for whichever outputs glibc chose to map
anew;
``--system-allocator`` measures under glibc's defaults instead.

Also reported: the temporary memory of each compiled JAX forward+backward (from
XLA's ``memory_analysis()``, in multiples of the input size) and the accuracy
on data with mean 1e4 and unit spread, and on the adversarial rows the tests
check (``tests/adversarial_data.py``: hot pixels, sparse maps, clusters), against
a float64 NumPy reference.

Writes ``latest.md`` and ``latest.png`` to ``--out`` (default
``benchmarks/results``); a full run into the default directory also refreshes
the results section of ``README.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import importlib.util
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as TF
from cases import (
    FULL_CASES,
    QUICK_CASES,
    Case,
    Inputs,
    lucid_arrays,
    lucid_forward,
    lucid_forward_backward,
    make_inputs,
)

import lucid.nn.functional as F

#: glibc malloc settings (mallopt(3)) under which freed memory stays in the
#: process and is reused: no mmap'd chunks, no trimming, and one arena, so
#: that those two govern every thread's blocks (a second arena's heap is
#: mmap'd and shrunk on its own terms). Without them, whether a call's output
#: buffers are fresh pages that the operating system must fault in and zero
#: depends on glibc's thresholds (a 32 MiB buffer is always a new mapping, a
#: 20 MiB one only sometimes), which can cost more than the computation and
#: swings the copy floor 10x between similar shapes.
STEADY_ALLOCATOR = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(2**40)}


def allocator_mode() -> str:
    """``steady`` when this process runs on glibc under STEADY_ALLOCATOR, else ``system``."""
    steady = all(os.environ.get(k) == v for k, v in STEADY_ALLOCATOR.items())
    return "steady" if steady and platform.libc_ver()[0] == "glibc" else "system"


def _rerun_under_the_requested_allocator(argv: list[str]) -> None:
    """Re-execute this script, same interpreter and arguments, if its allocator is not the one asked for.

    glibc reads its malloc settings when a process starts, so they cannot be
    switched in place. Off glibc there is nothing to switch.
    """
    if platform.libc_ver()[0] != "glibc":
        return
    want = "system" if "--system-allocator" in argv else "steady"
    if allocator_mode() == want:
        return
    env = {k: v for k, v in os.environ.items() if k not in STEADY_ALLOCATOR}
    if want == "steady":
        env.update(STEADY_ALLOCATOR)
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
README_START = "<!-- benchmark-results:start -->"
README_END = "<!-- benchmark-results:end -->"

CONTENDERS = ("lucid", "lucid XLA", "PyTorch", "Flax")
#: The contenders timed: lucid's XLA path also in the layout Flax runs (on NHWC cases the same as lucid XLA).
XLA_CHANNELS_LAST = "lucid XLA channels-last"
TIMED = (*CONTENDERS, XLA_CHANNELS_LAST)
#: The JAX contenders, whose compiled forward+backward temporaries are reported.
JAX_CONTENDERS = ("lucid", "lucid XLA", XLA_CHANNELS_LAST, "Flax")
MODES = ("forward", "forward+backward")
EPS = 1e-5

#: The performance targets: lucid's time in multiples of a copy on large inputs,
#: its compiled forward+backward temporaries in multiples of the input, and its
#: largest error on the 1e4-offset float32 input.
TARGET_X_COPY = {"forward": 1.3, "forward+backward": 3.5}
TARGET_TEMP_X_INPUT = 1.0
TARGET_ERROR = 1e-4
#: lucid's largest (y, dx) errors on the adversarial rows, relative to the reference's scale.
TARGET_ADVERSARIAL = (1e-6, 1e-5)

Bench = Callable[[], object]


class Contender(NamedTuple):
    """One implementation's zero-argument calls (each runs once and waits for the result)."""

    forward: Bench
    forward_backward: Bench
    temp_x_input: float | None = None  # compiled forward+backward temporaries / input bytes


@dataclass
class CaseResult:
    """Best seconds per call, keyed by ``(contender, mode)``; copy under ``("copy", "forward")``."""

    case: Case
    seconds: dict[tuple[str, str], float]
    temp_x_input: dict[str, float | None] = field(default_factory=dict)

    def ms(self, who: str, mode: str) -> float:
        return 1e3 * self.seconds[("copy", "forward") if who == "copy" else (who, mode)]

    def x_copy(self, who: str, mode: str) -> float:
        return self.ms(who, mode) / self.ms("copy", mode)


# --------------------------------------------------------------------------
# The contenders
# --------------------------------------------------------------------------


def _jax_bench(compiled: Callable, *args: jax.Array) -> Bench:
    return lambda: jax.block_until_ready(compiled(*args))


def _temp_x_input(compiled: jax.stages.Compiled, x: jax.Array) -> float | None:
    stats = compiled.memory_analysis()
    return None if stats is None else stats.temp_size_in_bytes / x.nbytes


def copy_contender(case: Case, inputs: Inputs) -> Bench:
    """``x * c`` with ``c`` an argument (a constant 1 would be folded away)."""
    x, *_ = lucid_arrays(case, inputs)
    c = jnp.asarray(1.0, x.dtype)
    compiled = jax.jit(lambda x, c: x * c).lower(x, c).compile()
    return _jax_bench(compiled, x, c)


def lucid_contender(case: Case, inputs: Inputs, pure_xla: bool = False) -> Contender:
    """lucid's jitted programs; with ``pure_xla``, traced inside ``F.pure_xla()``."""
    x, w, b, g = lucid_arrays(case, inputs)
    with F.pure_xla() if pure_xla else contextlib.nullcontext():
        compiled_forward = jax.jit(lucid_forward(case)).lower(x, w, b).compile()
        compiled_forward_backward = jax.jit(lucid_forward_backward(case)).lower(x, w, b, g).compile()
    return Contender(
        _jax_bench(compiled_forward, x, w, b),
        _jax_bench(compiled_forward_backward, x, w, b, g),
        _temp_x_input(compiled_forward_backward, x),
    )


def _torch_tensor(a: np.ndarray, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
    """An ``(N, C, *spatial)`` tensor; with ``channels_last``, stored channels-minor (for 4D and
    5D exactly ``torch.channels_last``/``channels_last_3d``; 3D has no named format)."""
    if not channels_last:
        return torch.from_numpy(a).to(dtype)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, 1, -1))).to(dtype).movedim(-1, 1)


def torch_contender(case: Case, inputs: Inputs) -> Contender:
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[case.dtype]
    x = _torch_tensor(inputs.x, dtype, case.channels_last)
    w, b = torch.from_numpy(inputs.weight), torch.from_numpy(inputs.bias)
    g = _torch_tensor(inputs.g, dtype)
    xg, wg, bg = (t.detach().clone().requires_grad_() for t in (x, w, b))

    def forward() -> torch.Tensor:
        with torch.no_grad():
            return TF.instance_norm(x, weight=w, bias=b, eps=EPS)

    def forward_backward() -> None:
        for t in (xg, wg, bg):
            t.grad = None
        TF.instance_norm(xg, weight=wg, bias=bg, eps=EPS).backward(g)

    return Contender(forward, forward_backward)


def _flax_setup(case: Case, inputs: Inputs) -> tuple[nn.Module, dict, jax.Array, jax.Array]:
    """Flax's layer, variables, and ``x``/``g`` moved to its channels-last layout."""
    layer = nn.InstanceNorm(epsilon=EPS, dtype=jnp.dtype(case.dtype))
    x, g = (jnp.asarray(np.ascontiguousarray(np.moveaxis(a, 1, -1)), case.dtype) for a in (inputs.x, inputs.g))
    variables = {"params": {"scale": jnp.asarray(inputs.weight), "bias": jnp.asarray(inputs.bias)}}
    return layer, variables, x, g


def flax_contender(case: Case, inputs: Inputs) -> Contender:
    layer, variables, x, g = _flax_setup(case, inputs)

    def forward_backward(variables: dict, x: jax.Array, g: jax.Array) -> tuple[jax.Array, tuple]:
        y, pullback = jax.vjp(layer.apply, variables, x)
        return y, pullback(g)

    compiled_forward = jax.jit(layer.apply).lower(variables, x).compile()
    compiled_forward_backward = jax.jit(forward_backward).lower(variables, x, g).compile()
    return Contender(
        _jax_bench(compiled_forward, variables, x),
        _jax_bench(compiled_forward_backward, variables, x, g),
        _temp_x_input(compiled_forward_backward, x),
    )


# --------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------


def _time_batch(bench: Bench, calls: int, settle: float) -> float:
    """Seconds per call over ``calls`` back-to-back calls, with the garbage collector paused.

    Sleeping ``settle`` seconds first (not timed) lets the previous contender's
    worker threads (OpenMP spin-waits, XLA's pool) go idle, so they do not
    compete for the cores.
    """
    time.sleep(settle)
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            bench()
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def measure(
    benches: Mapping[tuple[str, str], Bench], repeats: int, batch_seconds: float
) -> dict[tuple[str, str], float]:
    """The minimum seconds per call of every bench over ``repeats`` interleaved rounds.

    Each bench first runs twice (compilation, first touch of memory, thread
    pools); its batch size is then chosen so one batch lasts ``batch_seconds``,
    from its fastest of a few back-to-back calls (the first calls may still
    be growing the heap, and an overestimate would leave single-call batches
    that time a cold start after every pause).
    """
    settle = min(0.01, batch_seconds)
    calls = {}
    for key, bench in benches.items():
        bench()
        bench()
        once = min(_time_batch(bench, 1, 0.0) for _ in range(8))
        calls[key] = max(1, min(1000, round(batch_seconds / once)))
    gc.collect()
    best = dict.fromkeys(benches, math.inf)
    for _ in range(repeats):
        for key, bench in benches.items():
            best[key] = min(best[key], _time_batch(bench, calls[key], settle))
    return best


def run_case(case: Case, repeats: int, batch_seconds: float) -> CaseResult:
    inputs = make_inputs(case)
    contenders = {
        "lucid": lucid_contender(case, inputs),
        "lucid XLA": lucid_contender(case, inputs, pure_xla=True),
        "PyTorch": torch_contender(case, inputs),
        "Flax": flax_contender(case, inputs),
    }
    contenders[XLA_CHANNELS_LAST] = (contenders["lucid XLA"] if case.channels_last else
                                     lucid_contender(replace(case, channels_last=True), inputs, pure_xla=True))
    benches = {("copy", "forward"): copy_contender(case, inputs)}
    for name, contender in contenders.items():
        if name == XLA_CHANNELS_LAST and case.channels_last:
            continue  # lucid XLA's own programs: timed once, reported in both columns
        benches[(name, "forward")] = contender.forward
        benches[(name, "forward+backward")] = contender.forward_backward
    seconds = measure(benches, repeats, batch_seconds)
    if case.channels_last:
        seconds.update({(XLA_CHANNELS_LAST, mode): seconds[("lucid XLA", mode)] for mode in MODES})
    return CaseResult(case, seconds, {name: c.temp_x_input for name, c in contenders.items()})


# --------------------------------------------------------------------------
# Accuracy far from zero
# --------------------------------------------------------------------------


def _errors(x: np.ndarray, w: np.ndarray, b: np.ndarray, g: np.ndarray,
            programs: dict[str, Callable] | None = None) -> dict[str, tuple[float, float]]:
    """Max abs error of ``(y, dx)`` per contender on float32 ``(N, C, *spatial)`` data, against float64 NumPy.

    ``programs`` caches the jitted JAX programs by contender and shape (reused across data of one shape).
    """
    programs = {} if programs is None else programs
    case = Case(x.shape)
    inputs = Inputs(x, w, b, g)
    y_ref, dx_ref = _adversarial_data().reference_output_and_gradient(x, w, b, g, EPS)

    def error(y: object, dx: object, to_nchw: bool = False) -> tuple[float, float]:
        y, dx = (np.asarray(a, np.float64) for a in (y, dx))
        if to_nchw:
            y, dx = (np.moveaxis(a, -1, 1) for a in (y, dx))
        return float(np.abs(y - y_ref).max()), float(np.abs(dx - dx_ref).max())

    out = {}
    for who, context in (("lucid", contextlib.nullcontext), ("lucid XLA", F.pure_xla)):
        with context():
            program = programs.setdefault((who, x.shape), jax.jit(lucid_forward_backward(case)))
            y, (dx, _, _) = program(*lucid_arrays(case, inputs))
        out[who] = error(y, dx)

    xt = torch.from_numpy(x).requires_grad_()
    yt = TF.instance_norm(xt, weight=torch.from_numpy(w), bias=torch.from_numpy(b), eps=EPS)
    yt.backward(torch.from_numpy(g))
    out["PyTorch"] = error(yt.detach().numpy(), xt.grad.numpy())

    layer, variables, xf, gf = _flax_setup(case, inputs)

    def flax_forward_backward(variables: dict, x: jax.Array, g: jax.Array) -> tuple[jax.Array, jax.Array]:
        y, pullback = jax.vjp(layer.apply, variables, x)
        return y, pullback(g)[1]

    program = programs.setdefault(("Flax", x.shape), jax.jit(flax_forward_backward))
    out["Flax"] = error(*program(variables, xf, gf), to_nchw=True)
    return out


def accuracy(shape: tuple[int, ...]) -> dict[str, tuple[float, float]]:
    """Max abs error of ``(y, dx)`` per contender on float32 input ``N(0, 1) + 1e4``."""
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(shape) + 1e4).astype(np.float32)
    w = (1 + 0.5 * rng.standard_normal(shape[1])).astype(np.float32)
    b = rng.standard_normal(shape[1]).astype(np.float32)
    g = rng.standard_normal(shape).astype(np.float32)
    return _errors(x, w, b, g)


#: The adversarial rows of the accuracy table: (label, row of ``adversarial_data``, its dimensions).
ADVERSARIAL_ROWS = (
    ("N(0,1), first pixel 300", "hot-300-first", "2d"),
    ("N(0,1), last pixel 300", "hot-300-last", "2d"),
    ("sparse post-ReLU map (1% non-zero), first pixel 1000", "sparse-relu-1000-first", "2d"),
    ("N(0,1) + 1e4", "offset-1e4", "2d"),
    ("two clusters at ±1e4", "clusters-1e4", "2d"),
    ("spread 1e-3 around 1, first pixel -50 (64x64)", "spread-1e-3-first-minus-50", "2d"),
    ("(2,3,4000), first element 500", "hot-500-first", "1d"),
    ("(2,3,16,32,32), first voxel 300", "hot-300-first", "3d"),
)


@functools.cache
def _adversarial_data():
    """``tests/adversarial_data.py``: the rows the accuracy tests check, loaded from its file."""
    spec = importlib.util.spec_from_file_location("adversarial_data", ROOT / "tests" / "adversarial_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def adversarial_accuracy() -> dict[str, dict[str, tuple[float, float]]]:
    """Per row, per contender: the ``(y, dx)`` errors relative to the reference's largest magnitude."""
    make_data = _adversarial_data().make_data
    programs: dict = {}
    out = {}
    for label, row, dims in ADVERSARIAL_ROWS:
        x, w, b, g = (a.astype(np.float32) for a in make_data(row, dims))
        y_ref, dx_ref = _adversarial_data().reference_output_and_gradient(x, w, b, g, EPS)
        scale = np.abs(y_ref).max(), np.abs(dx_ref).max()
        errors = _errors(x, w, b, g, programs)
        out[label] = {who: (e[0] / scale[0], e[1] / scale[1]) for who, e in errors.items()}
    return out


# --------------------------------------------------------------------------
# Reports
# --------------------------------------------------------------------------


def machine_line() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    date = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    return (
        f"{model}, {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__}, "
        f"flax {flax.__version__}, numpy {np.__version__}, Python {platform.python_version()}; {date}"
    )


def _num(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)  # numbers right-aligned
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


#: The ratio columns, ``(who, over)``: ``who``'s time over ``over``'s.
RATIOS = (("PyTorch", "lucid"), ("Flax", "lucid"), ("Flax", "lucid XLA"), ("Flax", XLA_CHANNELS_LAST))


def timing_table(results: list[CaseResult], mode: str) -> str:
    header = ["case", "copy ms"]
    for who in TIMED:
        header += [f"{who} ms", f"{who} ×copy"]
    header += [f"{who} ÷ {lucid}" for who, lucid in RATIOS]
    if mode == "forward+backward":
        header += [f"{who} temp ×input" for who in JAX_CONTENDERS]
    rows = []
    for r in results:
        row = [r.case.label, _num(r.ms("copy", mode))]
        for who in TIMED:
            row += [_num(r.ms(who, mode)), _num(r.x_copy(who, mode))]
        row += [_num(r.ms(who, mode) / r.ms(lucid, mode)) for who, lucid in RATIOS]
        if mode == "forward+backward":
            row += [_num(r.temp_x_input[who]) for who in JAX_CONTENDERS]
        rows.append(row)
    return _table(header, rows)


def accuracy_table(errors: dict[str, tuple[float, float]]) -> str:
    rows = [
        ["output y", *(f"{errors[who][0]:.2e}" for who in CONTENDERS)],
        ["input gradient dx", *(f"{errors[who][1]:.2e}" for who in CONTENDERS)],
    ]
    return _table(["max abs error", *CONTENDERS], rows)


def adversarial_table(errors: dict[str, dict[str, tuple[float, float]]]) -> str:
    rows = [[label, *(f"{row[who][0]:.1e} / {row[who][1]:.1e}" for who in CONTENDERS)] for label, row in errors.items()]
    return _table(["float32 input, (2,3,256,256) unless noted", *CONTENDERS], rows)


def target_lines(results: list[CaseResult], errors: dict[str, tuple[float, float]],
                 adversarial: dict[str, dict[str, tuple[float, float]]]) -> list[str]:
    """One line per target, ``met`` or the cases that miss it."""

    def verdict(misses: list[str]) -> str:
        return "met" if not misses else "missed: " + ", ".join(misses)

    lines = []
    for mode in MODES:
        slower = [
            f"{r.case.label} (vs {who})"
            for r in results
            for who in ("PyTorch", "Flax")
            if r.ms("lucid", mode) >= r.ms(who, mode)
        ]
        lines.append(f"lucid faster than PyTorch and Flax, {mode}: {verdict(slower)}")
    for mode in MODES:
        bound = TARGET_X_COPY[mode]
        over = [
            f"{r.case.label} ({r.x_copy('lucid', mode):.2f})"
            for r in results
            if r.case.large and r.x_copy("lucid", mode) > bound
        ]
        lines.append(f"lucid {mode} ≤ {bound}× copy on large inputs: {verdict(over)}")
    heavy = [
        f"{r.case.label} ({r.temp_x_input['lucid']:.2f})"
        for r in results
        if r.temp_x_input["lucid"] is not None and r.temp_x_input["lucid"] > TARGET_TEMP_X_INPUT
    ]
    lines.append(f"lucid forward+backward temporaries ≤ {TARGET_TEMP_X_INPUT:g}× input: {verdict(heavy)}")
    slower_xla = [f"{r.case.label} ({who})" for r in results for who in ("lucid XLA", XLA_CHANNELS_LAST)
                  if r.ms(who, "forward+backward") >= r.ms("Flax", "forward+backward")]
    lines.append(f"lucid XLA forward+backward faster than Flax, in the case's layout and channels-last: "
                 f"{verdict(slower_xla)}")
    for who in ("lucid", "lucid XLA"):
        y_err, dx_err = errors[who]
        inaccurate = [f"{what} ({e:.1e})" for what, e in (("y", y_err), ("dx", dx_err)) if e > TARGET_ERROR]
        lines.append(f"{who} error ≤ {TARGET_ERROR:g} at mean 1e4: {verdict(inaccurate)}")
    for who in ("lucid", "lucid XLA"):
        missed = [f"{label} ({row[who][0]:.1e} / {row[who][1]:.1e})" for label, row in adversarial.items()
                  if row[who][0] > TARGET_ADVERSARIAL[0] or row[who][1] > TARGET_ADVERSARIAL[1]]
        lines.append(f"{who} adversarial rows within {TARGET_ADVERSARIAL[0]:g} (y) / {TARGET_ADVERSARIAL[1]:g} (dx) "
                     f"of scale: {verdict(missed)}")
    return lines


ALLOCATOR_NOTES = {
    "steady": "Allocator: steady (glibc keeps and reuses freed memory, so no contender pays for the operating "
              "system zeroing fresh pages for its outputs; `--system-allocator` measures with glibc's defaults).",
    "system": "Allocator: the system's defaults (`--system-allocator`, or not glibc): outputs may land on fresh "
              "pages, whose faults and zeroing are part of the times, the copy's included.",
}


def markdown(results: list[CaseResult], errors: dict[str, tuple[float, float]], accuracy_shape: tuple[int, ...],
             adversarial: dict[str, dict[str, tuple[float, float]]], repeats: int, level: int = 2) -> str:
    """The report's body (no title); ``level`` is the heading level of its sections."""
    h = "#" * level
    large = ", ".join(r.case.label for r in results if r.case.large) or "none"
    return "\n".join([
        f"Machine: {machine_line()}.",
        "",
        f"Milliseconds per call, the minimum of {repeats} interleaved rounds; ×copy is the time over a jitted "
        "`x * c` of the same array (one read, one write); ÷ lucid above 1 means lucid is faster. "
        "lucid runs its native CPU kernels; lucid XLA is lucid traced inside `pure_xla()` (XLA operations only, "
        "what GPU/TPU and `jax.export` run), in the same layout; lucid XLA channels-last is the same "
        "on the channels-last array Flax gets. "
        "bf16: bfloat16 input, float32 weight and bias. NHWC: channels-last input "
        "(lucid `channel_axis=-1`; PyTorch a `torch.channels_last` tensor, its output comes back channels-first; "
        "Flax is channels-last in every case, so on NHWC cases lucid XLA and Flax run on the same data). "
        f"Large inputs (≥ 16 MiB): {large}. {ALLOCATOR_NOTES[allocator_mode()]}",
        "",
        f"{h} Forward",
        "",
        timing_table(results, "forward"),
        "",
        f"{h} Forward + backward (output, then gradients to x, weight and bias)",
        "",
        "temp ×input: the compiled JAX program's temporary buffers (XLA `memory_analysis()`) over the input size.",
        "",
        timing_table(results, "forward+backward"),
        "",
        f"{h} Accuracy far from zero",
        "",
        f"float32 input `N(0, 1) + 1e4` of shape {accuracy_shape}, random weight, bias and cotangent; "
        "max abs error against float64 NumPy. Flax runs with its default `use_fast_variance=True` "
        "(variance as `E[x²] - E[x]²`), which cancels catastrophically this far from zero.",
        "",
        accuracy_table(errors),
        "",
        f"{h} Accuracy on adversarial data",
        "",
        "Errors of the output / the input gradient, relative to the largest magnitude of the float64 NumPy "
        "reference's (random weight, bias and cotangent). A hot pixel is at that position in every instance. "
        "Statistics taken around one element far from the mean cancel on these; lucid's do not, on either path.",
        "",
        adversarial_table(adversarial),
        "",
        f"{h} Targets",
        "",
        *(f"- {line}" for line in target_lines(results, errors, adversarial)),
        "",
    ])


def bar_chart(results: list[CaseResult], path: Path) -> None:
    """Grouped bars of ×copy per case, one panel per mode, log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r.case.label for r in results]
    positions = np.arange(len(results))
    width = 0.8 / len(TIMED)
    colors = {"lucid": "#1b9e77", "lucid XLA": "#66a61e", XLA_CHANNELS_LAST: "#a6d854", "PyTorch": "#d95f02",
              "Flax": "#7570b3"}
    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 1.5 * len(results)), 8), sharex=True)
    for ax, mode in zip(axes, MODES):
        for i, who in enumerate(TIMED):
            values = [r.x_copy(who, mode) for r in results]
            offset = (i - (len(TIMED) - 1) / 2) * width
            bars = ax.bar(positions + offset, values, width, label=who, color=colors[who])
            ax.bar_label(bars, labels=[f"{v:.1f}" for v in values], fontsize=7, padding=1)
        ax.axhline(1.0, color="black", linewidth=1, label="copy")
        target = TARGET_X_COPY[mode]
        ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target}× (large)")
        ax.set_yscale("log")
        ax.set_ylabel("time ÷ copy")
        ax.set_title(mode)
        ax.legend(fontsize=8, ncols=6, loc="upper left")
        ax.margins(y=0.2)
    axes[-1].set_xticks(positions, labels, rotation=20, ha="right", fontsize=8)
    fig.suptitle(f"Instance norm, time in multiples of a copy (lower is better)\n{machine_line()}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def update_readme(section: str, start_marker: str = README_START, end_marker: str = README_END) -> bool:
    """Replace the README's section between two markers; false if the markers are missing."""
    text = README.read_text()
    start, end = text.find(start_marker), text.find(end_marker)
    if start < 0 or end < start:
        return False
    README.write_text(text[: start + len(start_marker)] + "\n" + section.strip() + "\n" + text[end:])
    return True


# --------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument("--quick", action="store_true", help="tiny shapes and 2 rounds: a smoke run of every code path")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for latest.md and latest.png")
    parser.add_argument("--repeats", type=int, help="interleaved rounds per case (default 20, quick 2)")
    parser.add_argument("--batch-seconds", type=float, help="target duration of one timed batch (default 0.05)")
    parser.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    parser.add_argument("--system-allocator", action="store_true",
                        help="keep glibc's default malloc behaviour (outputs often on fresh pages) instead of "
                             "running under STEADY_ALLOCATOR")
    args = parser.parse_args(argv)

    cases = QUICK_CASES if args.quick else FULL_CASES
    repeats = args.repeats or (2 if args.quick else 20)
    batch_seconds = args.batch_seconds or (0.002 if args.quick else 0.05)
    accuracy_shape = (2, 4, 16, 16) if args.quick else (4, 16, 64, 64)
    torch.set_num_threads(os.cpu_count() or 1)

    results = []
    for case in cases:
        print(f"timing {case.label} ...", file=sys.stderr, flush=True)
        results.append(run_case(case, repeats, batch_seconds))
    errors = accuracy(accuracy_shape)
    print("measuring accuracy on adversarial data ...", file=sys.stderr, flush=True)
    adversarial = adversarial_accuracy()

    report = "# Instance norm benchmark\n\n" + markdown(results, errors, accuracy_shape, adversarial, repeats)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(report)
    bar_chart(results, args.out / "latest.png")
    print(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.png'}", file=sys.stderr)
    if not args.quick and not args.no_readme and args.out.resolve() == DEFAULT_OUT:
        section = markdown(results, errors, accuracy_shape, adversarial, repeats, level=3)
        section += "\n![lucid, lucid XLA, PyTorch and Flax in multiples of a copy](benchmarks/results/latest.png)\n"
        if update_readme(section):
            print(f"updated the results section of {README}", file=sys.stderr)
        else:
            print(f"{README} has no {README_START} ... {README_END} markers; left unchanged", file=sys.stderr)
    return 0


if __name__ == "__main__":
    _rerun_under_the_requested_allocator(sys.argv[1:])
    sys.exit(main())
