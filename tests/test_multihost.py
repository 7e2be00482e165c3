"""Many hosts: two processes on this machine, joined by ``jax.distributed`` over gloo, two CPU
devices each, run one jitted lucid training step on one global, batch-sharded array; every
process's share equals the same step in one process."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from multihost_worker import problem, train

WORKER = Path(__file__).with_name("multihost_worker.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    port = _free_port()
    root = str(Path(__file__).parents[1])  # the workers import lucid from the tree under test
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    outs = [tmp_path / f"process{i}.npz" for i in range(2)]
    workers = [subprocess.Popen([sys.executable, str(WORKER), str(i), str(port), str(outs[i])], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    for worker in workers:
        log, _ = worker.communicate(timeout=300)
        assert worker.returncode == 0, log[-3000:]

    x, g, params, stats = problem()
    expected = {k: np.asarray(v) for k, v in train(params, stats, x, g).items()}  # one process, one device
    for i, out in enumerate(outs):
        got = dict(np.load(out))
        assert bool(got.pop("uses_kernel")), "each device should run the native kernel on its block"
        assert bool(got.pop("sharded_like_x"))
        rows = slice(i * x.shape[0] // 2, (i + 1) * x.shape[0] // 2)
        for key, value in got.items():
            want = expected[key][rows] if key in ("y", "dx") else expected[key]
            np.testing.assert_allclose(value, want, rtol=2e-5, atol=2e-5, err_msg=f"process {i}: {key}")
