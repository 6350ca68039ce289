"""The docstring examples of bnjax.data run and are true."""

import doctest
import importlib

import numpy as np
import pytest

MODULES = [
    "bnjax.data",
    "bnjax.data.composition",
    "bnjax.data.dataset",
    "bnjax.data.digits",
    "bnjax.data.grain_pipeline",
    "bnjax.data.pipeline",
    "bnjax.data.samplers",
    "bnjax.data.sharding",
    "bnjax.data.synthetic",
    "bnjax.data.tfds_source",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    if name == "bnjax.data.grain_pipeline":
        pytest.importorskip("grain.python")
    module = importlib.import_module(name)
    result = doctest.testmod(module, extraglobs={"np": np}, verbose=False)
    assert result.failed == 0
