"""Loading the native kernel never breaks ``import lucid``, and says what it did.

Each test starts a fresh Python (the kernel is loaded once, at import) with
``LUCID_NATIVE_DIR`` pointing the loader at a directory of libraries and a
build record made for the case: libraries that fail to load, paths the CPU
lacks, a failed build, none at all. In every case ``tests/native_smoke.py``
runs a jitted forward and backward and compares it with float64 NumPy.
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
from lucid.nn import _native

pytestmark = pytest.mark.slow

ROOT = pathlib.Path(lucid.__file__).resolve().parent.parent
SMOKE = pathlib.Path(__file__).with_name("native_smoke.py")
WARNING = "lucid's native CPU kernel"


def _run(*, code: str | None = None, **env: str) -> tuple[dict | str, str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LUCID_")}
    environment.update(PYTHONPATH=str(ROOT), **env)
    command = [sys.executable, "-W", "always", *(["-c", code] if code else [str(SMOKE)])]
    done = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return (json.loads(done.stdout.splitlines()[-1]) if not code else done.stdout), done.stderr


def _assert_correct(result: dict) -> None:
    assert result["y_error"] < 1e-4 and result["gx_error"] < 1e-4, result


@pytest.fixture
def copied_build(tmp_path) -> tuple[pathlib.Path, dict]:
    """A copy of this install's libraries and build record, to break."""
    record = json.loads((_native._library_dir() / _native._RECORD).read_text())
    for entry in record["paths"]:
        if entry["built"]:
            shutil.copy(_native._library_dir() / entry["file"], tmp_path / entry["file"])
    _write_record(tmp_path, record)
    return tmp_path, record


def _write_record(directory: pathlib.Path, record: dict) -> None:
    (directory / _native._RECORD).write_text(json.dumps(record))


def test_lucid_native_0_never_loads_the_library():
    code = """
import pathlib, lucid.nn.functional as F
s = F.native_kernel_status()
mapped = "_instance_norm_cpu" in pathlib.Path("/proc/self/maps").read_text()
print(s.loaded, s.enabled, s.disabled_by, F.native_kernel_available(), mapped)
try:
    F.instance_norm_apply({}, {}, __import__("numpy").ones((2, 3, 4)), implementation="native")
except ValueError as e:
    print("refused:", e)
"""
    out, err = _run(code=code, LUCID_NATIVE="0")
    assert out.splitlines()[0] == "False False LUCID_NATIVE=0 False False", out
    assert "refused:" in out and "LUCID_NATIVE=0" in out
    assert WARNING not in err
    result, _ = _run(LUCID_NATIVE="0")
    assert not result["uses_kernel"]
    _assert_correct(result)


def test_a_library_that_fails_to_load_is_one_warning_and_the_xla_path(copied_build):
    directory, record = copied_build
    for entry in record["paths"]:  # every library corrupt: the loader cannot even ask the CPU
        if entry["built"]:
            (directory / entry["file"]).write_bytes(b"\x7fELF not really a library")
    code = f"""
import runpy, sys
sys.argv = ["native_smoke.py"]
import lucid.nn.functional
import lucid.nn.functional as F  # imported twice: one warning still
runpy.run_path({str(SMOKE)!r}, run_name="__main__")
"""
    out, err = _run(code=code, LUCID_NATIVE_DIR=str(directory))
    result = json.loads(out.splitlines()[-1])
    assert err.count(WARNING) == 1, err
    assert "failed to load" in err and "Running the XLA path" in err
    assert not result["loaded"] and not result["uses_kernel"] and "failed to load" in result["problem"]
    _assert_correct(result)


def test_the_next_path_runs_when_the_best_fails_to_load(copied_build):
    directory, record = copied_build
    built = [e for e in record["paths"] if e["built"]]
    if len(built) < 2:
        pytest.fail(f"this test needs a build with two paths or more, got {built}")
    best = _run(LUCID_NATIVE_DIR=str(directory))[0]["isa"]
    index = [e["isa"] for e in built].index(best)
    (directory / built[index]["file"]).write_bytes(b"garbage")
    result, err = _run(LUCID_NATIVE_DIR=str(directory))
    assert result["isa"] == built[index - 1]["isa"] and result["uses_kernel"], result
    assert err.count(WARNING) == 1 and f"the {best} path failed to load" in err
    _assert_correct(result)


def test_a_path_the_cpu_lacks_is_never_loaded_even_when_asked_for(copied_build):
    """A path whose features the CPU does not report (here: one no CPU has) is skipped; asking for it
    with LUCID_NATIVE_ISA is a warning and the best path the CPU runs."""
    directory, record = copied_build
    built = [e for e in record["paths"] if e["built"]]
    if len(built) < 2:
        pytest.fail(f"this test needs a build with two paths or more, got {built}")
    built[-1]["features"] = [*built[-1]["features"], "a-feature-no-cpu-has"]
    _write_record(directory, record)
    result, err = _run(LUCID_NATIVE_DIR=str(directory), LUCID_NATIVE_ISA=built[-1]["isa"])
    assert result["isa"] == built[-2]["isa"] and built[-1]["isa"] not in result["cpu_isas"], result
    assert err.count(WARNING) == 1 and "not supported by this CPU" in err
    _assert_correct(result)
    result, err = _run(LUCID_NATIVE_DIR=str(directory), LUCID_NATIVE_ISA="no-such-isa")
    assert result["isa"] == built[-2]["isa"] and "not an instruction-set path" in err
    result, err = _run(LUCID_NATIVE_DIR=str(directory), LUCID_NATIVE_ISA="baseline")
    assert result["isa"] == "baseline" and result["uses_kernel"] and WARNING not in err
    _assert_correct(result)


def test_a_failed_build_is_reported_with_the_compiler_messages(tmp_path):
    record = {"format": 1, "paths": [{"isa": "baseline", "features": [], "file": "x.so", "built": False,
                                      "error": "command 'g++' failed", "messages": "csrc/ffi.cc:1: error: oops\n"}]}
    _write_record(tmp_path, record)
    code = "import lucid.nn.functional as F; s = F.native_kernel_status(); print(repr(s)); print(s.problem)"
    out, err = _run(code=code, LUCID_NATIVE_DIR=str(tmp_path))
    assert "built=False" in out and "csrc/ffi.cc:1: error: oops" in out and "not built" in out
    assert WARNING not in err  # no compiler is not a fault: the XLA path, as documented
    result, _ = _run(LUCID_NATIVE_DIR=str(tmp_path))
    assert not result["loaded"] and not result["uses_kernel"]
    _assert_correct(result)
    empty = tmp_path / "empty"
    empty.mkdir()
    result, err = _run(LUCID_NATIVE_DIR=str(empty))
    assert "no build record" in result["problem"] and WARNING not in err
    _assert_correct(result)
