"""fold_model / trace_pairs: pairs from the traced computation, for any linen or nnx model."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bnjax import lifecycle
from tests.export.user_models import IMAGES, user_linen, user_nnx
from tests.lifecycle.helpers import DATA, initialised


def _relative_error(folded, x) -> float:
    reference = np.asarray(jax.jit(folded.evaluate)(x))
    return float(
        np.max(np.abs(np.asarray(jax.jit(folded)(x)) - reference)) / np.abs(reference).max()
    )


def test_a_users_linen_resnet_folds_although_its_names_say_nothing():
    model, variables = user_linen()
    with pytest.raises(ValueError, match="fold_model"):  # name-based pairing cannot
        lifecycle.fold(variables)
    folded = lifecycle.fold_model(model, variables, IMAGES[:2], train=False)
    assert folded.plan.pairs == {
        ("entry_bn",): ("entry",),
        ("body_a_bn",): ("body_a",),
        ("body_b_bn",): ("body_b",),
        ("proj_bn",): ("proj",),
    }
    assert list(folded.plan.unfoldable) == [("after_add",)]
    assert "after an addition" in folded.plan.format()
    assert _relative_error(folded, IMAGES) < 2e-5


def test_a_users_nnx_model_folds_and_is_left_untouched():
    model = user_nnx()
    kernel = np.asarray(model.features.kernel[...])
    folded = lifecycle.fold_model(model, IMAGES[:2])
    assert folded.plan.pairs == {("features_bn",): ("features",), ("hidden_bn",): ("hidden",)}
    assert list(folded.plan.unfoldable) == [("pooled_bn",)]
    assert _relative_error(folded, IMAGES) < 2e-5
    np.testing.assert_array_equal(model.features.kernel[...], kernel)  # folded in a clone
    assert type(model.features_bn) is nnx.BatchNorm and model.features.bias is None


def test_traced_pairs_of_the_bundled_resnet_are_the_named_ones():
    model, variables = initialised("resnet20")
    plan = lifecycle.trace_pairs(model, variables, DATA[:2], train=False)
    assert plan.pairs == lifecycle.pair_by_name(variables) and not plan.unfoldable
    assert (
        _relative_error(lifecycle.fold_model(model, variables, DATA[:2], train=False), DATA[:8])
        < 2e-5
    )


class _Reused(nn.Module):
    """A conv output read twice (norm and skip), and one Dense layer called twice."""

    @nn.compact
    def __call__(self, x):
        y = nn.Dense(4, name="read_twice")(x)
        z = nn.BatchNorm(use_running_average=True, name="skip_bn")(y) + y
        shared = nn.Dense(4, name="shared")
        a = nn.BatchNorm(use_running_average=True, name="shared_bn")(shared(z))
        return a + shared(x)


def test_a_layer_output_used_twice_or_a_shared_layer_does_not_fold():
    x = DATA.reshape(-1, 4)[:4]
    variables = _Reused().init(jax.random.key(0), x)
    plan = lifecycle.trace_pairs(_Reused(), variables, x)
    assert plan.pairs == {}
    assert "read_twice is also used elsewhere" in plan.unfoldable[("skip_bn",)]
    assert "more than once" in plan.unfoldable[("shared_bn",)]
    folded = lifecycle.fold_model(_Reused(), variables, x)
    np.testing.assert_allclose(folded(x), folded.evaluate(x), rtol=1e-6, atol=1e-6)


def test_norms_run_in_evaluation_mode_whatever_the_keywords_say():
    model, variables = user_linen()
    folded = lifecycle.fold_model(model, variables, IMAGES[:2], train=True)
    expected = model.apply(variables, IMAGES, train=False)
    np.testing.assert_allclose(folded(IMAGES), expected, atol=2e-5 * np.abs(expected).max())
    np.testing.assert_allclose(folded(IMAGES[:1]), expected[:1], atol=2e-5 * np.abs(expected).max())


def test_a_stripped_or_nan_statistic_is_refused_naming_the_layer():
    model, variables = user_linen()
    stats = {
        **variables["batch_stats"],
        "body_a_bn": {"mean": variables["batch_stats"]["body_a_bn"]["mean"]},
    }
    with pytest.raises(ValueError, match=r"body_a_bn.*\['var'\] missing"):
        lifecycle.fold_model(model, {**variables, "batch_stats": stats}, IMAGES[:2])
    with pytest.raises(ValueError, match="stripped"):
        lifecycle.fold_model(model, {"params": variables["params"]}, IMAGES[:2])
    entry = variables["batch_stats"]["entry_bn"]
    poisoned = {**entry, "var": entry["var"].at[3].set(jnp.nan)}
    stats = {**variables["batch_stats"], "entry_bn": poisoned}
    with pytest.raises(ValueError, match=r"entry_bn.*var non-finite in 1 channel"):
        lifecycle.fold_model(model, {**variables, "batch_stats": stats}, IMAGES[:2])


class _NoBatchNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.relu(nn.GroupNorm(num_groups=2)(nn.Dense(4)(x))))


class _NnxNoBatchNorm(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.proj(x))


def test_a_model_without_batch_norm_has_nothing_to_fold_and_is_kept_as_it_is():
    x = DATA.reshape(-1, 4)[:4]
    variables = _NoBatchNorm().init(jax.random.key(0), x)
    assert "batch_stats" not in variables
    for folded in (
        lifecycle.fold_model(_NoBatchNorm(), variables, x),
        lifecycle.fold_model(_NoBatchNorm(), {**variables, "batch_stats": {}}, x),
    ):
        assert folded.plan.pairs == {} and folded.plan.norms == {} and folded.statistics == {}
        assert folded.plan.format() == "no batch norm: nothing to fold"
        np.testing.assert_array_equal(folded(x), _NoBatchNorm().apply(variables, x))
        np.testing.assert_array_equal(folded.evaluate(x), folded(x))
    model = _NnxNoBatchNorm(nnx.Rngs(0))
    folded = lifecycle.fold_model(model, x)
    assert folded.plan.norms == {}
    np.testing.assert_array_equal(folded(x), model(x))


# --------------------------------------------------------------------------- lifted transforms


class _Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        return nn.relu(nn.BatchNorm(use_running_average=True, name="bn")(nn.Dense(4)(x))), None


class _Scanned(nn.Module):
    """Two blocks stacked by nn.scan: each variable has a leading axis of 2."""

    @nn.compact
    def __call__(self, x):
        stack = nn.scan(
            _Block,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            length=2,
        )
        return stack(name="stack")(x, None)[0]


class _VBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        return _Block(name="block")(x)[0]


class _Ensemble(nn.Module):
    """nn.vmap over a member axis: stacked (2 members) or shared (broadcast) variables."""

    stacked: bool

    @nn.compact
    def __call__(self, x):
        axis = 0 if self.stacked else None
        members = nn.vmap(
            _VBlock,
            variable_axes={"params": axis, "batch_stats": axis},
            split_rngs={"params": self.stacked},
            in_axes=1,
            out_axes=1,
        )
        return members(name="members")(x)


def _trained(model, x):
    variables = model.init(jax.random.key(0), x)
    rng = np.random.default_rng(0)

    def away(path, value):  # statistics as after training, so a wrong fold shows
        name = path[-1].key
        if name in ("mean", "bias"):
            return jnp.asarray(rng.normal(size=value.shape), value.dtype)
        if name in ("var", "scale"):
            return jnp.asarray(rng.uniform(0.5, 2.0, value.shape), value.dtype)
        return value

    return jax.tree_util.tree_map_with_path(away, variables)


def test_stacked_lifted_transforms_are_refused_naming_the_transform():
    x = DATA.reshape(-1, 4)[:4]
    for model, inputs, transform in (
        (_Scanned(), x, "nn.scan"),
        (_Ensemble(stacked=True), np.stack([x, x + 1.0], axis=1), "nn.vmap"),
    ):
        variables = _trained(model, inputs)
        with pytest.raises(ValueError, match=transform) as caught:
            lifecycle.fold_model(model, variables, inputs)
        assert "stacked" in str(caught.value) and "export_function" in str(caught.value)


def test_an_nn_vmap_with_shared_variables_folds():
    x = np.stack([DATA.reshape(-1, 4)[:4], DATA.reshape(-1, 4)[4:8]], axis=1)
    model = _Ensemble(stacked=False)
    folded = lifecycle.fold_model(model, _trained(model, x), x)
    assert folded.plan.pairs == {("members", "block", "bn"): ("members", "block", "Dense_0")}
    assert _relative_error(folded, x) < 2e-5


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.proj = nnx.Linear(4, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        return nnx.relu(self.norm(self.proj(x)))


class _NnxRemat(nnx.Module):
    """A block under nnx.remat (recomputed in the backward pass) and a norm outside it."""

    def __init__(self, rngs):
        self.block = _NnxBlock(rngs)
        self.head = nnx.Linear(4, 4, rngs=rngs)
        self.head_norm = nnx.BatchNorm(4, use_running_average=True, rngs=rngs)

    def __call__(self, x):
        x = nnx.remat(lambda block, x: block(x))(self.block, x)
        return self.head_norm(self.head(x))


def test_an_nnx_remat_model_folds():
    model = _NnxRemat(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    for norm in (model.block.norm, model.head_norm):
        norm.mean[...] = jnp.asarray(rng.normal(size=4), jnp.float32)
        norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, 4), jnp.float32)
    x = DATA.reshape(-1, 4)[:8]
    folded = lifecycle.fold_model(model, x)
    assert folded.plan.pairs == {("block", "norm"): ("block", "proj"), ("head_norm",): ("head",)}
    assert _relative_error(folded, x) < 2e-5
    assert type(model.block.norm) is nnx.BatchNorm  # the model itself is untouched
