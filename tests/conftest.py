"""Test set-up: 8 virtual CPU devices for the multi-device tests.

XLA reads the device count once, when jax initialises its CPU backend, so the flag is set here,
before any test module imports jax.
"""

import os

_flag = "--xla_force_host_platform_device_count=8"
if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
