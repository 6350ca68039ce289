"""The two program formats of an artifact: write a function, load it back as a callable.

- ``stablehlo``: ``jax.export`` of the jitted function for inputs ``(b, ...)`` with a symbolic
  batch dimension ``b``, lowered for CPU, CUDA and TPU (`PLATFORMS`) and serialized; it loads
  with ``jax.export.deserialize`` alone, without the model's code.
- ``onnx``: the same function converted by ``jax2onnx`` (the optional extra
  ``pip install 'bnjax[export]'``) with a dynamic batch dimension, run by ``onnxruntime``.

Each format has ``write(fn, shape, dtype, directory) -> file name`` and ``load(path) ->
callable`` taking and returning numpy arrays.

Example:
  >>> import tempfile
  >>> directory = tempfile.mkdtemp()
  >>> name = FORMATS["stablehlo"].write(lambda x: 2 * x, (4, 3), np.float32, directory)
  >>> run = FORMATS["stablehlo"].load(os.path.join(directory, name))
  >>> run(np.ones((2, 3), np.float32)).tolist()          # any batch size
  [[2.0, 2.0, 2.0], [2.0, 2.0, 2.0]]
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.extend
import numpy as np

PLATFORMS = ("cpu", "cuda", "tpu")
"""The platforms a StableHLO artifact is lowered for (one serialized program serves all)."""


class Format(NamedTuple):
    """A program format: `write` a function to a file, `load` it back; the `packages` used."""

    write: Callable[..., str]
    load: Callable[[str], Callable[[np.ndarray], np.ndarray]]
    packages: tuple[str, ...]  # recorded in the manifest's versions


def _batch_polymorphic(shape, dtype) -> jax.ShapeDtypeStruct:
    dims = ", ".join(["b", *(str(int(d)) for d in shape[1:])])
    return jax.ShapeDtypeStruct(jax.export.symbolic_shape(dims), dtype)


def _write_stablehlo(fn, shape, dtype, directory: str) -> str:
    exported = jax.export.export(jax.jit(fn), platforms=PLATFORMS)(_batch_polymorphic(shape, dtype))
    name = "model.stablehlo"
    with open(os.path.join(directory, name), "wb") as handle:
        handle.write(exported.serialize())
    return name


def _load_stablehlo(path: str):
    with open(path, "rb") as handle:
        exported = jax.export.deserialize(bytearray(handle.read()))
    call = jax.jit(exported.call)
    return lambda x: np.asarray(call(x))


def onnx_tools():
    """(jax2onnx, onnxruntime), or ImportError saying how to install them."""
    # jax2onnx logs a warning for each optional plugin whose package is missing or too old.
    logging.getLogger("jax2onnx").setLevel(logging.ERROR)
    try:
        return importlib.import_module("jax2onnx"), importlib.import_module("onnxruntime")
    except ImportError as error:
        raise ImportError(
            f"format 'onnx' needs jax2onnx and onnxruntime ({error}); install them with "
            f"pip install 'bnjax[export]', or use format='stablehlo'."
        ) from None


def _write_onnx(fn, shape, dtype, directory: str) -> str:
    jax2onnx, _ = onnx_tools()
    spec = _batch_polymorphic(shape, dtype)
    # jax2onnx converts flax modules it recognises by its own rules, which read the module's
    # parameters and ignore what the fold does around the call (the added bias, the identity
    # norms). Converting the traced program instead (a replay of its jaxpr) keeps the
    # computation exactly the one that was traced and verified.
    program = jax.make_jaxpr(fn)(spec)
    replay = jax.extend.core.jaxpr_as_fun(program)
    model = jax2onnx.to_onnx(lambda x: replay(x)[0], [spec], model_name="bnjax_serving")
    name = "model.onnx"
    with open(os.path.join(directory, name), "wb") as handle:
        handle.write(model.SerializeToString())
    return name


def _load_onnx(path: str):
    _, onnxruntime = onnx_tools()
    options = onnxruntime.SessionOptions()
    # Errors only: jax2onnx's intermediate shape annotations draw harmless merge warnings.
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: np.asarray(session.run(None, {name: np.asarray(x)})[0])


FORMATS = {
    "stablehlo": Format(_write_stablehlo, _load_stablehlo, ()),
    "onnx": Format(_write_onnx, _load_onnx, ("jax2onnx", "onnx", "onnxruntime")),
}
"""The artifact formats by name."""
