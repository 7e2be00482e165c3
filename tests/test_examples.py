"""The example scripts run end to end, quickly, and save what they promise.

Each example runs in a subprocess, as a user would start it, with a few training steps; the
last line it prints is a JSON report whose numbers are checked here.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image as mpimg
import numpy as np
import skimage.data

import lucid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, cwd: Path, report: bool = True) -> dict | str:
    """Run ``examples/<script>`` with ``args`` in ``cwd`` as a user would; return its final JSON
    report (or, with ``report=False``, everything it printed)."""
    env = dict(os.environ)
    # The suite fakes 8 CPU devices (conftest); an example should see the machine as a user does.
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr[-3000:]}"
    if not report:
        return result.stdout
    assert "training" in result.stderr, "the progress bar should be on stderr"
    return json.loads(result.stdout.strip().splitlines()[-1])


def read_png(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path.name} was not written"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[-1] in (3, 4), image.shape
    return image


def test_functional_training_learns_and_writes_its_plot_where_it_runs(tmp_path):
    report = run_example("functional_training.py", "--steps", "60", cwd=tmp_path)  # default --out: cwd

    plot = read_png(tmp_path / "functional_training_loss.png")
    assert plot.shape[0] > 200 and plot.shape[1] > 300
    assert report["steps"] == 60
    assert report["loss_last"] < report["loss_first"] - 0.1
    for key in ("eval_loss", "eval_accuracy", "eval_loss_instance_stats", "eval_accuracy_instance_stats"):
        assert math.isfinite(report[key]), key
    # Four classes: chance is 0.25. Sixty steps are enough to beat it clearly.
    assert report["eval_accuracy_instance_stats"] > 0.4
    assert 0.0 <= report["eval_accuracy"] <= 1.0


def test_style_transfer_stylizes_the_bundled_photo(tmp_path):
    out = tmp_path / "pictures"
    report = run_example("style_transfer.py", "--steps", "8", "--out", str(out), cwd=tmp_path)

    _, height, width = report["image_shape"]
    photo = read_png(out / "style_transfer_input.png")[..., :3]
    output = read_png(out / "style_transfer_output.png")[..., :3]
    assert photo.shape == output.shape == (height, width, 3)
    # The input is scikit-image's cat, downscaled: its mean colour is the original's.
    original = skimage.data.chelsea().astype(np.float64) / 255
    np.testing.assert_allclose(photo.mean(axis=(0, 1)), original.mean(axis=(0, 1)), atol=0.01)
    assert output.std() > 0.05, "the stylized image should not be flat"
    for name in ("style", "side_by_side", "loss"):
        read_png(out / f"style_transfer_{name}.png")

    assert report["loss_last"] < 0.5 * report["loss_first"]
    assert 0.0 <= report["output_min"] <= report["output_max"] <= 1.0


def test_module_api_trains_saves_and_matches_torch(tmp_path):
    report = run_example("module_api.py", "--steps", "40", "--out", str(tmp_path), cwd=tmp_path)
    assert report["last_loss"] < 1e-3 * report["first_loss"]
    assert report["reload_identical"] is True
    assert report["torch_max_abs_diff"] < 1e-4
    image = read_png(tmp_path / "module_api_training.png")
    assert image.shape[0] > 100
    state = lucid.load(tmp_path / "module_api_state.npz")
    assert sorted(state) == ["bias", "num_batches_tracked", "running_mean", "running_var", "weight"]
    assert int(state["num_batches_tracked"]) == 40


def test_data_parallel_runs_on_eight_devices_it_sets_up_itself(tmp_path):
    # The runner passes no device count: the example must ask for 8 host devices on its own.
    out = run_example("data_parallel.py", "--steps", "3", cwd=tmp_path, report=False)
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
    read_png(plot)
