"""The README's 'BN lifecycle' section stays true (its docstring examples run in
tests/test_examples.py)."""

import jax
import numpy as np


def test_readme_lifecycle_examples_run(tmp_path):
    """The README's 'BN lifecycle' section, statement for statement (smaller data)."""
    import subprocess
    import sys

    import optax
    import orbax.checkpoint as ocp

    from bnjax import diagnostics, lifecycle, models

    model = models.SmallCNN(features=(8, 16))
    images = jax.random.normal(jax.random.key(0), (128, 8, 8, 3)) * 2.0 + 1.0
    variables = model.init(jax.random.key(1), images[:2], train=False)
    batches = [images[i : i + 32] for i in range(0, 128, 32)]

    variables = lifecycle.recalibrate(model, variables, batches, apply_kwargs={"train": False})
    variables = lifecycle.recalibrate(
        model,
        variables,
        batches,
        mode="full_batch",
        apply_kwargs={"train": False},
        progress=True,
    )

    fresh = lifecycle.reset_statistics(variables)
    frozen_apply = lifecycle.freeze(model.apply)
    tx = lifecycle.freeze_optimizer(optax.adam(1e-3), variables)
    logits, updates = frozen_apply(variables, images[:64], train=True, mutable=["batch_stats"])
    assert jax.tree.all(
        jax.tree.map(
            lambda a, b: bool((a == b).all()), updates["batch_stats"], variables["batch_stats"]
        )
    )
    assert tx.init(variables["params"]) is not None

    folded = lifecycle.fold(variables)
    serving = models.SmallCNN(features=(8, 16), norm="none")
    logits = serving.apply(folded, images, train=False)
    reference = model.apply(variables, images, train=False)
    np.testing.assert_allclose(logits, reference, atol=1e-5 * float(np.abs(reference).max()))

    report = lifecycle.validate_statistics(variables)
    assert report.ok and not lifecycle.validate_statistics(fresh).ok
    manager = ocp.CheckpointManager(str(tmp_path / "checkpoints"))
    manager.save(1000, args=ocp.args.StandardSave(variables))
    manager.wait_until_finished()
    command = [sys.executable, "-m", "bnjax.lifecycle", "validate", str(tmp_path / "checkpoints")]
    assert subprocess.run(command, capture_output=True, timeout=120).returncode == 0

    with diagnostics.telemetry():
        logits, updates = model.apply(
            variables,
            images[:64],
            train=True,
            mutable=["batch_stats", "bn_telemetry"],
        )
    metrics = diagnostics.summaries(updates["bn_telemetry"])
    assert float(metrics["bn/norm0/drift"]) < 0.2
    logits, per_layer = diagnostics.collect(model, variables, images[:64] * 3.0, train=False)
    assert float(per_layer[("norm0",)].drift) > 1.0
