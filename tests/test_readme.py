"""Every Python block of README.md runs, in order, in one namespace, and prints what it should."""

import contextlib
import io
import re
from pathlib import Path

import numpy as np
from oracles import np_instance_norm

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)  # the module quickstart writes norm.npz
    namespace: dict = {}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        for block in blocks:
            exec(compile(block, str(README), "exec"), namespace)
    printed = out.getvalue().split("\n")
    assert printed[0] == "1 (4, 8, 16, 16) (4, 16, 16, 8)"  # one training step counted
    assert printed[-2] == "1"  # the jitted module step updated num_batches_tracked
    assert (tmp_path / "norm.npz").exists()
    # the sharded block kept the sharding and agrees with one device
    y, x = namespace["y"], namespace["x"]
    assert y.sharding.is_equivalent_to(x.sharding, x.ndim)
    params = namespace["F"].instance_norm_init(8)[0]
    expected = np_instance_norm(np.asarray(x), params["weight"], params["bias"])
    np.testing.assert_allclose(np.asarray(y), expected, atol=2e-5)


def test_layout_block_matches_the_tree():
    """The README's layout block names every source file of the package and the kernel, and only files
    that exist (a folder line ending in ``/`` covers what is below it)."""
    block = README.read_text().split("## Layout", 1)[1].split("```")[1]
    root = README.parent
    named = {word for line in block.splitlines() for word in line.split()[:1] if "/" in word}
    named |= {word for line in block.splitlines() for word in line.split() if word.endswith("/")}
    for path in named:
        assert (root / path).exists(), f"the README's layout names {path}, which does not exist"
    folders = tuple(p for p in named if p.endswith("/"))
    sources = [p.relative_to(root).as_posix() for pattern in ("lucid/**/*.py", "csrc/*")
               for p in root.glob(pattern) if p.is_file()]
    unlisted = [p for p in sources if p not in named and not p.startswith(folders)]
    assert not unlisted, f"files missing from the README's layout block: {unlisted}"
