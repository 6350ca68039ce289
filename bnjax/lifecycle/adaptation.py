"""Test-time adaptation: batch-norm statistics (and affine parameters) fitted to the test stream.

A model trained on one distribution and served on a shifted one (other contrast, offset,
noise) normalizes with stale running statistics. The fixes differ in what they trust:

| method | each batch norm normalizes with | learned |
|---|---|---|
| ``"source"`` | the trained running statistics (plain evaluation) | nothing |
| ``"test_batch"`` | the test batch's own statistics (Nado et al. 2020) | nothing |
| ``"adabn"`` | the stream's exact statistics so far, with a source prior (AdaBN) | nothing |
| ``"tent"`` | the test batch's own statistics | norms' scale/bias: entropy |
| ``"tbr"`` | moving test statistics, renorm-corrected (DELTA's TBR) | nothing |
| ``"delta"`` | as ``"tbr"`` | scale/bias: class-balanced entropy |

(`bnjax.stream_batch_renorm` and `bnjax.streaming_population_norm` hold the equations.) On
dependent streams (one class at a time, class-skewed) a test batch's statistics are those of a
few classes: ``"test_batch"`` and ``"tent"`` then normalize every class by them and TENT's
entropy minimisation reinforces the dominant class; the moving or cumulative statistics of
``"tbr"``/``"delta"``/``"adabn"`` average over many batches, and DOT weights each example by
the inverse of its predicted class's estimated frequency. docs/adaptation.md has the measured
table that says which to use when.

Every method is a pair of pure functions, optax-style (`Adapter`): ``state = adapter.init()``
(the source model) and ``logits, state = adapter.step(state, batch)`` (jittable; `jax.lax.scan`
runs a whole stream). As in the reference implementations, a step predicts with the current
parameters and then updates them, so the logits of a batch are those before its own update.
``episodic=True`` resets the state to the source before every batch (TENT's episodic mode);
``adapter.reset(state)`` does it on demand. The source model is never modified.

Entropy of a batch of N predictions p_i = softmax(logits_i) over K classes (TENT, Eq. 2):

    H(p_i) = -sum_k p_ik log p_ik,        loss = 1/N sum_i H(p_i)

DOT (DELTA, Sec. 3.3): with z the moving estimate of the class frequencies (z_0 = 1/K),

    w_k = (1 / z_k) / sum_j (1 / z_j),   w_i = w_{argmax p_i},   w_i <- N w_i / sum_j w_j
    loss = 1/N sum_i w_i H(p_i),         z <- lam z + (1 - lam) 1/N sum_i sg(p_i)

Front ends: `adapter` (linen: model + variables), `adapter_nnx` (an nnx
model, split into pure state) and `adapter_from_forward` (the functional core: your own
``forward(params, norm_states, batch)`` with the core functions). Offline AdaBN, the whole
target set before any prediction: `adapt_statistics`.

References:
  Wang, Shelhamer, Liu, Olshausen & Darrell (2021), Tent: Fully test-time adaptation by
  entropy minimization, ICLR 2021, arXiv:2006.10726.
  Zhao, Liu, Li, Ding, Sun & Wang (2023), DELTA: Degradation-free fully test-time adaptation,
  ICLR 2023, arXiv:2301.13018.
  Li, Wang, Shi, Liu & Hou (2016), Revisiting Batch Normalization For Practical Domain
  Adaptation, arXiv:1603.04779.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from bnjax.core import checks

__all__ = [
    "METHODS",
    "AdaptationState",
    "Adapter",
    "Method",
    "adapter_from_forward",
    "balanced_entropy_loss",
    "entropy_loss",
]

Array = jax.Array


class Method(NamedTuple):
    """A test-time adaptation method: which statistics the norms use, which loss is minimised
    (None: nothing is learned)."""

    statistics: str
    objective: str | None
    summary: str


METHODS: dict[str, Method] = {
    "source": Method("source", None, "the trained running statistics, no adaptation"),
    "test_batch": Method("batch", None, "each test batch's own statistics"),
    "adabn": Method("population", None, "exact statistics of the stream so far"),
    "tent": Method("batch", "entropy", "batch statistics + entropy minimisation"),
    "tbr": Method("renorm", None, "DELTA's test-time batch renormalization"),
    "delta": Method("renorm", "balanced_entropy", "TBR + class-balanced entropy (DOT)"),
}
"""The registry of `adapter`'s `method` names."""

OBJECTIVES = (None, "entropy", "balanced_entropy")


class AdaptationState(NamedTuple):
    """What a test-time adapter carries from batch to batch (a pytree).

    Attributes:
      params: the model's parameters (only the norms' scale/bias change).
      norm_states: {layer: state} of the statistics that follow the stream
        (`bnjax.StreamRenormState` or `bnjax.Moments`; empty for "source" and "batch").
      opt_state: the optimizer's state (None without an objective).
      class_prior: (K,) DOT's moving class frequencies (uniform at the start).
      step: int32, batches seen since the last reset.
      skipped: int32, updates not applied because the loss or a gradient was not finite.

    Example:
      >>> adapter = adapter_from_forward(lambda p, s, x: (x * p, s), jnp.ones(2), {})
      >>> state = adapter.init()
      >>> int(state.step), state.params.tolist()
      (0, [1.0, 1.0])
    """

    params: Any
    norm_states: Any
    opt_state: Any
    class_prior: Array
    step: Array
    skipped: Array


class Adapter(NamedTuple):
    """A test-time adaptation method as pure functions (jittable).

    Attributes:
      init: ``init() -> AdaptationState``, the source model's state.
      step: ``step(state, batch) -> (logits, state)``: predicts `batch`, then adapts.
      reset: ``reset(state) -> AdaptationState``, back to the source (same as `init`).
      method: the method's name (or "custom" from `adapter_from_forward`).

    Example:
      >>> adapter = adapter_from_forward(lambda p, s, x: (x * p, s), jnp.ones(2), {})
      >>> logits, state = adapter.step(adapter.init(), jnp.ones((3, 2)))
      >>> logits.shape, int(state.step), adapter.method
      ((3, 2), 1, 'custom')
    """

    init: Callable[[], AdaptationState]
    step: Callable[[AdaptationState, Any], tuple[Array, AdaptationState]]
    reset: Callable[[AdaptationState], AdaptationState]
    method: str


def entropy_loss(logits: Array) -> Array:
    """Mean prediction entropy of a batch of logits (N, K): TENT's loss.

    Example:
      >>> round(float(entropy_loss(jnp.zeros((4, 2)))), 4)         # uniform: log 2
      0.6931"""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.mean(jnp.sum(jnp.exp(log_p) * log_p, axis=-1))


def balanced_entropy_loss(logits: Array, class_prior: Array) -> Array:
    """DOT's class-balanced entropy (module docstring): examples whose predicted class is
    frequent in the stream so far (`class_prior`, (K,)) weigh less.

    Example:
      >>> logits = jnp.zeros((4, 2))
      >>> round(float(balanced_entropy_loss(logits, jnp.array([0.5, 0.5]))), 4)
      0.6931"""
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    entropy = -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)
    class_weight = 1.0 / class_prior
    class_weight = class_weight / jnp.sum(class_weight)
    weight = class_weight[jnp.argmax(logits, axis=-1)]
    weight = lax.stop_gradient(weight * weight.shape[0] / jnp.sum(weight))
    return jnp.mean(weight * entropy)


def _loss(objective: str, logits: Array, class_prior: Array) -> Array:
    if objective == "entropy":
        return entropy_loss(logits)
    return balanced_entropy_loss(logits, class_prior)


def _all_finite(tree) -> Array:
    leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(tree) if _is_float(v)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def _is_float(value) -> bool:
    return jnp.issubdtype(jnp.asarray(value).dtype, jnp.inexact)


def check_options(
    objective, optimizer, steps, class_momentum, num_classes
) -> tuple[int, optax.GradientTransformation | None]:
    """Validates the options shared by every front end; returns (steps, optimizer)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
    steps = checks.as_int(steps, "steps")
    if steps < 1:
        raise ValueError(f"`steps` (updates per batch) must be >= 1, got {steps}.")
    checks.check_momentum(class_momentum, "class_momentum", allow_none=False)
    if objective is None:
        return steps, None
    if optimizer is None:
        raise ValueError(
            "This method learns the norms' scale and bias: pass an optax optimizer, e.g. "
            "`optimizer=optax.sgd(1e-3, momentum=0.9)` (TENT's) or `optax.adam(1e-3)`."
        )
    if not isinstance(optimizer, optax.GradientTransformation):
        raise TypeError(
            f"`optimizer` must be an optax GradientTransformation (e.g. optax.sgd(1e-3)), got "
            f"{type(optimizer).__name__}."
        )
    if objective == "balanced_entropy" and num_classes is None:
        raise ValueError(
            "The class-balanced entropy (DOT) keeps a (K,) estimate of the class frequencies: "
            "pass `num_classes`=K, the number of logits per example."
        )
    if num_classes is not None and checks.as_int(num_classes, "num_classes") < 2:
        raise ValueError(f"`num_classes` must be >= 2, got {num_classes}.")
    return steps, optimizer


def adapter_from_forward(
    forward: Callable[[Any, Any, Any], tuple[Array, Any]],
    params,
    norm_states,
    *,
    trainable=None,
    objective: str | None = None,
    optimizer: optax.GradientTransformation | None = None,
    episodic: bool = False,
    steps: int = 1,
    num_classes: int | None = None,
    class_momentum: float = 0.95,
    method: str = "custom",
) -> Adapter:
    """A test-time adapter around any forward function (the functional core's front end).

    Args:
      forward: ``forward(params, norm_states, batch) -> (logits (N, K), new_norm_states)``,
        pure: your network, calling e.g. `bnjax.stream_batch_renorm` with its state from
        `norm_states`.
      params: the source parameters (a pytree).
      norm_states: the initial statistics states (a pytree; {} if none).
      trainable: a pytree like `params` of bools, True for the leaves the objective updates
        (the norms' scale and bias); None: all of them.
      objective: None (no parameter update), "entropy" (TENT) or "balanced_entropy" (DOT).
      optimizer: an optax optimizer for the objective (required with one).
      episodic: reset to the source before every batch.
      steps: updates per batch (each re-runs `forward` on the batch; the logits returned are
        from the last forward, before the last update).
      num_classes: K, the logits per example: required by "balanced_entropy" (its (K,)
        class prior), unused otherwise.
      class_momentum: DOT's lam, the decay of the class-frequency estimate.
      method: a name for the adapter (reports).

    Returns:
      An `Adapter`.

    Example:
      >>> def forward(params, states, x):              # one TBR layer and a linear head
      ...     h, bn = bnjax.stream_batch_renorm(x, states["bn"], params["scale"], params["bias"])
      ...     return h @ params["head"], {"bn": bn}
      >>> params = {"scale": jnp.ones(3), "bias": jnp.zeros(3), "head": jnp.eye(3)}
      >>> adapter = adapter_from_forward(
      ...     forward, params, {"bn": bnjax.stream_renorm_state(3)}, objective="entropy",
      ...     optimizer=optax.sgd(0.1), trainable={"scale": True, "bias": True, "head": False})
      >>> state = adapter.init()
      >>> x = jax.random.normal(jax.random.key(0), (8, 3))
      >>> logits, state = jax.jit(adapter.step)(state, x)
      >>> logits.shape, int(state.step), bool((state.params["head"] == jnp.eye(3)).all())
      ((8, 3), 1, True)
    """
    steps, optimizer = check_options(objective, optimizer, steps, class_momentum, num_classes)
    episodic = checks.check_option_flag(episodic, "episodic")
    if trainable is None:
        trainable = jax.tree.map(lambda _: True, params)
    labels = jax.tree.map(lambda t: "adapt" if t else "frozen", trainable)
    if optimizer is not None:
        optimizer = optax.multi_transform(
            {"adapt": optimizer, "frozen": optax.set_to_zero()}, labels
        )
    source = (params, norm_states)

    def init() -> AdaptationState:
        source_params, source_states = source
        size = 1 if num_classes is None else int(num_classes)
        return AdaptationState(
            params=source_params,
            norm_states=source_states,
            opt_state=None if optimizer is None else optimizer.init(source_params),
            class_prior=jnp.full((size,), 1.0 / size, jnp.float32),
            step=jnp.int32(0),
            skipped=jnp.int32(0),
        )

    def reset(state: AdaptationState) -> AdaptationState:
        del state
        return init()

    def step(state: AdaptationState, batch):
        if episodic:
            state = reset(state)._replace(step=state.step, skipped=state.skipped)
        if optimizer is None:
            logits, new_norm_states = forward(state.params, state.norm_states, batch)
            return logits, state._replace(norm_states=new_norm_states, step=state.step + 1)
        balanced = objective == "balanced_entropy"
        params, opt_state, norm_states = state.params, state.opt_state, state.norm_states
        skipped = state.skipped
        for _ in range(steps):

            def loss_fn(p, norm_states=norm_states):
                logits, new_states = forward(p, norm_states, batch)
                return _loss(objective, logits, state.class_prior), (logits, new_states)

            (loss, (logits, norm_states)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            updates, new_opt_state = optimizer.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            # A non-finite loss or update (a NaN input, an overflow) is not applied, so one
            # bad batch cannot leave the adapted parameters NaN for the rest of the stream.
            finite = _all_finite((loss, updates))
            params, opt_state = jax.tree.map(
                lambda new, old, finite=finite: jnp.where(finite, new, old),
                (new_params, new_opt_state),
                (params, opt_state),
            )
            skipped = skipped + jnp.where(finite, 0, 1).astype(jnp.int32)
        prior = state.class_prior
        if balanced:
            if logits.shape[-1] != prior.shape[0]:
                raise ValueError(
                    f"`num_classes`={prior.shape[0]} but the logits have {logits.shape[-1]} "
                    f"classes (shape {logits.shape}); pass num_classes={logits.shape[-1]}."
                )
            p = lax.stop_gradient(jax.nn.softmax(logits.astype(jnp.float32), axis=-1))
            new_prior = class_momentum * prior + (1 - class_momentum) * jnp.mean(p, axis=0)
            prior = jnp.where(_all_finite(new_prior), new_prior, prior)
        return logits, AdaptationState(
            params=params,
            norm_states=norm_states,
            opt_state=opt_state,
            class_prior=prior,
            step=state.step + 1,
            skipped=skipped,
        )

    return Adapter(init=init, step=step, reset=reset, method=method)


def resolve_method(method: str, objective: str | None) -> Method:
    """The `Method` of a registry name, with its objective overridden when given."""
    if method not in METHODS:
        raise ValueError(f"`method`={method!r} is not one of {tuple(METHODS)}.")
    chosen = METHODS[method]
    if objective is not None:
        if objective not in OBJECTIVES:
            raise ValueError(f"`objective` must be one of {OBJECTIVES}, got {objective!r}.")
        chosen = chosen._replace(objective=objective)
    return chosen


def method_options(options: Mapping[str, Any] | None) -> dict:
    """The statistics options of the front ends, checked: momentum, init, prior_count."""
    options = dict(options or {})
    unknown = set(options) - {"momentum", "init", "prior_count"}
    if unknown:
        raise ValueError(
            f"Unknown statistics options {sorted(unknown)}: the options are 'momentum' (TBR's "
            f"decay, default 0.95), 'init' ('source' or 'first_batch', TBR's starting point) "
            f"and 'prior_count' (AdaBN's source pseudo-count, default 0)."
        )
    options.setdefault("momentum", 0.95)
    options.setdefault("init", "source")
    options.setdefault("prior_count", 0.0)
    checks.check_momentum(options["momentum"], "momentum", allow_none=False)
    if options["init"] not in ("source", "first_batch"):
        raise ValueError(f"`init` must be 'source' or 'first_batch', got {options['init']!r}.")
    checks.check_in_range(options["prior_count"], "prior_count", 0.0)
    return options
