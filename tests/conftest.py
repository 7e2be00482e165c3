"""Test set-up shared by the suite (the oracles are in ``oracles.py``).

Eight host CPU devices are configured here, before anything imports jax, so the
multi-device tests see a mesh of 8 on any machine.
"""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()

import numpy as np
import pytest
import torch  # (the oracle is required: a missing torch fails, never skips)

torch.manual_seed(0)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)
