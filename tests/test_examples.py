"""The documentation's code stays true: docstring examples, doc code blocks, docstring coverage.

Every ```python block of README.md and docs/**/*.md is either preceded by
``<!-- tested: NAME -->`` (then extracted and run, each in a fresh namespace, so it cannot drift
from the code) or by ``<!-- not-run: REASON -->`` saying why not and what covers it instead;
an unmarked block fails `test_every_python_block_is_tested_or_says_why_not`. Shell blocks are
checked in tests/test_docs_site.py.
"""

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path
from typing import NamedTuple

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
    "bnjax.extras",
    "bnjax.core.batch_norm",
    "bnjax.core.batch_renorm",
    "bnjax.core.domain_batch_norm",
    "bnjax.core.evonorm",
    "bnjax.core.stream_norm",
    "bnjax.core.filter_response_norm",
    "bnjax.core.cross_iteration_batch_norm",
    "bnjax.core.channels_last_conv",
    "bnjax.core.group_norm",
    "bnjax.core.moving_average_batch_norm",
    "bnjax.core.moving_average_state",
    "bnjax.core.stats",
    "bnjax.core.weight_standardization",
    "bnjax.linen.batch_norm",
    "bnjax.linen.per_example",
    "bnjax.linen.moving_average",
    "bnjax.linen.domain",
    "bnjax.linen.norm_activation",
    "bnjax.linen.cross_iteration",
    "bnjax.linen.standardized_conv",
    "bnjax.nnx.batch_norm",
    "bnjax.nnx.per_example",
    "bnjax.nnx.moving_average",
    "bnjax.nnx.domain",
    "bnjax.nnx.norm_activation",
    "bnjax.nnx.cross_iteration",
    "bnjax.nnx.standardized_conv",
    "bnjax.parallel.distributed",
    "bnjax.parallel.meshes",
    "bnjax.parallel.placement",
    "bnjax.parallel.gradients",
    "bnjax.parallel.steps",
    "bnjax.models",
    "bnjax.models.mlp",
    "bnjax.models.cnn",
    "bnjax.models.resnet",
    "bnjax.models.norms",
    "bnjax.models.convs",
    "bnjax.diagnostics",
    "bnjax.progress",
    "bnjax.checkpoints.checkpointer",
    "bnjax.checkpoints.orbax_noise",
    "bnjax.lifecycle._backends",
    "bnjax.lifecycle.averaging",
    "bnjax.lifecycle.checkpoint_reading",
    "bnjax.lifecycle.domains",
    "bnjax.lifecycle.folded_model",
    "bnjax.lifecycle.folding",
    "bnjax.lifecycle.freezing",
    "bnjax.lifecycle.layers",
    "bnjax.lifecycle.pairing",
    "bnjax.lifecycle.population",
    "bnjax.lifecycle.recalibration",
    "bnjax.lifecycle.adaptation",
    "bnjax.lifecycle.adaptation_models",
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
    "bnjax.train.cli",
    "bnjax.train.loop",
    "bnjax.train.metrics",
    "bnjax.train.steps",
    "bnjax.train.workdir",
    "bnjax.export",
    "bnjax.export.artifact",
    "bnjax.export.exporting",
    "bnjax.export.formats",
    "bnjax.export.verify",
    "bnjax.train.trained_run",
    "bnjax.study.claims",
    "bnjax.study.defaults",
    "bnjax.study.evaluation",
    "bnjax.study.experiment",
    "bnjax.study.grid",
    "bnjax.study.metrics",
    "bnjax.study.plots",
    "bnjax.study.report",
    "bnjax.study.runner",
    "bnjax.study.significance",
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


# ------------------------------------------------------------------------- code blocks of the docs

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
# A fence at the start of a line, its language, its code, and the closing fence.
_FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
# What may stand on the last non-blank line before a ```python fence.
_TESTED = re.compile(r"<!-- tested: ([\w-]+) -->")
_NOT_RUN = re.compile(r"<!-- not-run: (\S.*\S) -->")


class Block(NamedTuple):
    path: Path
    line: int  # the line of the block's first code line, 1-based
    language: str
    code: str
    marker: str  # the line before the fence (stripped), "" at the start of the file


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        before = text[: match.start()].rstrip().rsplit("\n", 1)[-1].strip()
        line = text.count("\n", 0, match.start(2)) + 1
        blocks.append(Block(path, line, match.group(1), match.group(2), before))
    return blocks


def _all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in _blocks(path)]


def _where(block: Block) -> str:
    return f"{block.path.relative_to(ROOT)}:{block.line}"


def _tested_blocks() -> dict[str, Block]:
    """{name: block} of the python blocks marked ``<!-- tested: NAME -->``, in every file."""
    tested = {}
    for block in _all_blocks():
        match = _TESTED.fullmatch(block.marker)
        if match and block.language == "python":
            name = match.group(1)
            assert name not in tested, f"{_where(block)}: a second block named {name!r}"
            tested[name] = block
    return tested


def test_every_python_block_is_tested_or_says_why_not():
    problems = []
    for path in DOC_FILES:
        text = path.read_text()
        blocks = _blocks(path)
        python = [block for block in blocks if block.language == "python"]
        # A ```python fence that the pattern missed (indented, in a list) would escape the rule.
        if len(python) != len(re.findall(r"```python\b", text)):
            problems.append(f"{path.relative_to(ROOT)}: a ```python fence not at a line start")
        for block in python:
            if not (_TESTED.fullmatch(block.marker) or _NOT_RUN.fullmatch(block.marker)):
                problems.append(
                    f"{_where(block)}: unmarked python block (<!-- tested: NAME -->"
                    " or <!-- not-run: REASON -->)"
                )
        # A marker must stand right before a python block, or it guards nothing.
        marked_lines = {b.marker for b in python}
        for marker in re.findall(r"<!-- (?:tested|not-run): .*? -->", text):
            if marker not in marked_lines:
                problems.append(f"{path.relative_to(ROOT)}: {marker} is not right before ```python")
    assert not problems, "\n".join(problems)


def test_every_doc_file_is_scanned():
    names = {path.relative_to(ROOT).as_posix() for path in DOC_FILES}
    assert {"README.md", "docs/index.md", "docs/architecture.md"} <= names
    assert len(_tested_blocks()) >= 20


# What a tested block must leave behind (or print), beyond running without an error and its
# own asserts. Blocks not named here are checked by their asserts alone.
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


def _layer_typo(ns, out):
    assert "'norm9' matched no batch-norm layer" in out


BLOCK_CHECKS = {
    "tour-functional": _tour_functional,
    "tour-linen": _tour_linen,
    "tour-nnx": _tour_nnx,
    "trap-batch-of-one": _batch_of_one,
    "trap-arguments": _arguments,
    "trap-nonfinite": _nonfinite,
    "lifecycle-freeze-typo": _layer_typo,
}


def test_block_checks_name_tested_blocks():
    assert set(BLOCK_CHECKS) <= set(_tested_blocks()), "a stale BLOCK_CHECKS entry"


@pytest.mark.parametrize("name", sorted(_tested_blocks()))
def test_doc_block_runs(name, capsys):
    block = _tested_blocks()[name]
    # Leading newlines make tracebacks point at the Markdown file's own line numbers.
    program = compile("\n" * (block.line - 1) + block.code, str(block.path), "exec")
    namespace = {"__name__": f"doc_{name.replace('-', '_')}"}
    exec(program, namespace)
    check = BLOCK_CHECKS.get(name)
    if check is not None:
        check(namespace, capsys.readouterr().out)


# --------------------------------------------------------------------------- docstring coverage

# The public API: each package's __all__ (a module without one, such as the
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
    "bnjax.export",
    "bnjax.study",  # metrics and evaluation
    "bnjax.study.claims",
    "bnjax.study.defaults",
    "bnjax.study.experiment",
    "bnjax.study.grid",
    "bnjax.study.plots",
    "bnjax.study.report",
    "bnjax.study.runner",
    "bnjax.study.significance",
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
# The study's own modules are an application: their public names need a docstring, an example
# only where one teaches (a NamedTuple's field access does not); bnjax.study's metrics keep it.
APPLICATION_PACKAGES = {p for p in PUBLIC_PACKAGES if p.startswith("bnjax.study.")}


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
        name
        for name, obj in api
        if name not in NO_EXAMPLE
        and name.rsplit(".", 1)[0] not in APPLICATION_PACKAGES
        and ">>>" not in _own_docstring(obj)
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
