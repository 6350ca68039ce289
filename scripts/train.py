"""Train a model with bnjax normalization: ``python scripts/train.py --config=configs/X.py
--workdir=DIR``. The loop lives in `bnjax.train.loop`; this file only parses flags.

Re-running the same command resumes from the newest checkpoint in `--workdir`. Many hosts:
run the same command on each with the coordinator flags (see README, "Parallel modes").
``--help`` lists every config key; exit codes are in `bnjax.train.cli` (0 done, 1 the run
failed, 2 it could not start).
"""

from absl import app, flags, logging
from ml_collections import config_flags

from bnjax import parallel
from bnjax.train import cli, loop

_CONFIG = config_flags.DEFINE_config_file("config", None, cli.config_help())
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints, metrics and config.json go")
_ALLOW_CONFIG_CHANGE = flags.DEFINE_bool(
    "allow_config_change", False, "resume even if the config changes what is trained"
)
parallel.define_distributed_flags()
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
    del argv  # cli.parse_flags refused any argument that is not a flag
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO

    def train():
        # Many hosts: the flags, else JAX_COORDINATOR_ADDRESS etc.; one host: a no-op.
        parallel.initialize_distributed(
            flags.FLAGS.coordinator_address,
            flags.FLAGS.num_processes,
            flags.FLAGS.process_id,
            auto_detect=flags.FLAGS.distributed_auto_detect,
        )
        return loop.train_and_evaluate(
            _CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW_CONFIG_CHANGE.value
        )

    final = cli.run(train)
    print(
        "final: "
        + " ".join(f"{k}={v:.4f}" for k, v in final.items() if not k.startswith("bn/"))
        + f"\nwrote {_WORKDIR.value}/metrics.jsonl, TensorBoard events and checkpoints/"
    )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
