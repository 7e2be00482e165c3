"""setup.py's build of the kernel: paths the compiler cannot target are skipped, a compiler that fails
fails nothing but the kernel, and the build record says what happened, as native_kernel_status() does.

The compiler is a wrapper script around the real one (``CC``/``CXX``): one
that rejects ``-mavx512bf16`` (an older GCC), and one that rejects everything.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import lucid

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(lucid.__file__).resolve().parent.parent


def _build(tmp_path: pathlib.Path, wrapper: str) -> tuple[dict, pathlib.Path]:
    compiler = tmp_path / "cxx"
    compiler.write_text(wrapper.replace("REAL", shutil.which("g++") or "g++"))
    compiler.chmod(0o755)
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUCID_")}
    env.update(CC=str(compiler), CXX=str(compiler))
    done = subprocess.run([sys.executable, "setup.py", "-q", "build_ext", "--build-lib", str(out),
                           "--build-temp", str(tmp_path / "temp")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]  # the kernel is optional: the build goes on
    return json.loads((out / "lucid" / "_instance_norm_cpu.json").read_text()), out / "lucid"


def _status(directory: pathlib.Path) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUCID_")}
    env.update(LUCID_NATIVE_DIR=str(directory), PYTHONPATH=str(ROOT))
    code = "import lucid.nn.functional as F; print(repr(F.native_kernel_status()))"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=300).stdout


def test_a_path_the_compiler_cannot_target_is_skipped_and_recorded(tmp_path):
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.fail("this test drives the x86-64 paths' build")
    record, directory = _build(tmp_path, """#!/bin/sh
for a in "$@"; do
  if [ "$a" = -mavx512bf16 ]; then echo "cxx: error: unrecognized command-line option '-mavx512bf16'" >&2; exit 1; fi
done
exec REAL "$@"
""")
    paths = {e["isa"]: e for e in record["paths"]}
    assert [isa for isa, e in paths.items() if e["built"]] == ["baseline", "avx2", "avx512"], record
    assert "cannot target" in paths["avx512bf16"]["skipped"]
    assert "unrecognized command-line option '-mavx512bf16'" in paths["avx512bf16"]["messages"]
    assert not (directory / paths["avx512bf16"]["file"]).exists()
    status = _status(directory)
    assert "isas=('baseline', 'avx2', 'avx512')" in status and "isa='avx512'" in status, status
    assert "unrecognized command-line option" in status


def test_a_compiler_that_fails_leaves_an_install_without_the_kernel_that_says_why(tmp_path):
    record, directory = _build(tmp_path, "#!/bin/sh\necho 'cxx: fatal error: no working compiler here' >&2\nexit 1\n")
    assert record["paths"] and not any(e["built"] for e in record["paths"]), record
    assert all("no working compiler here" in e["messages"] for e in record["paths"])
    status = _status(directory)
    assert "built=False" in status and "loaded=False" in status and "no working compiler here" in status, status
