"""The averaged model of a training run (``config.ema_decay > 0``): in the state, the step and
the evaluation.

With ``config.ema_decay = d > 0`` the train state carries, under `AVERAGE`, an exponential
moving average of the parameters and batch statistics (`bnjax.lifecycle.ema`, starting at the
initial variables):

    state["ema"] = {"params": ..., "batch_stats": ..., "count": int32, "step": int32}

('batch_stats' absent for norms without running statistics), updated inside the jitted train
step after the optimizer's update, from the step's new parameters and statistics (which are
the same on every device in every parallel mode, so is the average). It is part of the state
the checkpointer writes and restores, so a resumed run continues the same average, bit for
bit. Evaluation also evaluates the averaged model (`averaged_eval_state`), its batch norms
holding either the averaged statistics (``config.ema_statistics='average'``, no data) or the
exact population statistics of the averaged weights (``'recalibrate'``:
`bnjax.lifecycle.recalibrate`, mode 'train', over the first ``config.ema_recalibration_batches``
training batches of epoch 0: a fixed set, so an evaluation stays a pure function of the state).
"""

from __future__ import annotations

from collections.abc import Iterable

from bnjax import lifecycle

AVERAGE = "ema"
"""The train state's key of the averaged model."""

EMA_STATISTICS = lifecycle.averaging.STATISTICS
"""The values of ``config.ema_statistics``."""


def _as_average(tree: dict) -> lifecycle.AveragedState:
    return lifecycle.AveragedState(
        params=tree["params"],
        batch_stats=tree.get("batch_stats"),
        count=tree["count"],
        step=tree["step"],
    )


def _as_tree(average: lifecycle.AveragedState) -> dict:
    """A plain dict (what the checkpointer writes): 'batch_stats' left out when None."""
    tree = {"params": average.params, "count": average.count, "step": average.step}
    if average.batch_stats is not None:
        tree["batch_stats"] = average.batch_stats
    return tree


def _variables(state) -> dict:
    variables = {"params": state["params"]}
    if "batch_stats" in state:
        variables["batch_stats"] = state["batch_stats"]
    return variables


def add_average(state: dict, decay: float) -> dict:
    """`state` with the averaged model started at its variables (nothing added for decay 0)."""
    if not decay:
        return state
    return {**state, AVERAGE: _as_tree(lifecycle.ema(decay).init(_variables(state)))}


def update_average(new_state: dict, decay: float) -> dict:
    """The step's new state with its average moved toward its new variables (jittable)."""
    if AVERAGE not in new_state:
        return new_state
    averager = lifecycle.ema(decay)
    average = averager.update(_as_average(new_state[AVERAGE]), _variables(new_state))
    return {**new_state, AVERAGE: _as_tree(average)}


def averaged_eval_state(
    model, state: dict, *, statistics: str = "average", batches: Iterable | None = None
) -> dict:
    """A state holding the averaged model's variables in place of the trained ones, for the
    evaluation step (``{"params": ..., "batch_stats": ...}``); `statistics` and `batches` as
    in `bnjax.lifecycle.averaged_variables` (mode 'train')."""
    average = _as_average(state[AVERAGE])
    if average.batch_stats is None:
        statistics = "average"  # no batch norms: nothing to recalibrate
    return lifecycle.averaged_variables(model, average, statistics=statistics, batches=batches)
