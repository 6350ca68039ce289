"""In-memory batches per process, and determinism: same seed, same batches, same metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bnjax
from bnjax import data

CONFIG = data.ClusterConfig(num_classes=4, subclusters_per_class=2, train_per_class=128)


@pytest.mark.parametrize("kind", data.SAMPLERS)
def test_processes_together_read_the_global_batch(kind):
    train = data.load("clusters", "train", config=CONFIG)
    sampler = data.make_sampler(kind, train.groups("subcluster"), batch_size=32, seed=2)
    whole = list(data.batches(train, sampler, start_epoch=1, num_epochs=2))
    parts = [
        list(
            data.batches(
                train, sampler, start_epoch=1, num_epochs=2, process_index=p, process_count=4
            )
        )
        for p in range(4)
    ]
    assert len(whole) == 2 * sampler.num_batches
    for step, batch in enumerate(whole):
        for key in ("image", "label", "index", "subcluster"):
            np.testing.assert_array_equal(
                np.concatenate([part[step][key] for part in parts]), batch[key]
            )
        assert batch["image"].shape == (32, 16, 16, 3)
    np.testing.assert_array_equal(whole[0]["index"], sampler.epoch(1)[0])


def test_endless_iteration_and_size_check():
    train = data.load("clusters", "train", config=CONFIG)
    sampler = data.make_sampler("uniform", len(train), batch_size=100)
    stream = data.batches(train, sampler, num_epochs=None)
    indices = [next(stream)["index"] for _ in range(3 * sampler.num_batches + 1)]
    np.testing.assert_array_equal(indices[-1], sampler.epoch(3)[0])
    with pytest.raises(ValueError, match="examples"):
        next(data.batches(train, data.make_sampler("uniform", 10, batch_size=2)))
    with pytest.raises(ValueError, match="Unknown sampler"):
        data.make_sampler("sorted", train.labels, 8)
    # The error lists the registry's names: the valid values are its keys.
    with pytest.raises(ValueError, match=r"\('uniform', 'clustered', 'skewed', 'balanced'\)"):
        data.make_sampler("sorted", train.labels, 8)
    with pytest.raises(ValueError, match="group ids"):
        data.make_sampler("balanced", 512, 8)


def run(seed: int, kind: str, steps: int = 12) -> list[float]:
    """A few SGD steps of a BN network on generated clusters; returns loss and running mean."""
    train = data.load("clusters", "train", config=CONFIG, seed=seed)
    sampler = data.make_sampler(kind, train.labels, batch_size=32, seed=seed, skew=0.7)
    weights = jax.random.normal(jax.random.key(seed), (16 * 16 * 3, 4)) * 0.01
    state = bnjax.batch_norm_state(4)
    optimizer = optax.sgd(0.1)
    opt_state = optimizer.init(weights)

    @jax.jit
    def step(weights, state, opt_state, images, labels):
        def loss_fn(weights):
            logits, new_state = bnjax.batch_norm(
                images.reshape(len(images), -1) @ weights, state, training=True
            )
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), new_state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights)
        updates, opt_state = optimizer.update(grads, opt_state)
        return optax.apply_updates(weights, updates), state, opt_state, loss

    metrics = []
    for _, batch in zip(range(steps), data.batches(train, sampler, num_epochs=None), strict=False):
        weights, state, opt_state, loss = step(
            weights, state, opt_state, jnp.asarray(batch["image"]), jnp.asarray(batch["label"])
        )
        metrics.append(float(loss))
    return metrics + np.asarray(state.mean).tolist()


@pytest.mark.parametrize("kind", ["uniform", "skewed"])
def test_same_seed_same_metrics(kind):
    first, again, other = run(0, kind), run(0, kind), run(1, kind)
    assert first == again  # bit for bit
    assert first != other
