"""Sampler properties: permutations, determinism, the measured composition matches the setting,
per-process shards rebuild the global batch."""

import numpy as np
import pytest

from bnjax.data import composition, samplers, sharding

# 10 groups of unequal sizes (between about 250 and 1200), N = 7000.
GROUPS = np.random.default_rng(0).choice(10, 7000, p=np.linspace(0.05, 0.15, 10))
EQUAL = np.repeat(np.arange(10), 700)


def all_samplers(groups, batch_size, seed=0):
    return [
        samplers.UniformSampler(num_examples=len(groups), batch_size=batch_size, seed=seed),
        samplers.ClusteredSampler(groups=groups, batch_size=batch_size, seed=seed),
        samplers.ClusteredSampler(
            groups=groups, batch_size=batch_size, seed=seed, shuffle_batches=True
        ),
        samplers.SkewedSampler(groups=groups, batch_size=batch_size, seed=seed, skew=0.6),
        samplers.SkewedSampler(
            groups=groups, batch_size=batch_size, seed=seed, skew=0.9, num_dominant=3
        ),
        samplers.BalancedSampler(groups=groups, batch_size=batch_size, seed=seed),
    ]


@pytest.mark.parametrize("batch_size", [1, 7, 128, 1000, 7000])
@pytest.mark.parametrize("index", range(6))
def test_each_epoch_is_a_permutation_of_a_subset(index, batch_size):
    sampler = all_samplers(GROUPS, batch_size)[index]
    for epoch in range(2):
        order = sampler.epoch(epoch)
        assert order.shape == (len(GROUPS) // batch_size, batch_size)
        assert np.issubdtype(order.dtype, np.integer)
        assert len(np.unique(order)) == order.size  # no index repeats within an epoch
        assert order.min() >= 0 and order.max() < len(GROUPS)


@pytest.mark.parametrize("index", range(6))
def test_deterministic_from_seed_and_epoch(index):
    first, again = all_samplers(GROUPS, 64, seed=3)[index], all_samplers(GROUPS, 64, seed=3)[index]
    np.testing.assert_array_equal(first.epoch(5), again.epoch(5))
    assert not np.array_equal(first.epoch(5), first.epoch(6))
    other_seed = all_samplers(GROUPS, 64, seed=4)[index]
    assert not np.array_equal(first.epoch(5), other_seed.epoch(5))


def test_group_ids_need_not_be_dense():
    # Ids are renumbered in sorted order: an order-preserving renaming changes nothing ...
    renamed = GROUPS * 100 - 7
    for dense, sparse in zip(all_samplers(GROUPS, 50), all_samplers(renamed, 50), strict=True):
        np.testing.assert_array_equal(dense.epoch(0), sparse.epoch(0))
    # ... and any renaming keeps the composition.
    shuffled = np.array([5, 9, 0, 3, 7, 1, 8, 2, 6, 4])[GROUPS] - 3
    order = samplers.SkewedSampler(groups=shuffled, batch_size=100, skew=0.5).epoch(0)
    assert abs(composition.estimate_skew(order, GROUPS) - 0.5) < 0.03


@pytest.mark.parametrize("skew", [0.25, 0.5, 0.75, 1.0])
@pytest.mark.parametrize("num_dominant", [1, 2])
def test_measured_skew_matches_the_setting(skew, num_dominant):
    sampler = samplers.SkewedSampler(
        groups=EQUAL, batch_size=100, skew=skew, num_dominant=num_dominant, seed=1
    )
    order = sampler.epoch(0)
    measured = composition.estimate_skew(order, EQUAL, num_dominant)
    assert abs(measured - skew) < 0.03, measured
    # The share of the m most frequent groups: skew + (1 - skew) * m / G for equal groups.
    expected_share = skew + (1 - skew) * num_dominant / 10
    assert abs(composition.top_share(order, EQUAL, num_dominant).mean() - expected_share) < 0.03


def test_skew_holds_for_unequal_groups_and_subclusters():
    subclusters = GROUPS * 3 + np.random.default_rng(1).integers(0, 3, len(GROUPS))
    for groups, batch_size in ((GROUPS, 256), (subclusters, 128)):
        order = samplers.SkewedSampler(groups=groups, batch_size=batch_size, skew=0.7).epoch(0)
        assert abs(composition.estimate_skew(order, groups) - 0.7) < 0.03


def test_skew_is_capped_when_groups_are_small_against_the_batch():
    # 10 groups of 700, batches of 200: a group fills at most 3 pure batches, so 5 of the 35
    # batches are mixed (two groups); the measured skew says so.
    order = samplers.SkewedSampler(groups=EQUAL, batch_size=200, skew=1.0).epoch(0)
    assert np.sum(composition.top_share(order, EQUAL) == 1) == 30
    assert 0.85 < composition.estimate_skew(order, EQUAL) < 0.95


def test_skew_zero_is_uniform_and_skew_one_is_pure():
    uniform = samplers.UniformSampler(num_examples=len(EQUAL), batch_size=200).epoch(0)
    skew_zero = samplers.SkewedSampler(groups=EQUAL, batch_size=200, skew=0.0).epoch(0)
    baseline = composition.top_share(uniform, EQUAL).mean()  # above 1/G by chance
    assert abs(composition.top_share(skew_zero, EQUAL).mean() - baseline) < 0.02
    assert composition.estimate_skew(uniform, EQUAL) < 0.1
    pure = samplers.SkewedSampler(groups=EQUAL, batch_size=100, skew=1.0).epoch(0)
    assert np.all(composition.top_share(pure, EQUAL) == 1.0)  # 700 = 7 batches per group


def test_skewed_batches_have_distinct_dominant_groups():
    order = samplers.SkewedSampler(
        groups=EQUAL, batch_size=100, skew=0.9, num_dominant=3, seed=2
    ).epoch(0)
    top3 = np.sort(composition.group_counts(order, EQUAL), axis=1)[:, -3:]
    assert np.all(top3 >= 30)  # three groups of 30 (+ filler) in every batch


def test_clustered_is_a_stream_of_one_group_batches():
    sampler = samplers.ClusteredSampler(groups=GROUPS, batch_size=100, seed=0)
    order = sampler.epoch(0)
    purity = composition.top_share(order, GROUPS)
    assert np.sum(purity < 1) <= sampler.num_groups - 1  # only where one group ends
    assert composition.repeat_rate(order, GROUPS) > 0.85  # consecutive batches: same group
    shuffled = samplers.ClusteredSampler(
        groups=GROUPS, batch_size=100, seed=0, shuffle_batches=True
    ).epoch(0)
    assert np.sum(composition.top_share(shuffled, GROUPS) < 1) <= sampler.num_groups - 1
    assert composition.repeat_rate(shuffled, GROUPS) < 0.3
    # each group is one run per epoch, in a new order every epoch
    majority = np.argmax(composition.group_counts(order, GROUPS), axis=1)
    runs = majority[np.r_[True, majority[1:] != majority[:-1]]]
    assert len(runs) == len(set(runs.tolist())) == 10
    next_majority = np.argmax(composition.group_counts(sampler.epoch(1), GROUPS), axis=1)
    assert next_majority[0] != majority[0] or next_majority[-1] != majority[-1]


@pytest.mark.parametrize("batch_size", [10, 64, 333])
def test_balanced_batches_are_stratified(batch_size):
    order = samplers.BalancedSampler(groups=GROUPS, batch_size=batch_size, seed=0).epoch(0)
    share = np.bincount(GROUPS) / len(GROUPS)
    counts = composition.group_counts(order, GROUPS)
    target = batch_size * share
    assert np.all((counts == np.floor(target)) | (counts == np.ceil(target)))
    assert composition.proportion_error(order, GROUPS) < 1
    for process in range(2 if batch_size % 2 == 0 else 1):
        block = sharding.shard(order, process, 2) if batch_size % 2 == 0 else order
        assert composition.proportion_error(block, GROUPS) < 3


def test_balanced_with_random_group_sizes():
    rng = np.random.default_rng(7)
    for trial in range(20):
        num_groups = int(rng.integers(1, 40))
        groups = rng.choice(num_groups, int(rng.integers(100, 3000)))
        batch_size = int(rng.integers(1, 100))
        order = samplers.BalancedSampler(groups=groups, batch_size=batch_size, seed=trial)
        order = order.epoch(trial)
        assert len(np.unique(order)) == order.size
        assert composition.proportion_error(order, groups) < 1


@pytest.mark.parametrize("index", range(6))
@pytest.mark.parametrize("process_count", [1, 2, 4])
def test_shards_rebuild_the_global_batch(index, process_count):
    order = all_samplers(GROUPS, 64)[index].epoch(0)
    blocks = [sharding.shard(order, p, process_count) for p in range(process_count)]
    assert all(block.shape == (order.shape[0], 64 // process_count) for block in blocks)
    np.testing.assert_array_equal(np.concatenate(blocks, axis=1), order)


def test_shard_defaults_to_this_jax_process():
    order = np.arange(12).reshape(3, 4)
    np.testing.assert_array_equal(sharding.shard(order), order)  # one process


def test_clear_errors():
    with pytest.raises(ValueError, match="batch_size"):
        samplers.UniformSampler(num_examples=10, batch_size=11)
    with pytest.raises(ValueError, match="batch_size"):
        samplers.BalancedSampler(groups=EQUAL, batch_size=0)
    with pytest.raises(ValueError, match="skew"):
        samplers.SkewedSampler(groups=EQUAL, batch_size=10, skew=1.5)
    with pytest.raises(ValueError, match="num_dominant"):
        samplers.SkewedSampler(groups=EQUAL, batch_size=10, num_dominant=11)
    with pytest.raises(ValueError, match="groups"):
        samplers.ClusteredSampler(groups=np.zeros((4, 2), int), batch_size=2)
    with pytest.raises(ValueError, match="groups"):
        samplers.ClusteredSampler(groups=np.linspace(0, 1, 8), batch_size=2)
    with pytest.raises(ValueError, match="seed"):
        samplers.UniformSampler(num_examples=10, batch_size=2, seed=-1).epoch(0)
    with pytest.raises(ValueError, match="divisible"):
        sharding.shard(np.zeros((2, 6), int), 0, 4)
    with pytest.raises(ValueError, match="process_index"):
        sharding.shard(np.zeros((2, 6), int), 3, 3)
