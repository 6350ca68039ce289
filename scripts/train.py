"""Train a model with bnjax normalization: ``python scripts/train.py --config=configs/X.py
--workdir=DIR``. The loop lives in `bnjax.train.loop`; this file only parses flags.

Re-running the same command resumes from the newest checkpoint in `--workdir`. Many hosts:
run the same command on each with the coordinator flags (see README, "Parallel modes").
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from bnjax import parallel
from bnjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (configs/)")
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and metrics go")
parallel.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    parallel.initialize_distributed()
    try:
        final = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ValueError, loop.NonFiniteLossError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    print(
        "final: "
        + " ".join(f"{k}={v:.4f}" for k, v in final.items() if not k.startswith("bn/"))
        + f"\nwrote {_WORKDIR.value}/metrics.jsonl, TensorBoard events and checkpoints/"
    )


if __name__ == "__main__":
    app.run(main)
