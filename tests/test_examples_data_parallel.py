"""Smoke test of ``examples/data_parallel.py``: a few steps in a fresh process."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data_parallel.py"


def test_data_parallel_example_runs_on_eight_devices_it_sets_up_itself(tmp_path):
    # No XLA_FLAGS: the example must ask for 8 host devices on its own.
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    run = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "3"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    out = run.stdout
    assert out.startswith("8 devices (cpu, 1 process(es)), batch of 64"), out

    # The oracle: the same step on one device.
    gap = float(re.search(r"on one device: max \|difference\| = (\S+)", out).group(1))
    assert gap < 1e-5, out
    assert "running statistics identical on all 8 local devices: True" in out

    losses = [float(v) for v in re.findall(r"^step +\d+ +loss (\S+)", out, flags=re.M)]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), out
    # Cross-entropy of 4 classes starts near log(4) for a fresh network.
    assert 0.5 * math.log(4) < losses[0] < 3 * math.log(4), out
    accuracies = re.search(r"\(chance: 0\.25\): (\S+) with instance statistics, (\S+) with", out)
    assert accuracies and all(0 <= float(a) <= 1 for a in accuracies.groups()), out

    plot = tmp_path / "data_parallel_loss.png"
    assert f"saved {plot}" in out
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5_000

