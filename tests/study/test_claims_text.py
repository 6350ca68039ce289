"""The README's and docs/study.md's sentences about the study's headline follow from the
committed results (docs/study/results.csv): every number is recomputed here, and each scope the
text states (where a comparison holds, where it reverses) is checked against the rows."""

import collections
import re
from pathlib import Path

import numpy as np
from scipy import stats

from bnjax.study import report

ROOT = Path(__file__).resolve().parents[2]
NAMES = {"batch": "batch norm", "group": "group norm", "none": "no normalization"}


def _text(path: Path) -> str:
    return " ".join(path.read_text().split())


def _readme_study_sentence() -> str:
    """Item 3 of the README's "Why bnjax" (the study's headline lives there)."""
    why = _text(ROOT / "README.md").split("## Why bnjax")[1].split("## ")[0]
    return why.split(" 3. ")[1]


def _accuracies():
    """{(dataset, family, condition, normalizer, bn_momentum, examples): {seed: accuracy}}."""
    cells = collections.defaultdict(dict)
    for r in report.read_csv(str(ROOT / "docs" / "study" / "results.csv")):
        key = (r["dataset"], r["family"], r["condition"], r["normalizer"])
        cells[(*key, r["bn_momentum"], r["examples"])][r["seed"]] = r["accuracy_eval"]
    return cells


def _drops(cells, base, cell) -> np.ndarray:
    """Per-seed accuracy lost from `base` to `cell` (the same seeds on both sides)."""
    return np.array([cells[base][s] - cells[cell][s] for s in sorted(cells[base])])


def _comparisons(cells):
    """[(mean drop, cell)]: every skewed or clustered cell against its uniform baseline (table,
    momentum and length families: their uniform row; dose: skew 0 at the same B)."""
    out = []
    for key in cells:
        dataset, family, condition = key[:3]
        if family == "lr" or condition in ("uniform", "small_batch") or condition.endswith("_s0"):
            continue
        base = condition.split("_")[0] + "_s0" if family == "dose" else "uniform"
        out.append((_drops(cells, (dataset, family, base, *key[3:]), key).mean(), key))
    return out


def _dose(condition: str) -> tuple[int, float]:
    b, s = re.fullmatch(r"b(\d+)_s([\d.]+)", condition).groups()
    return int(b), float(s)


def test_every_setting_sentence_holds_in_the_committed_results():
    """ "Skewed and clustered batches cost every normalizer accuracy": the count of comparisons
    that lose accuracy, the exception, and where the smallest losses are."""
    comparisons = _comparisons(_accuracies())
    losing = [c for c in comparisons if c[0] > 0]
    kept = [c for c in comparisons if c[0] <= 0]
    readme, docs = _readme_study_sentence(), _text(ROOT / "docs" / "study.md")
    for text in (readme, docs):
        assert "least, not most" not in text and "batch norm suffers least" not in text
        assert "skewed and clustered batches cost every normalizer accuracy" in text.lower()
        assert f"{len(losing)} of the {len(comparisons)} comparisons" in text
    for _, (dataset, family, condition, normalizer, *_) in kept:
        assert family == "dose"
        batch_size, skew = _dose(condition)
        exception = f"skew {skew:g} at B = {batch_size} costs {NAMES[normalizer]} nothing on "
        assert exception + dataset in readme and exception + dataset in docs
    small = [c for c in losing if c[0] < 0.02]
    assert small and all(
        key[0] == "digits"
        and key[1] == "dose"
        and (_dose(key[2])[1] == 0.5 or _dose(key[2])[0] == 8)
        for _, key in small
    )
    assert "losses under 0.02 are all on digits, at skew 0.5 or at B = 8" in docs


def test_which_normalizer_suffers_least_is_stated_with_its_scope():
    """B = 32 on the clusters: batch norm loses less than no normalization; B = 8: more; on
    digits the rate chosen on uniform batches decides it (divergence)."""
    cells = _accuracies()
    readme, docs = _readme_study_sentence(), _text(ROOT / "docs" / "study.md")

    def drop(dataset, family, base, condition, normalizer):
        key = lambda c: (dataset, family, c, normalizer, 0.9, 9600)  # noqa: E731
        return _drops(cells, key(base), key(condition))

    at_32 = {n: drop("clusters", "table", "uniform", "skewed", n) for n in ("batch", "none")}
    at_8 = {n: drop("clusters", "dose", "b8_s0", "b8_s0.8", n) for n in ("batch", "none")}
    assert (
        at_32["batch"].mean() < at_32["none"].mean() and at_8["batch"].mean() > at_8["none"].mean()
    )
    assert (
        f"cost batch norm {at_32['batch'].mean():.2f} of test accuracy and a network without "
        f"normalization {at_32['none'].mean():.2f}" in readme
    )
    assert (
        f"at B = 8 the same skew costs batch norm {at_8['batch'].mean():.2f} and the network "
        f"without normalization {at_8['none'].mean():.2f}" in readme
    )
    p = stats.ttest_ind(at_8["batch"], at_8["none"], equal_var=False).pvalue
    assert (
        f"batch norm loses {at_8['batch'].mean():.3f}, no normalization "
        f"{at_8['none'].mean():.3f} (Welch p = {p:.3f})" in docs
    )
    rows = report.read_csv(str(ROOT / "docs" / "study" / "results.csv"))
    skewed_none = [
        r
        for r in rows
        if (r["dataset"], r["family"], r["condition"], r["normalizer"])
        == ("digits", "table", "skewed", "none")
    ]
    rate = {
        r["normalizer"]: r["learning_rate"]
        for r in rows
        if (r["dataset"], r["family"], r["condition"]) == ("digits", "table", "skewed")
    }
    diverged = sum(r["diverged"] for r in skewed_none)
    ratio = rate["none"] / rate["batch"]
    assert (
        f"got {ratio:g}x batch norm's, and {diverged} of its {len(skewed_none)} skewed runs "
        "diverged" in readme
    )
    assert f"{diverged} of its {len(skewed_none)} runs diverged" in docs
