"""One process of the multi-host test: `python tests/multihost_worker.py OUT_DIR STEPS`.

tests/test_parallel.py starts two of these on 127.0.0.1, each with 2 CPU devices, and passes
JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID in the environment, exactly as a
user launches one process per host. Each process loads only its own rows of every global batch
and trains the shared model for STEPS steps under jit (GSPMD), shard_map and pmap over the
4-device global mesh; every process writes the final states it sees to
OUT_DIR/process{id}.npz, keys "{mode}{path}".
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np
import parallel_model as model  # tests/ is this script's directory, so it is on sys.path

from bnjax import parallel


def main(out_dir: Path, num_steps: int) -> None:
    assert parallel.initialize_distributed(initialization_timeout=30)
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = parallel.data_mesh()
    batch_size = 4 * jax.device_count()
    rows = parallel.local_rows(mesh, batch_size)
    local_batches = [  # what this host's data loader reads: its rows only
        {key: value[rows] for key, value in batch.items()}
        for batch in model.batches(num_steps, batch_size)
    ]
    step = model.make_step()
    results = {}
    for mode, run, place in (
        ("jit", parallel.jit_sharded_step(step, mesh), parallel.local_batch_to_global),
        ("shard_map", parallel.shard_map_step(step, mesh), parallel.local_batch_to_global),
        ("pmap", parallel.pmap_step(step), None),
    ):
        state = (
            model.init_state() if place is None else parallel.replicate(model.init_state(), mesh)
        )
        for batch in local_batches:
            state, metrics = run(state, batch if place is None else place(batch, mesh))
        state = parallel.to_host(state)
        results.update({mode + key: value for key, value in model.flatten(state).items()})
        results[mode + "/loss"] = np.asarray(parallel.to_host(metrics)["loss"])
    np.savez(out_dir / f"process{jax.process_index()}.npz", **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
