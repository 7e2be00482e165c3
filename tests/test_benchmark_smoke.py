"""The benchmark suite runs end to end (``benchmarks/run.py --quick``) and reports real numbers."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = ("lucid", "lucid XLA", "PyTorch", "Flax")
TIMED = (*CONTENDERS, "lucid XLA channels-last")
JAX_CONTENDERS = ("lucid", "lucid XLA", "lucid XLA channels-last", "Flax")


def _tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Every markdown table under its ``##`` heading, as rows of ``{column: cell}``."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in markdown.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
                tables[heading] = []
            elif not all(set(c) <= set("-:") for c in cells):
                tables[heading].append(dict(zip(header, cells, strict=True)))
        else:
            header = None
    return tables


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return out


def test_quick_run_writes_the_report_and_the_chart(quick_run):
    assert (quick_run / "latest.md").read_text().startswith("# Instance norm benchmark")
    assert (quick_run / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("mode", ["Forward", "Forward + backward"])
def test_timing_tables_have_every_column_with_finite_positive_numbers(quick_run, mode):
    tables = _tables((quick_run / "latest.md").read_text())
    rows = next(rows for heading, rows in tables.items() if heading.split(" (")[0] == mode)
    expected = {"case", "copy ms", "PyTorch ÷ lucid", "Flax ÷ lucid", "Flax ÷ lucid XLA",
                "Flax ÷ lucid XLA channels-last"}
    expected |= {f"{who} {unit}" for who in TIMED for unit in ("ms", "×copy")}
    if mode == "Forward + backward":
        expected |= {f"{who} temp ×input" for who in JAX_CONTENDERS}
    assert set(rows[0]) == expected
    labels = [row["case"] for row in rows]
    assert len(labels) == 3 and any("bf16" in s for s in labels) and any("NHWC" in s for s in labels)
    for row in rows:
        for column, cell in row.items():
            if column == "case":
                continue
            value = float(cell)
            assert math.isfinite(value), (column, cell)
            assert value > 0 or "temp" in column, (column, cell)  # a program may need no temporaries


def test_accuracy_table_reports_every_contender(quick_run):
    rows = _tables((quick_run / "latest.md").read_text())["Accuracy far from zero"]
    assert [row["max abs error"] for row in rows] == ["output y", "input gradient dx"]
    for row in rows:
        others = [float(row[who]) for who in ("PyTorch", "Flax")]  # may be huge (Flax's fast variance), never blank
        assert all(not v < 0 for v in others)
        for who in ("lucid", "lucid XLA"):  # lucid's own accuracy target at mean 1e4, on both of its paths
            assert 0 <= float(row[who]) <= 1e-4, who


def test_targets_include_the_xla_path_against_flax(quick_run):
    text = (quick_run / "latest.md").read_text()
    targets = text.split("Targets", 1)[1].splitlines()
    line = next(s for s in targets if s.startswith(
        "- lucid XLA forward+backward faster than Flax, in the case's layout and channels-last: "))
    verdict = line.split(": ", 1)[1]
    assert verdict == "met" or verdict.startswith("missed: ")
    assert any(s.startswith("- lucid XLA error ≤ 0.0001 at mean 1e4: met") for s in targets)


def test_the_run_reexecutes_itself_under_the_steady_allocator(quick_run):
    # glibc reads its malloc settings at process start: the report names the mode the timings ran under.
    assert "Allocator: steady" in (quick_run / "latest.md").read_text()


def test_sharded_benchmark_runs_every_contender_on_eight_devices(tmp_path):
    """``benchmarks/sharded.py --quick``: the kernel on every shard (it asserts so itself), the XLA path,
    PyTorch and the copy, each with a finite positive time."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "sharded.py"), "--quick", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    rows = _tables((tmp_path / "sharded.md").read_text())["Instance norm over 8 host CPU devices"]
    assert [r["contender"] for r in rows] == [
        "lucid (native kernel)", "lucid (XLA path)", "PyTorch (one process)", "copy"]
    for row in rows:
        assert math.isfinite(float(row["ms"])) and float(row["ms"]) > 0, row
