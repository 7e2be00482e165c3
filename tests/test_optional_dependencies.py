"""The module-system layers are optional: ``import lucid`` needs neither Flax nor Equinox,
and ``lucid.flax`` / ``lucid.equinox`` without their framework say which extra to install."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)


def test_importing_lucid_imports_neither_framework():
    run = _python(
        "import sys, lucid, lucid.nn, lucid.nn.functional\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('flax', 'equinox')))\n"
        "import lucid.flax, lucid.equinox\n"
        "print('flax' in sys.modules, 'equinox' in sys.modules)"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:2] == ["[]", "True True"]


@pytest.mark.parametrize("framework", ["flax", "equinox"])
def test_missing_framework_names_the_extra(framework):
    # A None entry in sys.modules makes `import framework` fail as if it were not installed.
    run = _python(
        f"import sys; sys.modules[{framework!r}] = None\n"
        "import lucid\n"
        "try:\n"
        f"    import lucid.{framework}\n"
        "except ImportError as e:\n"
        "    print(type(e).__name__, '|', e, '|', type(e.__cause__).__name__)\n"
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == (
        f'ImportError | lucid.{framework} needs {"Flax (NNX)" if framework == "flax" else "Equinox"}; '
        f'install it with: pip install "lucid-jax[{framework}]" | ModuleNotFoundError'
    )
