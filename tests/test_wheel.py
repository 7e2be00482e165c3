"""The package as a user gets it: an sdist with every kernel source, a wheel built from it carrying
every instruction-set path, installed into a fresh virtual environment, running the kernel there.

Slow (a build of the kernel for four instruction sets and an install of
jax into a new venv, from pip's cache when warm): CI runs it once.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tarfile
import zipfile

import pytest

import lucid
import lucid.nn.functional as F

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(lucid.__file__).resolve().parent.parent
SMOKE = pathlib.Path(__file__).with_name("native_smoke.py")


def _run(command: list[str], **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LUCID_", "PYTHONPATH"))}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200, **kwargs)
    assert done.returncode == 0, f"{command}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def test_the_wheel_built_from_the_sdist_installs_and_runs_the_kernel(tmp_path):
    if not (ROOT / "setup.py").exists():
        pytest.fail(f"the wheel test builds from a source tree; lucid was imported from {ROOT}")
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)])
    sdist, = dist.glob("*.tar.gz")
    wheel, = dist.glob("*.whl")

    sources = {p.relative_to(ROOT).as_posix() for p in (ROOT / "csrc").iterdir()}
    with tarfile.open(sdist) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    assert sources <= packed, sources - packed
    assert not any(name.endswith(".so") for name in packed)

    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        record = json.loads(zf.read("lucid/_instance_norm_cpu.json"))
    built = [e for e in record["paths"] if e["built"]]
    assert [e["isa"] for e in built] == list(F.native_kernel_status().isas), record
    assert all(f"lucid/{e['file']}" in names for e in built)

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", str(wheel)])
    # From a directory outside the tree: lucid must come from the venv.
    done = _run([str(python), str(SMOKE), "--require-kernel"], cwd=tmp_path)
    result = json.loads(done.stdout.splitlines()[-1])
    assert pathlib.Path(result["lucid"]).is_relative_to(venv), result
    assert result["isa"] == F.native_kernel_status().cpu_isas[-1], result
    assert result["uses_kernel"] and result["y_error"] < 1e-4 and result["gx_error"] < 1e-4, result
