"""The reference pages' two examples, with their correct results.

Run: ``python examples/seed_examples.py``
"""

import jax
import jax.numpy as jnp
import numpy as np

import lucid.nn.functional as F


def main() -> None:
    np.set_printoptions(precision=4, suppress=True)

    print("InstanceNorm2d(num_features=2) on the (1, 2, 2, 3) input:")
    x = jnp.array([[[[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], [[7.0, 8.0, 9.0], [10.0, 11.0, 12.0]]]])
    params, stats = F.instance_norm_init(2)

    def forward(x):
        return F.instance_norm_apply(params, stats, x, training=True)

    (y, new_stats), pullback = jax.vjp(forward, x)
    print(np.asarray(y))
    (grad,) = pullback((jnp.ones_like(y), jax.tree.map(jnp.zeros_like, new_stats)))
    print("gradient of output.sum() with respect to the input (zero up to rounding):")
    print(np.asarray(grad))
    print("running statistics after that training call:")
    print({k: np.asarray(v) for k, v in new_stats.items()})

    print("\nF.instance_norm on the (1, 2, 2) input:")
    x = jnp.array([[[1.0, 2.0], [3.0, 4.0]]])
    out = F.instance_norm(x, jnp.zeros(2), jnp.ones(2), jnp.ones(2), jnp.zeros(2), training=True)
    print(np.asarray(out))


if __name__ == "__main__":
    main()
