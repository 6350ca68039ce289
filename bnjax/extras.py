"""Which pip extra brings which optional package, and one clear error when it is missing.

The library needs only its declared dependencies (jax, flax, numpy, optax, orbax-checkpoint,
rich). The applications and a few library features need more, each from an extra of
pyproject.toml:

    extra    what needs it                                   packages
    train    bnjax.train, scripts/train.py, the CLIs          absl-py, ml-collections,
                                                              tensorboard, scikit-learn
    study    bnjax.study, scripts/batch_study.py              the train extra, scipy,
                                                              matplotlib, scikit-learn
    data     TFDS data sets, the grain pipeline               tensorflow-datasets, grain
    export   ONNX serving artifacts                           jax2onnx, onnxruntime

`require` is called where such a package is first needed, so that a user without it reads
which command installs it instead of a bare ``No module named 'ml_collections'``.
"""

from __future__ import annotations

import importlib.util

# extra -> the import names it provides (what `require` checks).
EXTRAS = {
    "train": ("absl", "ml_collections", "tensorboard", "sklearn"),
    "study": ("absl", "ml_collections", "tensorboard", "sklearn", "scipy", "matplotlib"),
    "data": ("tensorflow_datasets", "grain"),
    "export": ("jax2onnx", "onnxruntime"),
}


def missing(extra: str) -> list[str]:
    """The import names of `extra`'s packages that are not installed.

    Example:
      >>> missing("train")  # with `pip install 'bnjax[train]'`: nothing missing
      []
    """
    if extra not in EXTRAS:
        raise ValueError(f"extra={extra!r}: not an extra of bnjax; the extras are {list(EXTRAS)}.")
    return [name for name in EXTRAS[extra] if importlib.util.find_spec(name) is None]


def require(extra: str, what: str) -> None:
    """Raises ModuleNotFoundError naming `extra`'s install command when one of its packages
    is missing; `what` says who needs it (e.g. "bnjax.train").

    Example:
      >>> require("train", "bnjax.train")  # nothing happens when the extra is installed
    """
    absent = missing(extra)
    if absent:
        raise ModuleNotFoundError(
            f"{what} needs the optional dependencies of bnjax[{extra}] (missing: "
            f"{', '.join(absent)}): pip install 'bnjax[{extra}]' (or, from a checkout, "
            f"pip install -e '.[{extra}]').",
            name=absent[0],
        )
