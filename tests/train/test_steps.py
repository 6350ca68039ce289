"""The training package's factories: explicit keywords, one rule for ghost batches, the train
step against its definition, and the optimizer and schedule registries."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bnjax import models
from bnjax.train import optim, steps

IMAGES = jax.random.normal(jax.random.key(0), (12, 8, 8, 1)) * 3.0 + 1.0
LABELS = jnp.arange(12) % 3
OPTIONS = dict(num_classes=3, norm="batch", features=(4, 8), ghost_batch_size=4)


def test_ghost_batches_and_axis_name_shape_training_only():
    train = steps.make_model("small_cnn", **OPTIONS, axis_name="batch")
    evaluation = steps.make_model("small_cnn", **OPTIONS, axis_name="batch", for_training=False)
    assert train.norm_options == {"momentum": 0.99, "axis_name": "batch", "ghost_batch_size": 4}
    assert evaluation.norm_options == {"momentum": 0.99}
    # Per-example norms take no batch-statistics options at all.
    group = steps.make_model("small_cnn", **(OPTIONS | dict(norm="group", norm_groups=2)))
    assert group.norm_options == {}


def test_batch_statistics_evaluation_uses_whole_batches():
    # The batch-statistics evaluation runs the norms in training mode: a module left with its
    # ghost batch size would normalize per group (and refuse a batch it does not divide).
    evaluation = steps.make_model("small_cnn", **OPTIONS, for_training=False)
    plain = steps.make_model("small_cnn", **(OPTIONS | dict(ghost_batch_size=None)))
    ghost = steps.make_model("small_cnn", **OPTIONS)
    state = steps.initial_state(evaluation, optim.make_optimizer("sgd", 0.1), IMAGES[:2], 0)
    images, labels = IMAGES[:10], LABELS[:10]  # 10: not a multiple of the ghost size 4
    counts = steps.make_eval_step(evaluation)(state, images, labels)
    assert [int(c) for c in counts] == [
        int(c) for c in steps.make_eval_step(plain)(state, images, labels)
    ]
    with pytest.raises(ValueError, match="ghost"):
        steps.make_eval_step(ghost)(state, images, labels)


def test_train_step_is_one_optimizer_step_on_the_gradient():
    """Plain SGD at 0.1: the new parameters are the old ones minus 0.1 times the gradient of
    the batch's mean cross-entropy (computed here independently), the statistics are the
    forward pass's, and the metrics are that loss and accuracy."""
    model = steps.make_model("small_cnn", **(OPTIONS | dict(ghost_batch_size=None)))
    optimizer = optim.make_optimizer("sgd", 0.1)
    state = steps.initial_state(model, optimizer, IMAGES[:2], 0)

    def loss(params):
        variables = {"params": params, "batch_stats": state["batch_stats"]}
        logits, updates = model.apply(variables, IMAGES, train=True, mutable=["batch_stats"])
        mean = optax.softmax_cross_entropy_with_integer_labels(logits, LABELS).mean()
        return mean, (logits, updates)

    (want_loss, (logits, updates)), grads = jax.value_and_grad(loss, has_aux=True)(state["params"])
    step = jax.jit(steps.make_train_step(model, optimizer), static_argnums=2)
    new_state, metrics = step(state, {"image": IMAGES, "label": LABELS}, None)
    assert int(new_state["step"]) == 1 and set(metrics) == {"loss", "accuracy"}
    np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-6)
    np.testing.assert_allclose(metrics["accuracy"], jnp.mean(logits.argmax(-1) == LABELS))
    want_params = jax.tree.map(lambda p, g: p - 0.1 * g, state["params"], grads)
    for got, want in zip(
        jax.tree.leaves(new_state["params"]), jax.tree.leaves(want_params), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    for got, want in zip(
        jax.tree.leaves(new_state["batch_stats"]),
        jax.tree.leaves(updates["batch_stats"]),
        strict=True,
    ):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_models_take_flax_batch_norm_as_their_norm():
    model = models.SmallCNN(features=(4,), norm=functools.partial(nn.BatchNorm, momentum=0.9))
    variables = model.init(jax.random.key(0), IMAGES, train=False)
    keep = jnp.arange(12) < 8
    _, updates = model.apply(variables, IMAGES, train=True, mask=keep, mutable=["batch_stats"])
    # flax's own module keeps its own statistics (no counters: bnjax's norms add those).
    assert set(updates["batch_stats"]["norm0"]) == {"mean", "var"}
    with pytest.raises(ValueError, match="`norm_options` apply to a norm given by name"):
        models.MLP(norm=nn.BatchNorm, norm_options={"momentum": 0.9}).init(
            jax.random.key(0), IMAGES, train=False
        )


def test_optimizer_and_schedule_names_are_registries():
    with pytest.raises(ValueError, match=r"unknown optimizer 'adam'; the optimizers are \('sgd'"):
        optim.make_optimizer("adam", 0.1)
    with pytest.raises(ValueError, match=r"unknown schedule 'linear'; the schedules are"):
        optim.learning_rate_schedule(0.1, num_steps=10, schedule="linear")
    schedule = optim.learning_rate_schedule(0.1, num_steps=10, warmup_steps=2, schedule="cosine")
    np.testing.assert_allclose([schedule(0), schedule(2), schedule(10)], [0.0, 0.1, 0.0], atol=1e-7)
