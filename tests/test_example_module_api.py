"""examples/module_api.py runs end to end and reports real numbers."""

import json
import subprocess
import sys
from pathlib import Path

import matplotlib.image

import lucid

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "module_api.py"


def test_module_api_example(tmp_path):
    run = subprocess.run([sys.executable, str(EXAMPLE), "--steps", "40", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["last_loss"] < 1e-3 * report["first_loss"]
    assert report["reload_identical"] is True
    assert report["torch_max_abs_diff"] < 1e-4
    image = matplotlib.image.imread(tmp_path / "module_api_training.png")
    assert image.ndim == 3 and image.shape[0] > 100
    state = lucid.load(tmp_path / "module_api_state.npz")
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert int(state["num_batches_tracked"]) == 40
