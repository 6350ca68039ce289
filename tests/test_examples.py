"""The documentation's code stays true: docstring examples, README snippets, docstring coverage.

README blocks preceded by ``<!-- tested: NAME -->`` are extracted and run (each in a fresh
namespace), so they cannot drift from the code; a few older snippets are copied below.
"""

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bnjax

# Every module whose docstrings carry examples (checked below); one runner, so each
# example runs once.
MODULES = [
    "bnjax",
    "bnjax.core.batch_norm",
    "bnjax.core.batch_renorm",
    "bnjax.core.group_norm",
    "bnjax.core.stats",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.parallel",
    "bnjax.models",
    "bnjax.models.mlp",
    "bnjax.models.cnn",
    "bnjax.models.resnet",
    "bnjax.models.norms",
    "bnjax.diagnostics",
    "bnjax.progress",
    "bnjax.lifecycle._backends",
    "bnjax.lifecycle.folding",
    "bnjax.lifecycle.freezing",
    "bnjax.lifecycle.layers",
    "bnjax.lifecycle.population",
    "bnjax.lifecycle.recalibration",
    "bnjax.lifecycle.validation",
    "bnjax.data",
    "bnjax.data.composition",
    "bnjax.data.dataset",
    "bnjax.data.digits",
    "bnjax.data.grain_pipeline",
    "bnjax.data.pipeline",
    "bnjax.data.samplers",
    "bnjax.data.sharding",
    "bnjax.data.synthetic",
    "bnjax.train.checkpoints",
    "bnjax.train.cli",
    "bnjax.train.loop",
    "bnjax.train.metrics",
    "bnjax.train.workdir",
    "bnjax.study.defaults",
    "bnjax.study.evaluation",
    "bnjax.study.experiment",
    "bnjax.study.grid",
    "bnjax.study.metrics",
    "bnjax.study.plots",
    "bnjax.study.report",
    "bnjax.study.runner",
    "bnjax.study.training",
]
NAMES = {"jax": jax, "jnp": jnp, "np": np, "nn": nn, "nnx": nnx, "bnjax": bnjax}


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name == "bnjax.data.grain_pipeline":
        pytest.importorskip("grain.python")
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs=NAMES, verbose=False)
    assert result.attempted > 0 and result.failed == 0


def test_readme_snippets_run():
    x = jax.random.normal(jax.random.key(0), (8, 4, 4, 64))
    scale, bias = jnp.ones(64), jnp.zeros(64)
    state = bnjax.batch_norm_state(64)
    y, state = bnjax.batch_norm(x, state, scale, bias, training=True)
    y, _ = bnjax.batch_norm(x, state, scale, bias, training=False)
    y = bnjax.group_norm(x, scale, bias, num_groups=32)
    state = bnjax.batch_renorm_state(64)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True)
    schedule = bnjax.RenormSchedule(warmup_steps=500, r_relax_steps=3_500, d_relax_steps=2_000)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True, schedule=schedule)
    y, state = bnjax.batch_renorm(x, state, scale, bias, training=True, r_max=3.0, d_max=5.0)
    y, _ = bnjax.batch_renorm(x, state, scale, bias, training=False)
    assert y.shape == x.shape and int(state.step) == 3
    # The README's PyTorch translation: BatchNorm2d(C, momentum=0.1) on NCHW.
    nchw = jnp.transpose(x, (0, 3, 1, 2))
    _, torch_like = bnjax.batch_norm(
        nchw,
        bnjax.batch_norm_state(64),
        training=True,
        momentum=0.9,
        axis=1,
        use_unbiased_running_var=True,
    )
    assert torch_like.var.shape == (64,)


def test_readme_models_snippet_runs():
    from bnjax import models

    images = jnp.ones((2, 8, 8, 3))
    model = models.resnet20(num_classes=10, norm="batch", zero_init_residual=True)

    def snippet():
        variables = model.init(jax.random.key(0), images, train=False)
        logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])
        return logits, updates

    # Traced only (shapes): running ResNet-20 op by op costs seconds; tests/models runs it.
    logits, updates = jax.eval_shape(snippet)
    assert logits.shape == (2, 10) and "batch_stats" in updates


# --------------------------------------------------------------------------- README blocks

README = Path(__file__).resolve().parents[1] / "README.md"
_MARKER = "<!-- tested: "
_TESTED_BLOCK = re.compile(r"<!-- tested: ([\w-]+) -->\n```python\n(.*?)\n```\n", re.S)


def _readme_blocks() -> dict[str, tuple[int, str]]:
    """{name: (line of the block's first code line, code)} of the marked README blocks."""
    text = README.read_text()
    blocks = {}
    for match in _TESTED_BLOCK.finditer(text):
        assert match.group(1) not in blocks, f"README: two blocks named {match.group(1)!r}"
        blocks[match.group(1)] = (text.count("\n", 0, match.start(2)) + 1, match.group(2))
    assert len(blocks) == text.count(_MARKER), "README: a marker not right before ```python"
    return blocks


# What each marked block must leave behind (or print), beyond running without an error.
def _tour_functional(ns, out):
    assert int(ns["bn_state"].count) == 5 and ns["h"].shape == (1, 8)


def _tour_linen(ns, out):
    assert set(ns["variables"]) == {"params", "batch_stats"}  # exactly flax's collections
    assert float(abs(ns["variables"]["batch_stats"]["BatchNorm_0"]["mean"]).sum()) > 0
    assert ns["y"].shape == (1, 1)


def _tour_nnx(ns, out):
    assert float(abs(ns["model"].bn.mean[...]).sum()) > 0 and ns["y"].shape == (1, 1)


def _batch_of_one(ns, out):
    assert "would compute each statistic from a single value" in out


def _arguments(ns, out):
    assert out.count("\n") >= 3 and "training must be True or False" in out
    assert ns["y"].shape == (2, 4, 4, 8)


def _nonfinite(ns, out):
    assert "the incoming running statistics `state.var` are not finite" in out


def _ran(ns, out):
    """The block's own asserts are the check."""


README_CHECKS = {
    "tour-functional": _tour_functional,
    "tour-linen": _tour_linen,
    "tour-nnx": _tour_nnx,
    "faq-eval-mode": _ran,
    "faq-batch-of-one": _batch_of_one,
    "faq-freeze": _ran,
    "faq-sync": _ran,
    "faq-momentum": _ran,
    "faq-nonfinite": _nonfinite,
    "faq-arguments": _arguments,
    "faq-recalibrate": _ran,
    "faq-validate": _ran,
    "faq-fold": _ran,
    "faq-half-precision": _ran,
}


def test_readme_marked_blocks_are_the_checked_ones():
    assert set(_readme_blocks()) == set(README_CHECKS)


@pytest.mark.parametrize("name", sorted(README_CHECKS))
def test_readme_block_runs(name, capsys):
    line, code = _readme_blocks()[name]
    # Leading newlines make tracebacks point at README.md's own line numbers.
    program = compile("\n" * (line - 1) + code, str(README), "exec")
    namespace = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(program, namespace)
    README_CHECKS[name](namespace, capsys.readouterr().out)


# --------------------------------------------------------------------------- docstring coverage

# The public API: each package's __all__ (a module without one, such as bnjax.parallel or the
# study's modules beyond bnjax.study's own __all__: its public functions and classes).
PUBLIC_PACKAGES = [
    "bnjax",
    "bnjax.linen",
    "bnjax.nnx",
    "bnjax.parallel",
    "bnjax.lifecycle",
    "bnjax.diagnostics",
    "bnjax.progress",
    "bnjax.models",
    "bnjax.data",
    "bnjax.train",
    "bnjax.study",  # metrics and evaluation
    "bnjax.study.defaults",
    "bnjax.study.experiment",
    "bnjax.study.grid",
    "bnjax.study.plots",
    "bnjax.study.report",
    "bnjax.study.runner",
    "bnjax.study.training",
]
# Public functions and classes whose docstring needs no example, and why. (Constants such as
# bnjax.models.NORMS or bnjax.lifecycle.layers.STATS have no __doc__ of their own: not checked.)
NO_EXAMPLE = {
    # Raised by bnjax, never called by users; Checkpointer's example shows UnsafeStateError.
    "bnjax.train.CheckpointMismatchError",
    "bnjax.train.CheckpointWarning",
    "bnjax.train.CorruptCheckpointError",
    "bnjax.train.UnsafeStateError",
}


def _public_api():
    """[(qualified name, object)] of the public functions and classes of PUBLIC_PACKAGES."""
    api = []
    for package in PUBLIC_PACKAGES:
        module = importlib.import_module(package)
        names = getattr(module, "__all__", None)
        if names is None:
            names = [
                name
                for name, value in vars(module).items()
                if not name.startswith("_") and getattr(value, "__module__", None) == package
            ]
        for name in names:
            value = getattr(module, name)
            if inspect.isfunction(value) or inspect.isclass(value):
                api.append((f"{package}.{name}", value))
    return api


def _own_docstring(obj) -> str:
    """The docstring written for `obj` (not inherited, not a dataclass/NamedTuple signature)."""
    doc = (obj.__dict__.get("__doc__") if inspect.isclass(obj) else obj.__doc__) or ""
    return "" if doc.startswith(f"{obj.__name__}(") else doc


def _all_modules():
    modules = [bnjax]
    for info in pkgutil.walk_packages(bnjax.__path__, "bnjax."):
        modules.append(importlib.import_module(info.name))
    return modules


def test_public_api_has_docstrings_with_examples():
    api = _public_api()
    assert len(api) > 80  # the discovery works (not an empty loop)
    undocumented = [name for name, obj in api if not _own_docstring(obj).strip()]
    no_example = [
        name for name, obj in api if name not in NO_EXAMPLE and ">>>" not in _own_docstring(obj)
    ]
    assert not undocumented, f"public names without a docstring: {undocumented}"
    assert not no_example, f"public names without a docstring example: {no_example}"
    assert NO_EXAMPLE <= {name for name, _ in api}, "a stale NO_EXAMPLE entry"


def test_every_module_and_public_function_has_a_docstring():
    missing = []
    for module in _all_modules():
        if not (module.__doc__ or "").strip():
            missing.append(module.__name__)
        if any(part.startswith("_") for part in module.__name__.split(".")[1:]):
            continue  # a private module (_layers, __main__, ...): its helpers are internal
        for name, value in vars(module).items():
            if (
                not name.startswith("_")
                and (inspect.isfunction(value) or inspect.isclass(value))
                and value.__module__ == module.__name__
                and not _own_docstring(value).strip()
            ):
                missing.append(f"{module.__name__}.{name}")
    assert not missing, f"no docstring: {missing}"


def test_every_module_with_examples_is_in_the_doctest_runner():
    finder = doctest.DocTestFinder()
    with_examples = {
        module.__name__
        for module in _all_modules()
        if any(test.examples for test in finder.find(module))
    }
    assert with_examples - set(MODULES) == set(), "add these to MODULES so their examples run"
    assert set(MODULES) <= with_examples, "MODULES lists a module without examples"
