"""Starting real processes on 127.0.0.1 as the hosts of one multi-process JAX run.

Each process gets its own CPU devices (``XLA_FLAGS``), the coordinator's address, the number
of processes and its index in the environment (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
JAX_PROCESS_ID), exactly as a user launches one process per host. Every wait has a deadline:
a hung collective fails the test instead of blocking CI.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def skip_if_disabled() -> None:
    if os.environ.get("BNJAX_SKIP_MULTIHOST"):
        pytest.skip("BNJAX_SKIP_MULTIHOST is set")


def free_loopback_port() -> int:
    """A port on 127.0.0.1 that was free a moment ago (skips the test when none can be bound)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.bind(("127.0.0.1", 0))
            return probe.getsockname()[1]
    except OSError as error:
        pytest.skip(f"cannot bind a port on 127.0.0.1 ({error})")


def environment(num_processes: int, local_devices: int, port: int | None = None) -> dict:
    """The environment of every process: CPU only, `local_devices` devices each, the
    coordinator on 127.0.0.1 (without JAX_PROCESS_ID, which `start` adds per process)."""
    # gRPC would send the coordinator's traffic to a proxy.
    env = {key: value for key, value in os.environ.items() if "proxy" not in key.lower()}
    env.pop("JAX_PROCESS_ID", None)
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={local_devices}",
        PYTHONPATH=os.pathsep.join(filter(None, (str(ROOT), env.get("PYTHONPATH")))),
    )
    if num_processes > 1:
        port = free_loopback_port() if port is None else port
        env.update(
            JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES=str(num_processes)
        )
    else:
        for variable in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES"):
            env.pop(variable, None)
    return env


def start(
    command: Sequence[str],
    log_dir: Path,
    *,
    num_processes: int = 2,
    local_devices: int = 2,
    name: str = "process",
    flags: bool = False,
) -> list[subprocess.Popen]:
    """Starts `command` once per process; process i writes stdout and stderr to
    ``log_dir/{name}{i}.log``. With `flags`, the distributed set-up goes to the command as
    --coordinator_address, --num_processes and --process_id (`parallel.define_distributed_flags`)
    instead of the environment."""
    env = environment(num_processes, local_devices)
    launches = []
    for process_id in range(num_processes):
        process_env, arguments = dict(env, JAX_PROCESS_ID=str(process_id)), list(command)
        if flags and num_processes > 1:
            arguments += [
                f"--coordinator_address={process_env.pop('JAX_COORDINATOR_ADDRESS')}",
                f"--num_processes={process_env.pop('JAX_NUM_PROCESSES')}",
                f"--process_id={process_env.pop('JAX_PROCESS_ID')}",
            ]
        launches.append((arguments, process_env))
    return start_each(launches, log_dir, name=name)


def start_each(launches, log_dir: Path, *, name: str = "process") -> list[subprocess.Popen]:
    """Starts one process per (arguments, environment) of `launches`, process i logging to
    ``log_dir/{name}{i}.log`` (for launchers that `start` does not imitate)."""
    processes = []
    try:
        for process_id, (arguments, env) in enumerate(launches):
            with open(log_path(log_dir, name, process_id), "w") as log:
                processes.append(
                    subprocess.Popen(
                        list(arguments), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
                    )
                )
    except BaseException:
        stop(processes)
        raise
    return processes


def log_path(log_dir: Path, name: str, process_id: int) -> Path:
    return Path(log_dir) / f"{name}{process_id}.log"


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGKILLs the processes still running and reaps them all."""
    for process in processes:
        if process.poll() is None:
            process.kill()
    for process in processes:
        process.wait(timeout=30)


def wait(processes: Sequence[subprocess.Popen], timeout: float) -> None:
    """Waits for every process to end within `timeout` seconds in all; kills them all and
    fails the test otherwise."""
    deadline = time.monotonic() + timeout
    try:
        for process in processes:
            process.wait(timeout=max(deadline - time.monotonic(), 0.1))
    except subprocess.TimeoutExpired:
        pytest.fail(f"the processes did not finish within {timeout} s")
    finally:
        stop(processes)


def run(
    command: Sequence[str],
    log_dir: Path,
    *,
    timeout: float,
    num_processes: int = 2,
    local_devices: int = 2,
    name: str = "process",
    flags: bool = False,
) -> None:
    """Runs `command` as `num_processes` processes to the end (see `start`); fails the test,
    showing each failed process's log tail, unless all exit 0 within `timeout` seconds."""
    processes = start(
        command,
        log_dir,
        num_processes=num_processes,
        local_devices=local_devices,
        name=name,
        flags=flags,
    )
    wait(processes, timeout)
    check_exits(processes, log_dir, name)


def check_exits(processes: Sequence[subprocess.Popen], log_dir: Path, name: str) -> None:
    failed = [
        f"{name} {process_id} exited {process.returncode}:\n"
        + log_path(log_dir, name, process_id).read_text()[-3000:]
        for process_id, process in enumerate(processes)
        if process.returncode != 0
    ]
    assert not failed, "\n".join(failed)
