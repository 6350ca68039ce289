"""Many hosts: JAX's multi-process runtime started from arguments, flags or the environment.

One process per host; every process runs the same script. `initialize_distributed` is a no-op
when nothing says there are several processes, so one script serves one host and many.
`define_distributed_flags` gives a command line the same settings as absl flags; it is the
only part of `bnjax.parallel` that needs absl, imported when it is called.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax


def define_distributed_flags(flag_values=None) -> None:
    """Defines absl flags --coordinator_address, --num_processes, --process_id (unset: the
    environment) and --distributed_auto_detect (let JAX find what is unset: Cloud TPU pod
    slices, Slurm, Open MPI); pass their values to `initialize_distributed`.

    Needs absl-py, a dependency of the training application (`bnjax[train]`), not of the
    library: it is imported here, when the flags are defined, so `import bnjax.parallel`
    works without it.

    Example:
      >>> from absl import flags
      >>> flag_values = flags.FlagValues()
      >>> define_distributed_flags(flag_values)
      >>> _ = flag_values(["train.py", "--num_processes=4", "--process_id=1"])
      >>> flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
      (None, 4, 1)
    """
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    for define, name, help_text in (
        (flags.DEFINE_string, "coordinator_address", "host:port of process 0 (many hosts)."),
        (flags.DEFINE_integer, "num_processes", "Number of processes (one per host)."),
        (flags.DEFINE_integer, "process_id", "This process's index, 0..num_processes-1."),
    ):
        define(name, None, help_text, flag_values=flag_values)
    flags.DEFINE_bool(
        "distributed_auto_detect",
        False,
        "Let JAX detect the coordinator, process count and index (Cloud TPU pod slices, Slurm, "
        "Open MPI) where --coordinator_address etc. are not given.",
        flag_values=flag_values,
    )


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: Sequence[int] | None = None,
    auto_detect: bool = False,
    cpu_collectives: str | None = "gloo",
    initialization_timeout: int = 300,
) -> bool:
    """Starts JAX's multi-process runtime; call it first, before anything touches a device.

    Each argument left None is read from the environment: JAX_COORDINATOR_ADDRESS
    ("10.0.0.1:1234", process 0's host), JAX_NUM_PROCESSES, JAX_PROCESS_ID. Nothing to set
    (or one process) is a no-op, so one script serves one host and many. `auto_detect=True`
    lets JAX find missing values itself (Cloud TPU pods, Slurm, Open MPI).

    Args:
      cpu_collectives: cross-process collectives on CPU ("gloo"); ignored by GPU/TPU.

    Returns:
      True when this is now a multi-process run (jax.process_count() > 1 after it).

    Example:
      >>> initialize_distributed()                 # nothing set: one process, a no-op
      False
    """
    if jax.distributed.is_initialized():
        return True
    given = {
        "coordinator_address": coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS"),
        "num_processes": _int_setting(num_processes, "num_processes", "JAX_NUM_PROCESSES"),
        "process_id": _int_setting(process_id, "process_id", "JAX_PROCESS_ID"),
    }
    if given["num_processes"] == 1 or (not auto_detect and all(v is None for v in given.values())):
        return False
    missing = [name for name, value in given.items() if value is None]
    if missing and not auto_detect:
        raise ValueError(
            f"Many-host set-up needs {', '.join(missing)} too (arguments, flags or "
            f"JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID), or auto_detect=True."
        )
    if cpu_collectives:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        **given, local_device_ids=local_device_ids, initialization_timeout=initialization_timeout
    )
    return jax.process_count() > 1


def _int_setting(value, name: str, variable: str) -> int | None:
    text = os.environ.get(variable, "") if value is None else value
    try:
        return None if text == "" else int(text)
    except ValueError:
        raise ValueError(f"`{name}` (or ${variable}) must be an int, got {text!r}.") from None
