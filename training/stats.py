"""Paired significance tests of an ablation against the full model over cross-validation folds.

Folds are the unit of pairing: the same held-out fields are scored by both models, so per-fold metric
differences are paired samples. With the handful of folds a GPU budget allows, a p-value is often not
defined; these helpers say why instead of returning a number that means nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class PairedTest:
    """Result of :func:`paired_tests`; a ``None`` p-value comes with its reason in the matching note."""

    n: int
    mean_difference: float
    t_pvalue: float | None
    wilcoxon_pvalue: float | None
    t_note: str = ""
    wilcoxon_note: str = ""


def wilcoxon_min_pvalue(n: int) -> float:
    """Smallest two-sided exact Wilcoxon p-value reachable with ``n`` non-zero pairs: ``2 / 2**n``.

    With 3 folds it is 0.25, so no 3-fold result can be significant at 0.05 whatever the effect size.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return min(1.0, 2.0 / 2.0**n)


def paired_tests(variant: Sequence[float], reference: Sequence[float], *, min_pairs: int = 2) -> PairedTest:
    """Paired t-test and Wilcoxon signed-rank test (Wilcoxon 1945) of ``variant - reference``.

    A p-value is reported only where the test is defined: at least ``min_pairs`` pairs, differences
    that are not all zero, and (for the t-test) differences with non-zero spread. Otherwise the
    p-value is ``None`` and the note says why, e.g. ``"n/a (1 paired fold)"``.
    """
    a = np.asarray(variant, dtype=np.float64)
    b = np.asarray(reference, dtype=np.float64)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"paired samples must be 1-D of equal length, got shapes {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError(f"paired samples must be finite, got {a.tolist()} and {b.tolist()}")
    n = int(a.size)
    difference = a - b
    mean_difference = float(difference.mean()) if n else float("nan")
    if n < min_pairs:
        note = f"n/a ({n} paired fold{'' if n == 1 else 's'})"
        return PairedTest(n, mean_difference, None, None, note, note)
    if np.allclose(difference, 0.0, atol=1e-12):
        note = "n/a (no difference in any fold)"
        return PairedTest(n, mean_difference, None, None, note, note)

    t_pvalue: float | None = None
    t_note = ""
    if np.ptp(difference) <= 1e-12:
        t_note = "n/a (differences have zero spread)"
    else:
        t_pvalue = float(stats.ttest_rel(a, b).pvalue)

    wilcoxon_pvalue = float(stats.wilcoxon(a, b).pvalue)
    nonzero = int(np.count_nonzero(np.abs(difference) > 1e-12))
    floor = wilcoxon_min_pvalue(nonzero)
    wilcoxon_note = f"smallest reachable p with {nonzero} pairs is {floor:.3g}" if floor > 0.05 else ""
    return PairedTest(n, mean_difference, t_pvalue, wilcoxon_pvalue, t_note, wilcoxon_note)


def format_pvalue(pvalue: float | None, note: str = "") -> str:
    """Markdown cell for a p-value: the number (3 significant digits), or the reason it is missing."""
    if pvalue is None or (isinstance(pvalue, float) and math.isnan(pvalue)):
        return note or "n/a"
    text = f"{pvalue:.3g}" if pvalue >= 1e-4 else "<1e-4"
    return f"{text} ({note})" if note else text
