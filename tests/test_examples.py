"""The example scripts run end to end, quickly, and save what they promise.

Each example runs in a subprocess, as a user would start it, with ``--steps N --out DIR``; it
shows a progress bar, and the last line it prints is a JSON report whose numbers are checked here.
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
import torch

import lucid

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(script: str, *args: str, cwd: Path) -> tuple[dict, str]:
    """Run ``examples/<script>`` with ``args`` in ``cwd`` as a user would; return its final JSON
    report and everything it printed."""
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
    assert re.search(r"100%\|.*\|", result.stderr), f"{script}: no finished progress bar on stderr"
    return json.loads(result.stdout.strip().splitlines()[-1]), result.stdout


def read_png(path: Path) -> np.ndarray:
    assert path.is_file(), f"{path.name} was not written"
    image = mpimg.imread(path)
    assert image.ndim == 3 and image.shape[-1] in (3, 4), image.shape
    return image


def test_functional_training_learns_and_writes_its_plot_where_it_runs(tmp_path):
    report, _ = run_example("functional_training.py", "--steps", "60", cwd=tmp_path)  # default --out: cwd

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
    report, _ = run_example("style_transfer.py", "--steps", "8", "--out", str(out), cwd=tmp_path)

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
    report, _ = run_example("module_api.py", "--steps", "40", "--out", str(tmp_path), cwd=tmp_path)
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
    out = tmp_path / "plots"
    report, printed = run_example("data_parallel.py", "--steps", "3", "--out", str(out), cwd=tmp_path)
    assert printed.startswith("8 devices (cpu, 1 process(es)), batch of 64"), printed
    assert (report["devices"], report["processes"], report["batch"], report["steps"]) == (8, 1, 64, 3)

    # The oracle: the same step on one device.
    assert report["one_device_gap"] < 1e-5, report
    assert report["stats_in_sync"] is True

    losses = report["losses"]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses), report
    # Cross-entropy of 4 classes starts near log(4) for a fresh network.
    assert 0.5 * math.log(4) < losses[0] < 3 * math.log(4), report
    for key in ("accuracy_instance_stats", "accuracy_running_stats"):
        assert 0 <= report[key] <= 1, report

    plot = out / "data_parallel_loss.png"
    assert report["plot"] == str(plot) and f"saved {plot.resolve()}" in printed
    read_png(plot)


def test_seed_examples_print_the_reference_examples_correct_numbers(tmp_path):
    """The numbers it prints (and saves) against PyTorch: the module example after --steps training
    calls, and F.instance_norm's example."""
    report, _ = run_example("seed_examples.py", "--steps", "3", "--out", str(tmp_path), cwd=tmp_path)
    assert json.loads((tmp_path / "seed_examples.json").read_text()) == report
    assert report["steps"] == 3

    x = torch.tensor([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]]], requires_grad=True)
    theirs = torch.nn.InstanceNorm2d(2, affine=True, track_running_stats=True)
    for _ in range(3):
        y = theirs(x)
    y.sum().backward()
    module = report["module"]
    np.testing.assert_allclose(module["output"], y.detach().numpy(), atol=1e-5)
    np.testing.assert_allclose(module["input_grad"], x.grad.numpy(), atol=1e-5)  # 0 up to rounding
    np.testing.assert_allclose(module["running_stats"]["running_mean"], theirs.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(module["running_stats"]["running_var"], theirs.running_var.numpy(), rtol=1e-6)
    assert module["running_stats"]["num_batches_tracked"] == 3  # torch's InstanceNorm counts none

    expected = torch.nn.functional.instance_norm(
        torch.tensor([[[1.0, 2.0], [3.0, 4.0]]]), torch.zeros(2), torch.ones(2), torch.ones(2), torch.zeros(2),
        use_input_stats=True)
    np.testing.assert_allclose(report["functional"]["output"], expected.numpy(), atol=1e-5)
