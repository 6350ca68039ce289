"""The batch-norm lifecycle: the tools for when BN goes wrong between training and serving.

- `recalibrate` (linen), `recalibrate_nnx`, `recalibrate_states` (the functional core): running
  statistics recomputed as exact population statistics over a data set (precise BN; AdaBN on
  target-domain data).
- `reset_statistics`, `freeze` / `frozen_statistics` / `unfreeze`, `freeze_optimizer`,
  `trainable_filter`: fresh statistics; fine-tuning with batch norm frozen.
- `fold`: evaluation-mode batch norm folded into the Conv/Dense before it, for serving, by the
  bundled models' layer names; `fold_model` folds any linen or nnx model, with the pairs
  `trace_pairs` reads from the traced computation (`bnjax.export` writes it for serving);
  `select_domain` turns one domain of a domain batch norm into a plain batch norm to fold.
- `adapter` (linen), `adapter_nnx`, `adapter_from_forward` (the functional core): test-time
  adaptation to a shifted test stream as pure step functions (`METHODS`: source, test-batch
  statistics, online AdaBN, TENT, DELTA's TBR and DOT); `adapt_statistics`: offline AdaBN
  with a source-to-target blend.
- `ema`, `swa`, `averaged_variables` (linen), `nnx_variables` / `averaged_nnx` (nnx): averaged
  models (EMA, Polyak, SWA) whose batch statistics are averaged alongside the weights or
  recalibrated for the averaged weights.
- `validate_statistics`, `load_checkpoint` and ``python -m bnjax.lifecycle validate DIR``:
  missing, non-finite, negative, never-updated or mis-shaped statistics; checkpoints of
  `bnjax.train.Checkpointer` read back through their checksums, whatever the path names.

`bnjax.lifecycle.layers` is the layer walk these tools share (which layers are batch norms in
linen variables, nnx models and core states; their paths; their input moments), public for
tools built on top of them. Per-layer telemetry (batch statistics, drift from the running
ones) is in `bnjax.diagnostics`.
"""

from bnjax.lifecycle.adaptation import (
    METHODS,
    AdaptationState,
    Adapter,
    adapter_from_forward,
    balanced_entropy_loss,
    entropy_loss,
)
from bnjax.lifecycle.adaptation_models import (
    adapt_statistics,
    adapter,
    adapter_nnx,
    blend_statistics,
)
from bnjax.lifecycle.averaging import (
    AveragedState,
    Averager,
    averaged_nnx,
    averaged_variables,
    ema,
    nnx_variables,
    swa,
)
from bnjax.lifecycle.checkpoint_reading import UnverifiedCheckpointWarning, load_checkpoint
from bnjax.lifecycle.domains import select_domain
from bnjax.lifecycle.folded_model import FoldedModel, fold_model
from bnjax.lifecycle.folding import (
    evaluation_affine,
    fold,
    fold_into,
    layer_epsilons,
    pair_by_name,
)
from bnjax.lifecycle.freezing import (
    bn_param_labels,
    freeze,
    freeze_optimizer,
    frozen_statistics,
    reset_statistics,
    trainable_filter,
    unfreeze,
)
from bnjax.lifecycle.pairing import FoldPlan, trace_pairs
from bnjax.lifecycle.population import (
    LayerInput,
    Total,
    accumulate,
    empty_totals,
    population_state,
)
from bnjax.lifecycle.recalibration import (
    layer_input_moments,
    recalibrate,
    recalibrate_nnx,
    recalibrate_states,
)
from bnjax.lifecycle.validation import LayerReport, ValidationReport, validate_statistics

__all__ = [
    "METHODS",
    "AdaptationState",
    "Adapter",
    "AveragedState",
    "Averager",
    "FoldPlan",
    "FoldedModel",
    "LayerInput",
    "LayerReport",
    "Total",
    "UnverifiedCheckpointWarning",
    "ValidationReport",
    "accumulate",
    "adapt_statistics",
    "adapter",
    "adapter_from_forward",
    "adapter_nnx",
    "averaged_nnx",
    "averaged_variables",
    "balanced_entropy_loss",
    "blend_statistics",
    "bn_param_labels",
    "ema",
    "empty_totals",
    "entropy_loss",
    "evaluation_affine",
    "fold",
    "fold_into",
    "fold_model",
    "freeze",
    "freeze_optimizer",
    "frozen_statistics",
    "layer_epsilons",
    "layer_input_moments",
    "load_checkpoint",
    "nnx_variables",
    "pair_by_name",
    "population_state",
    "recalibrate",
    "recalibrate_nnx",
    "recalibrate_states",
    "reset_statistics",
    "select_domain",
    "swa",
    "trace_pairs",
    "trainable_filter",
    "unfreeze",
    "validate_statistics",
]
