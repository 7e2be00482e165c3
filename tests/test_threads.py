"""One module shared by threads: functional_call never touches it, and eager training loses no
running-statistics update and no gradient contribution."""

import threading

import jax.numpy as jnp
import numpy as np
import torch
from oracles import reference_running_stats

import lucid.nn as nn
from lucid import Tensor

SHAPE = (2, 3, 4, 4)


def _run_threads(target, chunks):
    errors = []
    barrier = threading.Barrier(len(chunks))

    def run(chunk):
        try:
            barrier.wait(10)  # start together: the calls overlap
            target(chunk)
        except Exception as error:  # reported below, with the thread's traceback lost otherwise
            errors.append(error)

    threads = [threading.Thread(target=run, args=(chunk,)) for chunk in chunks]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors


def _snapshot(module):
    return {k: np.array(v) for k, v in module.state_dict().items()}


def test_concurrent_functional_calls_each_see_their_own_pytrees(rng):
    """4 threads x 300 functional_call on one module, each with its own pytrees, while a fifth calls
    the module eagerly in eval mode: every output is the single-threaded one, and the module is
    unchanged after (its parameters, buffers and mode)."""
    norm = nn.InstanceNorm2d(3, momentum=0.3)
    norm.load_state_dict({"weight": rng.normal(size=3), "bias": rng.normal(size=3),
                          "running_mean": rng.normal(size=3), "running_var": rng.uniform(0.5, 2, size=3),
                          "num_batches_tracked": np.int64(5)})
    norm.eval()
    before = _snapshot(norm)
    calls = []
    for i in range(1200):
        params = {k: jnp.asarray(rng.normal(size=3).astype(np.float32)) for k in ("weight", "bias")}
        stats = {"running_mean": jnp.asarray(rng.normal(size=3).astype(np.float32)),
                 "running_var": jnp.asarray(rng.uniform(0.5, 2, size=3).astype(np.float32)),
                 "num_batches_tracked": jnp.asarray(i, jnp.int32)}
        x = jnp.asarray((rng.normal(size=SHAPE) * 2 + 1).astype(np.float32))
        calls.append((params, stats, x, bool(i % 2)))
    # The oracle: the same calls, one after another (their results do not depend on the order).
    expected = [norm.functional_call(p, s, x, training=t) for p, s, x, t in calls]
    x_eager = (rng.normal(size=SHAPE) + 1).astype(np.float32)
    expected_eager = np.asarray(norm(x_eager))
    theirs = torch.nn.InstanceNorm2d(3, affine=True, track_running_stats=True).eval()
    theirs.load_state_dict({k: torch.tensor(v) for k, v in before.items()})
    np.testing.assert_allclose(expected_eager, theirs(torch.tensor(x_eager)).detach().numpy(), atol=3e-5)

    results = [None] * len(calls)
    eager_out = []

    def work(indices):
        if indices is None:  # the eager caller: the module's own state, in its own (eval) mode
            for _ in range(300):
                eager_out.append(np.asarray(norm(x_eager)))
            return
        for i in indices:
            p, s, x, t = calls[i]
            results[i] = norm.functional_call(p, s, x, training=t)

    _run_threads(work, [range(k, len(calls), 4) for k in range(4)] + [None])
    for (y, new), (y_ref, new_ref) in zip(results, expected):
        np.testing.assert_array_equal(y, y_ref)
        assert new.keys() == new_ref.keys()
        for k in new:
            np.testing.assert_array_equal(new[k], new_ref[k])
    assert len(eager_out) == 300 and all(np.array_equal(y, expected_eager) for y in eager_out)
    after = _snapshot(norm)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in after)
    assert not norm.training


def test_eight_threads_training_one_module_lose_no_update(rng):
    """8 threads x 50 training calls + backward: num_batches_tracked counts all 400, the gradients are
    the sums of all 400 contributions, and the running statistics (momentum=None: the plain average
    of every batch, whatever the order) are those of a serial run."""
    batches = [((rng.normal(size=SHAPE) * (1 + i % 7) + i % 5 - 2).astype(np.float32),
                rng.normal(size=SHAPE).astype(np.float32)) for i in range(400)]

    def train(norm, chunk):
        for i in chunk:
            x, g = batches[i]
            (norm(Tensor(x)) * Tensor(g)).sum().backward()

    shared = nn.InstanceNorm2d(3, momentum=None)
    _run_threads(lambda chunk: train(shared, chunk), [range(k, 400, 8) for k in range(8)])
    serial = nn.InstanceNorm2d(3, momentum=None)
    train(serial, range(400))

    assert shared.num_batches_tracked.item() == serial.num_batches_tracked.item() == 400
    for name in ("bias", "weight"):  # equal up to the order of the float32 sums
        np.testing.assert_allclose(getattr(shared, name).grad.numpy(), getattr(serial, name).grad.numpy(),
                                   rtol=1e-5, atol=1e-4, err_msg=name)
    # bias.grad is exactly the sum of the cotangents over the batch and space: the float64 oracle.
    expected_bias = sum(g.astype(np.float64).sum(axis=(0, 2, 3)) for _, g in batches)
    np.testing.assert_allclose(shared.bias.grad.numpy(), expected_bias, rtol=1e-5, atol=1e-3)
    mean_oracle = np.mean([reference_running_stats(x, np.zeros(3), np.ones(3), momentum=1.0)[0] for x, _ in batches],
                          axis=0)
    var_oracle = np.mean([reference_running_stats(x, np.zeros(3), np.ones(3), momentum=1.0)[1] for x, _ in batches],
                         axis=0)
    for module in (shared, serial):
        np.testing.assert_allclose(module.running_mean.numpy(), mean_oracle, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(module.running_var.numpy(), var_oracle, rtol=1e-5)
