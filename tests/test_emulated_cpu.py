"""The build made here runs on an older CPU: Python under QEMU's user-mode emulation of a Haswell
(AVX2, no AVX-512) picks the AVX2 path and computes what NumPy does.

A build that used this machine's AVX-512 unconditionally dies there with
SIGILL at the first kernel call. Needs ``qemu-x86_64`` (Debian's qemu-user,
which .ci/run installs); about half a minute.
"""

from __future__ import annotations

import json
import os
import pathlib
import platform
import shutil
import subprocess
import sys

import pytest

import lucid
import lucid.nn.functional as F

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(lucid.__file__).resolve().parent.parent
SMOKE = pathlib.Path(__file__).with_name("native_smoke.py")


def test_an_emulated_haswell_runs_the_avx2_path():
    qemu = shutil.which("qemu-x86_64")
    if platform.machine() != "x86_64" or qemu is None:
        pytest.fail("this test emulates an x86-64 Haswell: it needs an x86-64 host with qemu-user installed")
    if "avx2" not in F.native_kernel_status().isas:
        pytest.fail(f"this build has no AVX2 path: {F.native_kernel_status()!r}")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUCID_")}
    env["PYTHONPATH"] = str(ROOT)
    command = [qemu, "-cpu", "Haswell", sys.executable, str(SMOKE), "--require-kernel", "--isa", "avx2"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"exit {done.returncode}\n{done.stdout}\n{done.stderr[-3000:]}"
    result = json.loads(done.stdout.splitlines()[-1])
    assert result["isa"] == "avx2" and result["cpu_isas"] == ["baseline", "avx2"], result
    assert result["uses_kernel"] and result["y_error"] < 1e-4 and result["gx_error"] < 1e-4, result
