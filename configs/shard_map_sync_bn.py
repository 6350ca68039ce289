"""The default run with explicit per-device programs: `jax.shard_map` over all devices, batch
norm synchronised with `axis_name` (same numbers as the default jit mode, tested). On one CPU
device it runs as is; fake 8 devices with XLA_FLAGS to see the sync:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python scripts/train.py \\
        --config=configs/shard_map_sync_bn.py --workdir=workdir/shard_map
"""

from bnjax.train.defaults import base_config


def get_config():
    config = base_config()
    config.parallel = "shard_map"
    return config
