"""Test set-up: 8 virtual CPU devices for the multi-device tests; one compilation cache.

XLA reads the device count once, when jax initialises its CPU backend, so the flag is set here,
before any test module imports jax.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()

# One persistent compilation cache for the whole run: the xdist workers and the subprocesses
# the CLI, kill and multi-process tests start (they inherit the environment) compile the same
# train and evaluation steps again and again; with the cache each program compiles once. The
# key covers the program, the jax/XLA versions and the flags, so a cached program is the one
# a compile would make (kill/resume tests still compare bit for bit). Measured on
# tests/train/test_hardening.py + tests/export/test_cli.py: 12% less CPU time.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["JAX_COMPILATION_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"bnjax-tests-jax-cache-{os.getuid()}"
    )
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
