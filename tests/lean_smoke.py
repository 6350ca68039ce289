"""Run by tests/test_lean_install.py inside a virtual environment holding only `pip install .`:
imports every library module it is given, checks that the applications say which extra they
need, and runs batch norm, group norm, folding and recalibration end to end.

    python lean_smoke.py bnjax.core bnjax.linen ...
"""

import importlib
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def main(modules: list[str]) -> None:
    for module in modules:
        importlib.import_module(module)
    for application, extra in (("bnjax.train", "train"), ("bnjax.study", "study")):
        try:
            importlib.import_module(application)
        except ModuleNotFoundError as error:
            assert f"bnjax[{extra}]" in str(error), str(error)
        else:
            raise AssertionError(f"{application} imported without its extra [{extra}]")

    import bnjax
    from bnjax import lifecycle
    from bnjax import linen as bn_linen

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(3.0, 2.0, (16, 4, 4, 3)), jnp.float32)

    # Batch norm, the functional core: the running statistics go in and come back out.
    y, state = bnjax.batch_norm(x, bnjax.batch_norm_state(3), training=True, momentum=0.0)
    reference = np.asarray(x, np.float64).var(axis=(0, 1, 2))
    np.testing.assert_allclose(np.asarray(state.var), reference, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0.0, atol=1e-5)

    # Group norm: statistics per example and group.
    g = np.asarray(bnjax.group_norm(x, num_groups=1), np.float64)
    np.testing.assert_allclose(g.reshape(16, -1).mean(axis=1), 0.0, atol=1e-5)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, train: bool):
            x = nn.Conv(8, (3, 3))(x)
            x = bn_linen.BatchNorm(use_running_average=not train)(x)
            x = bn_linen.GroupNorm(num_groups=2)(nn.relu(x))
            return nn.Dense(2)(x.mean(axis=(1, 2)))

    model = Net()
    variables = model.init(jax.random.key(0), x, train=False)

    # Recalibration: the running statistics become the population's, exactly.
    batches = [x[:8], x[8:]]
    variables = lifecycle.recalibrate(model, variables, batches, apply_kwargs={"train": False})
    stats = jax.tree.leaves(variables["batch_stats"])
    assert all(np.isfinite(np.asarray(leaf)).all() for leaf in stats)

    # Folding into the conv for serving: equal to the model in evaluation mode.
    folded = lifecycle.fold_model(model, variables, x, train=False)
    np.testing.assert_allclose(
        np.asarray(folded(x)), np.asarray(model.apply(variables, x, train=False)), atol=1e-4
    )
    print(f"lean install: {len(modules)} library modules imported; BN, GN, fold, recalibrate ok")


if __name__ == "__main__":
    main(sys.argv[1:])
