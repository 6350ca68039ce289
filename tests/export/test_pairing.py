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


def test_a_model_without_batch_norm_is_an_error():
    model = nn.Dense(3)
    with pytest.raises(ValueError, match="no batch norm"):
        lifecycle.fold_model(
            model,
            {
                "params": model.init(jax.random.key(0), IMAGES[:1, 0, 0])["params"],
                "batch_stats": {},
            },
            IMAGES[:1, 0, 0],
        )
