"""StandardizedConv / CenteredConv (linen and nnx) are flax's Conv on the mapped kernel: same
options, same variables, same outputs as flax's Conv given the pre-standardized kernel."""

from __future__ import annotations

import dataclasses

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax
from bnjax import linen as bl
from bnjax import nnx as bx
from bnjax.lifecycle import fold_model

MAPS = {
    "standardized": (bl.StandardizedConv, bx.StandardizedConv, bnjax.standardize_weight),
    "centered": (bl.CenteredConv, bx.CenteredConv, bnjax.centralize_weight),
}

# Options of flax's Conv, each changing the computation (kernel_size is (3, 3) unless set).
OPTIONS = [
    {},
    {"strides": 2, "padding": "VALID"},
    {"padding": "CIRCULAR", "kernel_dilation": 2},
    {"padding": "REFLECT", "kernel_dilation": (1, 2)},
    {"padding": ((1, 2), (0, 1)), "input_dilation": 2},
    {"feature_group_count": 2},
    {"use_bias": False},
    {"bias_init": nn.initializers.normal(1.0), "kernel_init": nn.initializers.uniform(2.0)},
    {"precision": jax.lax.Precision.HIGHEST},
    {"kernel_size": (1, 1)},
    {"kernel_size": (2, 3), "strides": (1, 2)},
]


def _images(shape=(2, 7, 7, 4), seed=0, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def _mapped(kernel_fn, kernel, mask=None):
    """The kernel flax's Conv must hold to match: mapped over the mask's kept entries."""
    if mask is None:
        return kernel_fn(kernel)
    return kernel_fn(kernel * mask, mask=mask != 0)


# Every option with the standardized kernel; the centered kernel with the defaults (the option
# handling is the same code).
CASES = [("standardized", options) for options in OPTIONS] + [("centered", {})]
IDS = [f"{kind}-{'-'.join(options) or 'defaults'}" for kind, options in CASES]


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_linen_equals_flax_conv_on_the_mapped_kernel(kind, options):
    ours_cls, _, kernel_fn = MAPS[kind]
    options = {"kernel_size": (3, 3), **options}
    x = _images()
    ours = ours_cls(6, **options)
    variables = ours.init(jax.random.key(1), x)
    flax_conv = nn.Conv(6, **options)
    # Same variable tree as flax's Conv (names, shapes, dtypes, initializers).
    chex.assert_trees_all_equal(variables, flax_conv.init(jax.random.key(1), x))
    kernel = variables["params"]["kernel"]
    given = {"params": {**variables["params"], "kernel": kernel_fn(kernel)}}
    np.testing.assert_array_equal(ours.apply(variables, x), flax_conv.apply(given, x))


@pytest.mark.parametrize(("kind", "options"), CASES, ids=IDS)
def test_nnx_equals_flax_conv_on_the_mapped_kernel(kind, options):
    _, ours_cls, kernel_fn = MAPS[kind]
    options = {"kernel_size": (3, 3), **options}
    x = _images()
    ours = ours_cls(4, 6, rngs=nnx.Rngs(1), **options)
    plain = nnx.Conv(4, 6, rngs=nnx.Rngs(1), **options)
    chex.assert_trees_all_equal(nnx.state(ours, nnx.Param), nnx.state(plain, nnx.Param))
    plain.kernel[...] = kernel_fn(ours.kernel[...])
    np.testing.assert_array_equal(ours(x), plain(x))


@pytest.mark.parametrize("kind", MAPS)
def test_mask_statistics_over_kept_entries_and_mask_kept(kind):
    ours_linen, ours_nnx, kernel_fn = MAPS[kind]
    x = _images()
    mask = jnp.ones((3, 3, 4, 6)).at[2].set(0.0).at[1, 2].set(0.0)  # a causal-style mask
    variables = ours_linen(6, (3, 3), mask=mask).init(jax.random.key(2), x)
    kernel = variables["params"]["kernel"]
    given = {"params": {**variables["params"], "kernel": _mapped(kernel_fn, kernel, mask)}}
    expected = nn.Conv(6, (3, 3), mask=mask).apply(given, x)
    np.testing.assert_allclose(ours_linen(6, (3, 3), mask=mask).apply(variables, x), expected)
    layer = ours_nnx(4, 6, (3, 3), mask=mask, rngs=nnx.Rngs(0))
    layer.kernel[...], layer.bias[...] = kernel, variables["params"]["bias"]
    np.testing.assert_allclose(layer(x), expected, rtol=1e-6, atol=1e-6)
    # The hidden entries do not move the statistics: changing them changes nothing.
    changed = {"params": {**variables["params"], "kernel": kernel + 5.0 * (mask == 0)}}
    np.testing.assert_allclose(ours_linen(6, (3, 3), mask=mask).apply(changed, x), expected)


@pytest.mark.parametrize("kind", MAPS)
def test_bfloat16_compute_maps_the_float32_kernel(kind):
    ours_linen, ours_nnx, kernel_fn = MAPS[kind]
    x = _images(dtype=jnp.bfloat16)
    ours = ours_linen(6, (3, 3), dtype=jnp.bfloat16)
    variables = ours.init(jax.random.key(3), x)
    assert variables["params"]["kernel"].dtype == jnp.float32
    given = {"params": {**variables["params"], "kernel": kernel_fn(variables["params"]["kernel"])}}
    y = ours.apply(variables, x)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, nn.Conv(6, (3, 3), dtype=jnp.bfloat16).apply(given, x))
    layer = ours_nnx(4, 6, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    plain = nnx.Conv(4, 6, (3, 3), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    plain.kernel[...] = kernel_fn(layer.kernel[...])
    np.testing.assert_array_equal(layer(x), plain(x))


def test_epsilon_option_and_custom_promote_dtype_pass_through():
    x = _images()
    calls = []

    def promote(*arrays, dtype=None):  # linen's convention: (inputs, kernel, bias)
        calls.append(dtype)
        return nn.dtypes.promote_dtype(*arrays, dtype=dtype)

    ours = bl.StandardizedConv(6, (3, 3), epsilon=0.5, promote_dtype=promote)
    variables = ours.init(jax.random.key(4), x)
    kernel = variables["params"]["kernel"]
    given = {
        "params": {**variables["params"], "kernel": bnjax.standardize_weight(kernel, epsilon=0.5)}
    }
    np.testing.assert_allclose(ours.apply(variables, x), nn.Conv(6, (3, 3)).apply(given, x))
    assert calls

    nnx_calls = []

    def nnx_promote(arrays, dtype=None):  # nnx's convention: one tuple
        nnx_calls.append(dtype)
        return nnx.nn.dtypes.promote_dtype(arrays, dtype=dtype)

    layer = bx.StandardizedConv(
        4, 6, (3, 3), epsilon=0.5, promote_dtype=nnx_promote, rngs=nnx.Rngs(0)
    )
    plain = nnx.Conv(4, 6, (3, 3), rngs=nnx.Rngs(0))
    plain.kernel[...] = bnjax.standardize_weight(layer.kernel[...], epsilon=0.5)
    np.testing.assert_allclose(layer(x), plain(x), rtol=1e-6, atol=1e-6)
    assert nnx_calls and layer.promote_dtype.promote is nnx_promote and layer.epsilon == 0.5


def test_gradients_reach_the_stored_kernel():
    x = _images()
    # epsilon ~ 0: the map is then invariant to scaling each channel's kernel, too.
    ours = bl.StandardizedConv(6, (3, 3), epsilon=1e-12)
    variables = ours.init(jax.random.key(5), x)

    def loss(params):
        return jnp.sum(ours.apply({"params": params}, x) ** 2)

    grads = jax.grad(loss)(variables["params"])
    # The map is invariant to shifting and scaling each output channel's kernel, so the
    # gradient is orthogonal to both directions: zero sum and zero projection on W - mean.
    kernel, g = variables["params"]["kernel"], grads["kernel"]
    size = jnp.abs(g).sum(axis=(0, 1, 2))
    assert float(size.min()) > 0
    np.testing.assert_array_less(jnp.abs(g.sum(axis=(0, 1, 2))), 1e-5 * size)
    centered = kernel - kernel.mean(axis=(0, 1, 2))
    cosine = (g * centered).sum(axis=(0, 1, 2)) / (
        jnp.linalg.norm(g.reshape(-1, 6), axis=0) * jnp.linalg.norm(centered.reshape(-1, 6), axis=0)
    )
    np.testing.assert_array_less(jnp.abs(cosine), 1e-4)


def test_nnx_under_jit_and_grad():
    layer = bx.StandardizedConv(4, 6, (3, 3), rngs=nnx.Rngs(0))
    x = _images()

    @nnx.jit
    def loss(layer, x):
        return jnp.sum(layer(x) ** 2)

    grads = nnx.grad(loss)(layer, x)
    g = grads.kernel[...]
    np.testing.assert_array_less(
        jnp.abs(g.sum(axis=(0, 1, 2))), 1e-5 * jnp.abs(g).sum(axis=(0, 1, 2))
    )
    np.testing.assert_allclose(loss(layer, x), jnp.sum(layer(x) ** 2), rtol=1e-5)


def test_public_names():
    assert issubclass(bl.StandardizedConv, nn.Conv) and issubclass(bl.CenteredConv, nn.Conv)
    assert issubclass(bx.StandardizedConv, nnx.Conv) and issubclass(bx.CenteredConv, nnx.Conv)
    assert {"StandardizedConv", "CenteredConv"} <= set(bl.__all__) & set(bx.__all__)


# ----------------------------------------------------------------------------- folding


class _LinenNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool = False):
        x = bl.StandardizedConv(6, (3, 3), use_bias=False, name="ws")(x)
        x = bl.BatchNorm(use_running_average=not train, name="bn")(x)  # folds into ws
        y = bl.CenteredConv(6, (1, 1), name="centered")(nn.relu(x))
        y = bl.BatchNorm(use_running_average=not train, name="bn_c")(y)  # folds into centered
        z = bl.StandardizedConv(6, (3, 3), name="ws_unpaired")(y)
        return bl.BatchNorm(use_running_average=not train, name="bn_sum")(z + y)  # affine


def _trained_linen():
    x = _images(seed=6)
    model = _LinenNet()
    variables = model.init(jax.random.key(7), x)
    _, updates = model.apply(variables, 3.0 * x + 1.0, train=True, mutable=["batch_stats"])
    return model, {**variables, **updates}, x


def test_linen_fold_model_uses_the_standardized_kernel():
    model, variables, x = _trained_linen()
    folded = fold_model(model, variables, x, train=False)
    assert folded.plan.pairs == {("bn",): ("ws",), ("bn_c",): ("centered",)}
    reference = folded.evaluate(x)
    np.testing.assert_allclose(
        folded(x), reference, rtol=1e-5, atol=1e-5 * float(jnp.abs(reference).max())
    )
    np.testing.assert_allclose(reference, model.apply(variables, x), rtol=1e-6, atol=1e-6)


class _NnxNet(nnx.Module):
    def __init__(self, rngs):
        mask = jnp.ones((3, 3, 4, 6)).at[2].set(0.0)
        self.ws = bx.StandardizedConv(4, 6, (3, 3), use_bias=False, mask=mask, rngs=rngs)
        self.bn = bx.BatchNorm(6, rngs=rngs)
        self.centered = bx.CenteredConv(6, 6, (1, 1), rngs=rngs)
        self.bn_c = bx.BatchNorm(6, rngs=rngs)
        self.ws_unpaired = bx.StandardizedConv(6, 6, (3, 3), rngs=rngs)

    def __call__(self, x):
        y = self.bn_c(self.centered(nnx.relu(self.bn(self.ws(x)))))
        return self.ws_unpaired(y) + y


def test_nnx_fold_model_uses_the_standardized_kernel():
    model, x = _NnxNet(nnx.Rngs(0)), _images(seed=8)
    model.train()
    model(3.0 * x + 1.0)
    model.eval()
    expected = model(x)
    folded = fold_model(model, x)
    assert folded.plan.pairs == {("bn",): ("ws",), ("bn_c",): ("centered",)}
    scale = float(jnp.abs(expected).max())
    np.testing.assert_allclose(folded(x), expected, rtol=1e-5, atol=1e-5 * scale)
    np.testing.assert_allclose(folded.evaluate(x), expected, rtol=1e-6, atol=1e-6)
    # The user's model still standardizes (the folded one is a clone).
    assert isinstance(model.ws.promote_dtype, bnjax.nnx.standardized_conv.KernelFirst)


def test_linen_fields_are_flax_conv_fields_with_flax_defaults():
    def fields(cls):
        return [
            (f.name, f.default) for f in dataclasses.fields(cls) if f.name not in ("parent", "name")
        ]

    theirs = fields(nn.Conv)
    assert fields(bl.CenteredConv) == theirs
    assert fields(bl.StandardizedConv) == [*theirs, ("epsilon", 1e-5)]
