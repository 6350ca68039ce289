"""The study's trainer measures `bnjax.train`'s step from outside: its states follow the plain
step's bit for bit, and what it records equals what an independent computation gives."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import diagnostics
from bnjax.study import training
from bnjax.train.optim import make_optimizer
from bnjax.train.steps import initial_state, make_model, make_train_step

IMAGES = jax.random.normal(jax.random.key(0), (24, 8, 8, 1)) * 2.0 + 0.5
LABELS = jnp.arange(24) % 3
SEEDS, STEPS, BATCH = (0, 1), 4, 8


def _rows():
    """(S, T, B): every seed its own batches."""
    order = [np.random.default_rng(s).choice(24, STEPS * BATCH) for s in SEEDS]
    return np.stack([o.reshape(STEPS, BATCH) for o in order]).astype(np.int32)


def _reference(model, optimizer, rows):
    """The plain train step, vmapped over seeds as the trainer runs it: per step the states
    before it, its loss, and the states after the last step."""
    plain = make_train_step(model, optimizer)

    def step(state, rows):
        return plain(state, {"image": IMAGES[rows], "label": LABELS[rows]}, None)

    step = jax.jit(jax.vmap(step))
    state = training.stack_states([initial_state(model, optimizer, IMAGES[:2], s) for s in SEEDS])
    before, losses = [], []
    for t in range(rows.shape[1]):
        before.append(state)
        state, metrics = step(state, rows[:, t])
        losses.append(metrics["loss"])
    return before, np.stack(losses, axis=1), state


@pytest.fixture(scope="module", params=["batch", "group"])
def trained(request):
    model = make_model(
        "small_cnn", num_classes=3, norm=request.param, norm_groups=2, features=(4, 8)
    )
    optimizer = make_optimizer("nesterov", 0.1, momentum=0.9, weight_decay=5e-4)
    rows = _rows()
    states = training.stack_states([initial_state(model, optimizer, IMAGES[:2], s) for s in SEEDS])
    train = training.make_trainer(model, model, optimizer)
    final, record, _ = train(states, IMAGES, LABELS, rows, (IMAGES, LABELS), [STEPS])
    return request.param, model, optimizer, rows, final, jax.device_get(record)


def test_trainer_states_and_loss_are_the_plain_steps_bit_for_bit(trained):
    norm, model, optimizer, rows, final, record = trained
    _, losses, reference = _reference(model, optimizer, rows)
    assert ("batch_stats" in final) == (norm == "batch")
    assert jax.tree.structure(final) == jax.tree.structure(reference)
    for got, want in zip(jax.tree.leaves(final), jax.tree.leaves(reference), strict=True):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(record["loss"], losses)


def test_recorded_statistics_equal_an_independent_computation(trained):
    """Layer moments from a separate forward pass (and, for batch norm, from
    `bnjax.diagnostics`), the pair metrics from gradients and updates computed anew."""
    norm, model, optimizer, rows, _, record = trained
    before, _, _ = _reference(model, optimizer, rows)

    @jax.jit
    def conv_outputs(variables, images):
        _, sown = model.apply(
            variables,
            images,
            train=True,
            mutable=["batch_stats", "intermediates"],
            capture_intermediates=training.is_conv_call,
        )
        return training.norm_inputs(sown["intermediates"])

    @jax.jit
    @jax.grad
    def gradient(params, state, images, labels):
        variables = {"params": params}
        if "batch_stats" in state:
            variables["batch_stats"] = state["batch_stats"]
        logits, _ = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    previous = None
    for t, stacked in enumerate(before):
        for s in range(len(SEEDS)):
            state = jax.tree.map(lambda a, s=s: a[s], stacked)
            images = IMAGES[rows[s, t]]
            variables = {k: v for k, v in state.items() if k not in ("step", "opt_state")}
            for layer, x in enumerate(conv_outputs(variables, images)):
                means, variances = (
                    record["batch_means"][layer][s, t],
                    record["batch_vars"][layer][s, t],
                )
                np.testing.assert_allclose(means, x.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-5)
                np.testing.assert_allclose(variances, x.var(axis=(0, 1, 2)), rtol=1e-4)
            if norm == "batch":
                _, per_layer = diagnostics.collect(model, variables, images, train=True)
                for layer, path in enumerate(sorted(per_layer)):
                    telemetry = per_layer[path]
                    np.testing.assert_allclose(
                        np.abs(record["batch_means"][layer][s, t]).mean(),
                        telemetry.batch_mean_abs,
                        rtol=1e-4,
                        atol=1e-6,
                    )
                    np.testing.assert_allclose(
                        record["batch_vars"][layer][s, t].mean(), telemetry.batch_var, rtol=1e-4
                    )

        grads = [
            gradient(
                jax.tree.map(lambda a, s=s: a[s], stacked["params"]),
                jax.tree.map(lambda a, s=s: a[s], stacked),
                IMAGES[rows[s, t]],
                LABELS[rows[s, t]],
            )
            for s in range(len(SEEDS))
        ]
        updates = [
            optimizer.update(
                g,
                jax.tree.map(lambda a, s=s: a[s], stacked["opt_state"]),
                jax.tree.map(lambda a, s=s: a[s], stacked["params"]),
            )[0]
            for s, g in enumerate(grads)
        ]
        for s in range(len(SEEDS)):
            if previous is None:
                assert np.isnan(record["grad_pair"][s, t]).all()
                assert np.isnan(record["update_pair"][s, t]).all()
            else:
                want_grad = training._pair(previous[0][s], grads[s])
                want_update = training._pair(previous[1][s], updates[s])
                np.testing.assert_allclose(record["grad_pair"][s, t], want_grad, rtol=1e-3)
                np.testing.assert_allclose(record["update_pair"][s, t], want_update, rtol=1e-3)
        previous = (grads, updates)
