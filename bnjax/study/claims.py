"""The claim-by-claim verdicts: each claim of the paper (and each of bnjax's README) as a test.

A `Claim` compares a metric between two selections of the study's rows, seed by seed:

    a, b         selections (`Selection`): family, condition, normalizer, BN momentum, training
                 examples, and optionally `minus`, a second condition whose value is subtracted
                 seed by seed (a drop, e.g. accuracy on uniform minus on skewed batches)
    alternative  'greater' (the claim says a > b), 'less', or 'two-sided'
    test         'welch' (different runs) or 'paired' (the same runs, two metrics)

`verdicts` runs every claim on every dataset, adjusts all p-values together (Holm, one family),
and gives each claim a verdict:

    held            significant (adjusted p < alpha) in the claimed direction on every dataset
    held on X       on dataset X only
    reversed        the opposite direction is significant (a two-sided family, Holm-adjusted)
    not shown       neither

What earlier versions of the study did with a claim, and why its verdict changed, is in
CHANGELOG.md, not here: the claims say what is tested now.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence

from bnjax.study import significance

ALPHA = 0.05


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which rows a side of a claim reads, and the metric column (`seed_values` reads them)."""

    metric: str
    condition: str
    normalizer: str = "batch"
    family: str = "table"
    bn_momentum: float | None = None  # None: the config's (the table's) momentum
    examples: int | None = None  # None: the full budget
    minus: str | None = None  # a condition subtracted seed by seed (a drop)


@dataclasses.dataclass(frozen=True)
class Claim:
    """One claim: its key (P: the paper's, R: bnjax's), source, statement, its two sides, the
    direction it claims and its test (`verdicts` runs it)."""

    key: str
    source: str  # 'paper' or 'bnjax'
    text: str
    a: Selection
    b: Selection
    alternative: str
    test: str = "welch"


def _matches(row: Mapping, s: Selection, condition: str, momentum: float, budget: int) -> bool:
    return (
        row["family"] == s.family
        and row["condition"] == condition
        and row["normalizer"] == s.normalizer
        and math.isclose(float(row["bn_momentum"]), s.bn_momentum or momentum)
        and int(row["examples"]) == (s.examples or budget)
    )


def seed_values(
    rows: Sequence[Mapping], s: Selection, *, momentum: float, budget: int
) -> dict[int, float]:
    """{seed: value} of `s` over `rows` (one dataset): the metric, or the metric on
    `s.minus` minus on `s.condition` where `s.minus` is set (seeds present in both).

    Example:
      >>> rows = [{"family": "table", "condition": c, "normalizer": "batch", "bn_momentum": 0.9,
      ...          "examples": 100, "seed": 0, "acc": v} for c, v in (("u", 0.9), ("s", 0.6))]
      >>> seed_values(rows, Selection("acc", "s", minus="u"), momentum=0.9, budget=100)
      {0: 0.30000000000000004}
    """

    def pick(condition: str) -> dict[int, float]:
        out = {}
        for row in rows:
            if _matches(row, s, condition, momentum, budget) and row.get(s.metric) is not None:
                out[int(row["seed"])] = float(row[s.metric])
        return out

    values = pick(s.condition)
    if s.minus is None:
        return values
    base = pick(s.minus)
    return {seed: base[seed] - values[seed] for seed in sorted(values) if seed in base}


@dataclasses.dataclass
class Verdict:
    """A claim's result on each dataset and overall (`verdicts` fills it; its example shows
    one)."""

    claim: Claim
    a: dict  # dataset -> Interval of side a
    b: dict  # dataset -> Interval of side b
    p: dict  # dataset -> raw one-sided (or two-sided) p
    p_holm: dict  # dataset -> Holm-adjusted p
    reversed_p: dict  # dataset -> Holm-adjusted p of the two-sided family
    verdict: str = ""


def _test(claim: Claim, a: dict, b: dict, alternative: str) -> float:
    if claim.test == "paired":
        seeds = sorted(set(a) & set(b))
        return significance.paired([a[s] for s in seeds], [b[s] for s in seeds], alternative)
    return significance.welch(list(a.values()), list(b.values()), alternative)


def verdicts(
    rows: Sequence[Mapping],
    claims: Sequence[Claim],
    *,
    momentum: float,
    budgets: Mapping[str, int],
    resamples: int = 10_000,
) -> list[Verdict]:
    """Every claim on every dataset of `budgets` ({dataset: example budget}); p-values Holm-
    adjusted over all (claim, dataset) tests together.

    Example:
      >>> rows = [{"dataset": "d", "family": "table", "condition": c, "normalizer": "batch",
      ...          "bn_momentum": 0.9, "examples": 100, "seed": s, "acc": v + 0.01 * s}
      ...         for s in range(5) for c, v in (("u", 0.9), ("s", 0.6))]
      >>> claim = Claim("P7", "paper", "skew lowers accuracy", Selection("acc", "s"),
      ...               Selection("acc", "u"), "less")
      >>> [v.verdict for v in verdicts(rows, [claim], momentum=0.9, budgets={"d": 100})]
      ['held']
    """
    out, p_all, p_two = [], [], []
    for claim in claims:
        v = Verdict(claim, {}, {}, {}, {}, {})
        for dataset, budget in budgets.items():
            mine = [r for r in rows if r["dataset"] == dataset]
            a = seed_values(mine, claim.a, momentum=momentum, budget=budget)
            b = seed_values(mine, claim.b, momentum=momentum, budget=budget)
            v.a[dataset] = significance.bootstrap_ci(list(a.values()), resamples=resamples)
            v.b[dataset] = significance.bootstrap_ci(list(b.values()), resamples=resamples)
            v.p[dataset] = _test(claim, a, b, claim.alternative)
            p_all.append(v.p[dataset])
            p_two.append(_test(claim, a, b, "two-sided"))
        out.append(v)
    adjusted, adjusted_two = significance.holm(p_all), significance.holm(p_two)
    i = 0
    for v in out:
        for dataset in budgets:
            v.p_holm[dataset], v.reversed_p[dataset] = adjusted[i], adjusted_two[i]
            i += 1
        v.verdict = _verdict(v)
    return out


def _verdict(v: Verdict) -> str:
    held = [d for d, p in v.p_holm.items() if p < ALPHA]
    if held and len(held) == len(v.p_holm):
        return "held"
    if held:
        return "held on " + ", ".join(held)
    if v.claim.alternative != "two-sided":
        sign = 1 if v.claim.alternative == "greater" else -1
        against = [
            d
            for d, p in v.reversed_p.items()
            if p < ALPHA and sign * (v.a[d].mean - v.b[d].mean) < 0
        ]
        if against:
            return "reversed on " + ", ".join(against)
    return "not shown"


def study_claims(
    *,
    deepest_layer: int,
    budget: int,
    length_fractions: Sequence[float],
    other_momenta: Sequence[float],
) -> list[Claim]:
    """The paper's claims (its Table 1 and text) and bnjax's README claims, as tests.

    Example:
      >>> claims = study_claims(deepest_layer=2, budget=9600, length_fractions=(0.25,),
      ...                       other_momenta=(0.99,))
      >>> sorted({c.source for c in claims}), len({c.key for c in claims}) == len(claims)
      (['bnjax', 'paper'], True)
    """
    deep = f"_l{deepest_layer}"
    claims = [
        Claim(
            "P1",
            "paper",
            "Clustered batches (consecutive stream): BN batch statistics "
            "fluctuate more than with uniform batches",
            Selection("stability_excess_mean_l0", "clustered_stream"),
            Selection("stability_excess_mean_l0", "uniform"),
            "greater",
        ),
        Claim(
            "P1s",
            "paper",
            "Clustered batches (shuffled): the same",
            Selection("stability_excess_mean_l0", "clustered_shuffled"),
            Selection("stability_excess_mean_l0", "uniform"),
            "greater",
        ),
        Claim(
            "P2",
            "paper",
            "The fluctuation is larger in deeper layers (clustered stream)",
            Selection("stability_excess_mean" + deep, "clustered_stream"),
            Selection("stability_excess_mean_l0", "clustered_stream"),
            "greater",
            test="paired",
        ),
        Claim(
            "P3",
            "paper",
            "Small batches amplify the noise of the batch statistics",
            Selection("stability_iid_mean_l0", "small_batch"),
            Selection("stability_iid_mean_l0", "uniform"),
            "greater",
        ),
        Claim(
            "P4",
            "paper",
            "Large but skewed batches still bias the running averages",
            Selection("running_bias", "large_inconsistent"),
            Selection("running_bias", "uniform"),
            "greater",
        ),
        Claim(
            "P5",
            "paper",
            "Large skewed batches reduce inference accuracy",
            Selection("accuracy_eval", "large_inconsistent"),
            Selection("accuracy_eval", "uniform"),
            "less",
        ),
        Claim(
            "P6",
            "paper",
            "Class skew makes the running averages diverge from the population statistics",
            Selection("running_bias", "skewed"),
            Selection("running_bias", "uniform"),
            "greater",
        ),
        Claim(
            "P7",
            "paper",
            "Class skew lowers inference accuracy",
            Selection("accuracy_eval", "skewed"),
            Selection("accuracy_eval", "uniform"),
            "less",
        ),
        Claim(
            "P8",
            "paper",
            "...and batch norm is the cause: its accuracy drop under skew "
            "exceeds the drop without normalization",
            Selection("accuracy_eval", "skewed", minus="uniform"),
            Selection("accuracy_eval", "skewed", normalizer="none", minus="uniform"),
            "greater",
        ),
        Claim(
            "P9",
            "paper",
            "Clustered batches make convergence oscillate (held-out probe)",
            Selection("probe_oscillation", "clustered_stream"),
            Selection("probe_oscillation", "uniform"),
            "greater",
        ),
        Claim(
            "P9s",
            "paper",
            "Class-skewed batches make convergence oscillate (probe)",
            Selection("probe_oscillation", "skewed"),
            Selection("probe_oscillation", "uniform"),
            "greater",
        ),
        Claim(
            "P10",
            "paper",
            "Class skew slows convergence (mean probe loss over the run)",
            Selection("probe_loss_auc", "skewed"),
            Selection("probe_loss_auc", "uniform"),
            "greater",
        ),
        Claim(
            "P11",
            "paper",
            "Inconsistent batches end in worse minima (final probe loss)",
            Selection("probe_loss_final", "skewed"),
            Selection("probe_loss_final", "uniform"),
            "greater",
        ),
        Claim(
            "P12",
            "paper",
            "Class skew makes training unstable or diverge",
            Selection("diverged", "skewed"),
            Selection("diverged", "uniform"),
            "greater",
        ),
        Claim(
            "P14",
            "paper",
            "Inconsistent batches increase update variability (training)",
            Selection("update_noise", "skewed"),
            Selection("update_noise", "uniform"),
            "greater",
        ),
        Claim(
            "P15",
            "paper",
            "Clustered batches weaken feature clusters (silhouette)",
            Selection("silhouette", "clustered_stream"),
            Selection("silhouette", "uniform"),
            "less",
        ),
        Claim(
            "P15s",
            "paper",
            "Class-skewed batches weaken feature clusters (silhouette)",
            Selection("silhouette", "skewed"),
            Selection("silhouette", "uniform"),
            "less",
        ),
        Claim(
            "P16",
            "paper",
            "Small consistent batches give lower accuracy than uniform B=32",
            Selection("accuracy_eval", "small_batch"),
            Selection("accuracy_eval", "uniform"),
            "less",
        ),
        Claim(
            "R1",
            "bnjax",
            "Recalibrating the running statistics raises accuracy under class skew",
            Selection("accuracy_eval", "skewed", normalizer="batch+recalibration"),
            Selection("accuracy_eval", "skewed"),
            "greater",
        ),
        Claim(
            "R2",
            "bnjax",
            "Recalibration removes the running-statistics bias under skew",
            Selection("running_bias", "skewed", normalizer="batch+recalibration"),
            Selection("running_bias", "skewed"),
            "less",
        ),
        Claim(
            "R3",
            "bnjax",
            "Batch renorm beats batch norm on clustered batches (stream)",
            Selection("accuracy_eval", "clustered_stream", normalizer="batch_renorm"),
            Selection("accuracy_eval", "clustered_stream"),
            "greater",
        ),
        Claim(
            "R4",
            "bnjax",
            "Batch renorm beats batch norm on class-skewed batches",
            Selection("accuracy_eval", "skewed", normalizer="batch_renorm"),
            Selection("accuracy_eval", "skewed"),
            "greater",
        ),
        Claim(
            "R5",
            "bnjax",
            "Group norm loses less accuracy to class skew than batch norm",
            Selection("accuracy_eval", "skewed", normalizer="group", minus="uniform"),
            Selection("accuracy_eval", "skewed", minus="uniform"),
            "less",
        ),
        Claim(
            "R7",
            "bnjax",
            "A consecutive clustered stream hurts BN more than the same batches shuffled",
            Selection("accuracy_eval", "clustered_stream"),
            Selection("accuracy_eval", "clustered_shuffled"),
            "less",
        ),
        Claim(
            "R8",
            "bnjax",
            "Evaluating with batch statistics at the small training B is "
            "worse than running statistics (Wu & Johnson's train/test inconsistency)",
            Selection("accuracy_batch_stats_train_b", "small_batch"),
            Selection("accuracy_eval", "small_batch"),
            "less",
            test="paired",
        ),
    ]
    for fraction in length_fractions:
        examples = round(budget * fraction)
        claims.append(
            Claim(
                f"P13x{fraction:g}",
                "paper",
                f"The accuracy cost of class skew grows with "
                f"training length (full budget vs {fraction:g} of it)",
                Selection("accuracy_eval", "skewed", minus="uniform"),
                Selection(
                    "accuracy_eval", "skewed", family="length", examples=examples, minus="uniform"
                ),
                "greater",
            )
        )
    for momentum in other_momenta:
        claims.append(
            Claim(
                f"R6m{momentum:g}",
                "bnjax",
                f"BN momentum {momentum:g} changes evaluation accuracy under class skew",
                Selection("accuracy_eval", "skewed", family="momentum", bn_momentum=momentum),
                Selection("accuracy_eval", "skewed"),
                "two-sided",
            )
        )
    return claims
