"""The scripts in examples/ run as a user runs them (a fresh process each) and print their point.

Each runs with JAX_PLATFORMS=cpu and without the 8-device XLA_FLAGS that tests/conftest.py
puts in this process's environment: the single-device examples run on one device, as for a
user, and examples/sync_bn_shard_map.py has to set up its 8 virtual devices itself.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NUMBER = r"([-+0-9.eE]+|nan)"


def run_example(name: str) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    flags = [
        flag
        for flag in env.get("XLA_FLAGS", "").split()
        if not flag.startswith("--xla_force_host_platform_device_count")
    ]
    env["XLA_FLAGS"] = " ".join(flags)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def value(pattern: str, text: str) -> float:
    match = re.search(pattern.replace("NUMBER", NUMBER), text)
    assert match, f"no line matching {pattern!r} in:\n{text}"
    return float(match.group(1))


def test_examples_are_all_tested():
    scripts = {path.name for path in (ROOT / "examples").glob("*.py")}
    assert scripts == {
        "flax_linen_swap.py",
        "functional_core.py",
        "fold_for_serving.py",
        "recalibrate.py",
        "sync_bn_shard_map.py",
    }


def test_flax_linen_swap():
    out = run_example("flax_linen_swap.py")
    assert value(r"max \|diff\| batch_stats: NUMBER", out) < 1e-4
    assert value(r"max \|diff\| params: +NUMBER", out) < 1e-4
    assert value(r"max \|diff\| eval logits: NUMBER", out) < 1e-4
    assert "same variable tree True" in out
    assert value(r"flax checkpoint -> bnjax model: .* max \|diff\| logits NUMBER", out) < 1e-4


def test_functional_core():
    out = run_example("functional_core.py")
    assert value(r"accuracy NUMBER", out) > 0.9
    assert value(r"PyTorch 0.1 rule, max relative diff of running mean NUMBER", out) < 1e-6
    assert "running mean unchanged: True, skipped=1, count=60" in out


def test_fold_for_serving():
    out = run_example("fold_for_serving.py")
    assert value(r"max \|logits difference\| folded vs original: NUMBER", out) < 1e-4
    original = value(r"test accuracy original \(eval mode\): NUMBER", out)
    assert value(r"test accuracy folded: NUMBER", out) == pytest.approx(original, abs=1e-3)
    assert value(r"stored values: original \d+ .*, folded NUMBER", out) < value(
        r"stored values: original NUMBER", out
    )
    assert "latency on" in out


def test_recalibrate():
    out = run_example("recalibrate.py")
    before = value(r"before recalibration: +running stats \(eval\) NUMBER", out)
    after = value(r"after recalibrate \(50x64\): +running stats \(eval\) NUMBER", out)
    batch = value(r"after recalibrate .* uniform batch stats NUMBER", out)
    assert 0.0 <= before <= 1.0 and 0.0 <= after <= 1.0
    # Population statistics make evaluation behave like normalizing with i.i.d. batches.
    assert abs(after - batch) < 0.05
    assert "norm1 running mean moved by up to" in out


def test_sync_bn_shard_map():
    out = run_example("sync_bn_shard_map.py")
    assert out.startswith("8 devices, mesh {'batch': 8}")
    assert value(r"BN running mean: max \|diff\| NUMBER", out) < 1e-4
    assert value(r"BN running var: +max \|diff\| NUMBER", out) < 1e-4
    assert value(r"parameters: +max \|diff\| NUMBER", out) < 1e-5
    assert "count 5 = 5" in out
