"""One small finished run, shared by the tests that stop, damage or re-run a copy of it."""

import pytest

from bnjax.train import loop, read_metrics
from tests.train.helpers import final_state, tiny_config

# A run of seconds: 8 steps, a record every 2 with the evaluation every 4, a checkpoint every 2.
SMALL_RUN = dict(
    model="mlp",
    model_features=(8, 16),
    batch_size=32,
    eval_batch_size=200,
    num_steps=8,
    warmup_steps=1,
    log_every=2,
    eval_every=4,
    checkpoint_every=2,
    num_devices=1,
    progress=False,
)


@pytest.fixture(scope="session")
def small_run(tmp_path_factory):
    """The uninterrupted `SMALL_RUN`: (workdir, its metric records, its final (step, state))."""
    workdir = tmp_path_factory.mktemp("small_run")
    loop.train_and_evaluate(tiny_config(**SMALL_RUN), str(workdir))
    records = read_metrics(str(workdir))
    assert [record["step"] for record in records] == [2, 4, 6, 8]
    return workdir, records, final_state(workdir)
