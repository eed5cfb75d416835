"""The study report: out-of-fold metrics with intervals, calibration, ablation tests, shortcut audit, plots.

Reads what :mod:`training.study` wrote (``cv/cv_block.json``, optional ``cv/cv_random.json`` and
``cv_paper/cv_block.json``, ``shortcuts.json``, ``final/config.json``, ``log.txt``), writes
``results.md`` and PNG plots into the docs folder and ``final/calibration.json`` for the exporter.
Folds cut short by the time budget are skipped and the report says which folds it used. The small
inputs (everything but the log and checkpoints) are kept under ``DOCS/study/`` in the same layout,
so the report can be recomputed, compared against and resumed from a checkout (run folders are not
committed and a new checkout starts without them).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from hybridcn.profiles import CLASS_NAMES
from preprocessing.shifts import SHIFTS
from training.calibration import (
    TARGET_PRECISION,
    Calibration,
    crossfit_calibration,
    crossfit_scores,
    fit_calibration,
    write_calibration,
)
from training.metrics import (
    bootstrap_intervals,
    classification_metrics,
    error_detection_auroc,
    expected_calibration_error,
    reliability_curve,
    softmax,
)
from training.stats import PairedTest, format_pvalue, paired_tests, wilcoxon_min_pvalue

SUMMARY_KEYS = (("accuracy", "Accuracy"), ("balanced_accuracy", "Balanced accuracy"),
                ("macro_auc", "Macro AUC (one-vs-rest)"), ("mcc", "MCC"))
PAIRED_KEYS = (("accuracy", "Accuracy"), ("mcc", "MCC"), ("macro_auc", "AUC"))
ARCHIVED_INPUTS = ("cv/cv_block.json", "cv/cv_random.json", "cv_paper/cv_block.json", "shortcuts.json",
                   "final/config.json")


@dataclass(frozen=True)
class FoldResult:
    """One variant on one held-out fold: its logits, the fields' labels and indices, recomputed metrics."""

    fold: int
    index: np.ndarray
    labels: np.ndarray
    logits: np.ndarray
    metrics: dict
    entry: dict


Variants = dict[str, dict[int, FoldResult]]


def load_cv(path: Path) -> tuple[Variants, int] | None:
    """Completed (variant, fold) entries of a cross-validation file and its number of folds; None if absent.

    Metrics are recomputed from the stored logits so every number in the report has one source.
    """
    if not path.exists():
        return None
    results = json.loads(path.read_text())
    if "labels" not in results or "folds" not in results:
        raise ValueError(f"{path} lacks 'labels' or 'folds'; keys are {sorted(results)}")
    labels = np.asarray(results["labels"], dtype=np.int64)
    assignment = results.get("assignment")
    n_folds = len(set(assignment)) if assignment else len(results["folds"])
    variants: Variants = {}
    for fold_key, fold_entries in results["folds"].items():
        for variant, entry in (fold_entries or {}).items():
            if not entry or "logits" not in entry or "index" not in entry:
                continue
            index = np.asarray(entry["index"], dtype=np.int64)
            logits = np.asarray(entry["logits"], dtype=np.float64)
            if logits.ndim != 2 or len(index) != len(logits) or len(index) == 0:
                continue
            fold_labels = labels[index]
            metrics = classification_metrics(fold_labels, softmax(logits))
            variants.setdefault(variant, {})[int(fold_key)] = FoldResult(
                int(fold_key), index, fold_labels, logits, metrics, entry)
    for variant in variants:
        variants[variant] = dict(sorted(variants[variant].items()))
    return variants, n_folds


def load_groups(path: Path) -> np.ndarray | None:
    """Block (patient stand-in) id of every field of a cross-validation file; None if it was not recorded."""
    groups = json.loads(path.read_text()).get("groups") if path.exists() else None
    return None if groups is None else np.asarray(groups, dtype=np.int64)


@dataclass(frozen=True)
class BlockComparison:
    """Accuracy of a variant and the full model on the same held-out fields, and the paired test over blocks."""

    folds: list[int]
    blocks: int
    variant_accuracy: float
    full_accuracy: float
    test: PairedTest


def block_paired_test(variant: dict[int, FoldResult], full: dict[int, FoldResult],
                      groups: np.ndarray) -> BlockComparison | None:
    """Paired tests of per-block accuracy, variant vs full, over the folds both finished.

    Blocks (40 consecutive captures of a class, twins merged) stand in for patients, so they are the
    independent unit here: far more pairs than folds (a 5-fold Wilcoxon cannot go below p = 0.0625),
    without treating correlated fields of one block as independent as a per-field test would.
    """
    shared = [f for f in variant if f in full]
    if not shared:
        return None
    index = np.concatenate([full[f].index for f in shared])
    if not np.array_equal(index, np.concatenate([variant[f].index for f in shared])):
        raise ValueError("variant and full model were scored on different fields")
    labels = np.concatenate([full[f].labels for f in shared])
    right_full = np.concatenate([full[f].logits.argmax(1) for f in shared]) == labels
    right_variant = np.concatenate([variant[f].logits.argmax(1) for f in shared]) == labels
    block_of_field = groups[index]
    blocks = np.unique(block_of_field)
    per_block = [(right_variant[block_of_field == b].mean(), right_full[block_of_field == b].mean()) for b in blocks]
    a, b = (np.array(column) for column in zip(*per_block, strict=True))
    return BlockComparison(shared, len(blocks), float(right_variant.mean()), float(right_full.mean()),
                           paired_tests(a, b))


def baseline_section(full: dict[int, FoldResult], block_path: Path, baseline_dir: Path) -> list[str]:
    """Markdown comparing this study's full model with another study's (an earlier recipe) on shared folds.

    Both studies must hold the same fields in the same block folds; the comparison is paired per fold
    and, with the block as the unit, per block (:func:`block_paired_test`).
    """
    baseline_path = Path(baseline_dir) / "cv" / "cv_block.json"
    loaded = load_cv(baseline_path)
    if loaded is None or "full" not in loaded[0]:
        raise FileNotFoundError(f"no completed 'full' fold in the baseline study's {baseline_path}")
    ours, theirs = json.loads(block_path.read_text()), json.loads(baseline_path.read_text())
    for key in ("labels", "assignment"):
        if ours.get(key) != theirs.get(key):
            raise ValueError(f"{block_path} and {baseline_path} differ in {key!r}: not the same fields and folds")
    baseline = loaded[0]["full"]
    shared = [f for f in full if f in baseline]
    md = [f"### Against the baseline study `{Path(baseline_dir).name}`", ""]
    if not shared:
        return md + ["No fold finished in both studies.", ""]
    setup = theirs.get("setup", {}).get("options", {})
    md.append(f"The baseline's recipe: {setup.get('backbone_epochs')} backbone epochs, batch "
              f"{setup.get('batch_size')}, lr {setup.get('lr')} (its `cv/cv_block.json`). Same fields, same "
              f"folds; compared on the {len(shared)} fold{'s' if len(shared) != 1 else ''} both finished.")
    md.append("")
    rows = [[str(f), str(len(full[f].labels)),
             *(f"{_num(baseline[f].metrics[key])} → {_num(full[f].metrics[key])}" for key, _ in PAIRED_KEYS)]
            for f in shared]
    md += [_table(["Fold", "n", *(f"{title} (baseline → this)" for _, title in PAIRED_KEYS)], rows), ""]
    groups = load_groups(block_path)
    if groups is not None:
        comparison = block_paired_test({f: full[f] for f in shared}, {f: baseline[f] for f in shared}, groups)
        test = comparison.test
        md.append(f"Pooled over those folds: accuracy {_pct(comparison.full_accuracy)} (baseline) → "
                  f"{_pct(comparison.variant_accuracy)} (this study), "
                  f"{100 * (comparison.variant_accuracy - comparison.full_accuracy):+.2f} points; paired over "
                  f"{comparison.blocks} blocks: t-test p {format_pvalue(test.t_pvalue, test.t_note)}, Wilcoxon p "
                  f"{format_pvalue(test.wilcoxon_pvalue, test.wilcoxon_note)}.")
        md.append("")
    return md


def pool(folds: dict[int, FoldResult]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, logits and fold id of every held-out field, concatenated over folds."""
    labels = np.concatenate([r.labels for r in folds.values()])
    logits = np.concatenate([r.logits for r in folds.values()])
    fold_ids = np.concatenate([np.full(len(r.labels), r.fold) for r in folds.values()])
    return labels, logits, fold_ids


def triage_section(variants: Variants) -> list[str]:
    """Markdown comparing how well each variant's confidence triages its own errors.

    Accuracy alone hides this: two heads can make the same errors and rank them very differently
    (label smoothing, for one, squeezes every confident field to the same top probability). Each
    variant gets its own temperature and review threshold, fitted as for the shipped model.
    """
    rows = []
    for name, folds in variants.items():
        if len(folds) < 2:
            continue
        labels, logits, fold_ids = pool(folds)
        calibration = fit_calibration(labels, logits)
        calibrated = calibration.probabilities
        crossfit = crossfit_calibration(labels, logits, fold_ids)
        accuracy = float((calibrated.argmax(axis=1) == labels).mean())
        rows.append([name, ", ".join(map(str, folds)), _num(accuracy), f"{calibration.temperature:.3f}",
                     _num(error_detection_auroc(labels, calibrated), 3),
                     _pct(calibration.review["review_fraction"], 1),
                     f"{_num(crossfit['accepted_precision'])} / {_pct(crossfit['review_fraction'], 1)}"])
    if not rows:
        return []
    md = ["### Triage by variant", ""]
    md.append("Error-detection AUROC (Hendrycks & Gimpel 2017): how well the calibrated top probability ranks a "
              f"variant's errors below its correct fields (1 = perfectly, 0.5 = chance). \"To review\" is the share "
              f"the review threshold holds back for auto-accepted precision ≥ {TARGET_PRECISION}; the last column fits "
              "T and the threshold leaving each fold out and scores that fold.")
    md.append("")
    md += [_table(["Variant", "Folds", "Accuracy", "T", "Error-detection AUROC", "To review",
                   "Leave-one-fold-out: precision / to review"], rows), ""]
    return md


def _head_smoothing(options: dict) -> str:
    """The head's own label smoothing where a run set one (older runs have no such option)."""
    value = options.get("head_label_smoothing")
    return "" if value is None else f" (head {value})"


def final_training_seconds(study_dir: Path) -> float | None:
    """Seconds the final model took: ``train_seconds`` in ``final/config.json``, else the first
    ``phase 4 done at X s`` line of the study log (a config without ``train_seconds`` comes from a study that
    trained the final model first, so that line is the final model's).
    None without a final model: a fold trial's log has the same lines, and they are not the final model's.
    """
    config_path = study_dir / "final" / "config.json"
    if config_path.exists():
        seconds = json.loads(config_path.read_text()).get("train_seconds")
        if seconds is not None:
            return float(seconds)
    log_path = study_dir / "log.txt"
    if not log_path.exists() or not (config_path.exists() or (study_dir / "final" / "model.pt").exists()):
        return None
    match = re.search(r"phase 4 done at ([0-9.]+)s", log_path.read_text())
    return float(match.group(1)) if match else None


def _cv_vs_final(cv_path: Path, final_config_path: Path) -> str:
    """How the CV models' training differed from the final model's (what the temperature transfers across)."""
    cv_options = json.loads(cv_path.read_text()).get("setup", {}).get("options", {})
    final_options = (json.loads(final_config_path.read_text()).get("options", {})
                     if final_config_path.exists() else {})
    cv_epochs, final_epochs = cv_options.get("backbone_epochs"), final_options.get("backbone_epochs")
    if cv_epochs is None or final_epochs is None:
        return "trained on a fifth less data than the shipped model"
    if cv_epochs == final_epochs:
        return f"trained the same {cv_epochs} backbone epochs as the shipped model but on a fifth less data"
    return f"trained {cv_epochs} backbone epochs (the shipped model {final_epochs}) on a fifth less data"


def _on_off(flag: bool | None) -> str:
    return "n/a" if flag is None else ("on" if flag else "off")


def _num(value: float | None, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}"


def _pct(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.{digits}f}%"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _folds_text(folds: list[int], n_folds: int) -> str:
    return f"fold{'s' if len(folds) != 1 else ''} {', '.join(map(str, folds))} of {n_folds}"


def _robustness_row(name: str, accuracy: dict, keys: tuple[str, ...]) -> list[str]:
    drop = 100 * (accuracy["background_replaced"] - accuracy["as_is"])
    return [name, *(_pct(accuracy[k]) for k in keys), f"{drop:+.1f} pt"]


def _plot_reliability(path: Path, labels: np.ndarray, raw: np.ndarray, calibrated: np.ndarray,
                      temperature: float) -> None:
    figure = Figure(figsize=(5, 6), dpi=120, layout="constrained")
    top, bottom = figure.subplots(2, 1, sharex=True, height_ratios=[3, 1])
    top.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    curves = ((raw, "uncalibrated", "o"), (calibrated, f"T = {temperature:.2f}", "s"))
    edges = np.linspace(0, 1, 41)
    for probabilities, name, marker in curves:
        curve = reliability_curve(labels, probabilities)
        ece = expected_calibration_error(labels, probabilities)
        top.plot(curve["confidence"], curve["accuracy"], marker=marker, label=f"{name} (ECE {ece:.3f})")
        bottom.hist(probabilities.max(axis=1), bins=edges, histtype="step", label=name)
    top.set_ylabel("accuracy")
    top.set_xlim(0, 1)
    top.set_ylim(0, 1.02)
    top.set_title("Reliability, out-of-fold (block split)")
    top.legend(loc="upper left", fontsize=8)
    bottom.set_yscale("log")
    bottom.set_xlabel("top-class confidence")
    bottom.set_ylabel("fields")
    figure.savefig(path, bbox_inches="tight")


def _plot_confusion(path: Path, confusion: np.ndarray) -> None:
    figure = Figure(figsize=(5, 4.3), dpi=120, layout="constrained")
    axes = figure.add_subplot()
    rates = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(rates, cmap="Blues", vmin=0, vmax=1)
    for i in range(confusion.shape[0]):
        for j in range(confusion.shape[1]):
            axes.text(j, i, f"{confusion[i, j]}\n{100 * rates[i, j]:.1f}%", ha="center", va="center",
                      fontsize=8, color="white" if rates[i, j] > 0.6 else "black")
    axes.set_xticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    axes.set_yticks(range(len(CLASS_NAMES)), CLASS_NAMES)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    axes.set_title("Confusion, out-of-fold (block split)")
    figure.colorbar(image, ax=axes, fraction=0.046, label="row rate")
    figure.savefig(path, bbox_inches="tight")


def _plot_ablation(path: Path, variants: Variants) -> None:
    names = [name for name in variants if name != "full"]
    figure = Figure(figsize=(3.2 * len(PAIRED_KEYS), 4.0), dpi=120, layout="constrained")
    for k, (key, title) in enumerate(PAIRED_KEYS):
        axes = figure.add_subplot(1, len(PAIRED_KEYS), k + 1)
        for i, name in enumerate(names):
            shared = [f for f in variants[name] if f in variants["full"]]
            for offset, source, colour in ((-0.2, "full", "tab:blue"), (0.2, name, "tab:orange")):
                values = [variants[source][f].metrics[key] for f in shared]
                if not values:
                    continue
                axes.bar(i + offset, np.mean(values), width=0.38, color=colour, alpha=0.6,
                         label=("full" if source == "full" else "variant") if i == 0 else None)
                axes.scatter([i + offset] * len(values), values, color="black", s=12, zorder=3)
        ticks = [f"{name} (k={sum(f in variants['full'] for f in variants[name])})" for name in names]
        axes.set_xticks(range(len(names)), ticks, rotation=35, ha="right", fontsize=8)
        low = min([r.metrics[key] for v in variants.values() for r in v.values()] + [1.0])
        axes.set_ylim(max(0.0, low - 0.05), 1.0)
        axes.set_title(f"{title} (paired folds)")
    handles, names = figure.axes[0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside upper center", ncols=2, fontsize=8)
    figure.savefig(path, bbox_inches="tight")


#: Decimals kept for the logits an archive stores (see :func:`archive_inputs`).
ARCHIVED_LOGIT_DECIMALS = 4


def _round_logits(cv: dict) -> dict:
    """``cv`` with every fold's logits and shifted logits rounded to :data:`ARCHIVED_LOGIT_DECIMALS` places."""

    def rounded(rows: list) -> list:
        return np.round(np.asarray(rows, dtype=np.float64), ARCHIVED_LOGIT_DECIMALS).tolist()

    folds = {}
    for fold, variants in cv.get("folds", {}).items():
        folds[fold] = {}
        for variant, entry in variants.items():
            entry = dict(entry)
            if "logits" in entry:
                entry["logits"] = rounded(entry["logits"])
            if isinstance(entry.get("shifted_logits"), dict):
                entry["shifted_logits"] = {kind: rounded(rows) if isinstance(rows, list) else rows
                                           for kind, rows in entry["shifted_logits"].items()}
            folds[fold][variant] = entry
    return {**cv, "folds": folds}


def archive_inputs(study_dir: Path, archive_dir: Path) -> list[str]:
    """Copy the study files the report reads (:data:`ARCHIVED_INPUTS`, those present) into ``archive_dir``.

    They hold every out-of-fold logit and the setup of the study, a few hundred kB as compact JSON: logits
    are kept to :data:`ARCHIVED_LOGIT_DECIMALS` decimals (a tenth of a thousandth moves no softmax by more
    than 1e-4, and a study with shift scores is 2.5x smaller than at full precision).
    ``hybridcn report ARCHIVE`` recomputes the report from them, ``--baseline ARCHIVE`` pairs a later
    study with it, and copying ``ARCHIVE/cv`` into a run folder lets ``crossvalidate`` resume there.
    The final model's training time, which older studies kept in the log only, goes into the copy of
    ``final/config.json``. Returns the copied paths, relative to both folders; nothing is copied onto itself.
    """
    study_dir, archive_dir = Path(study_dir), Path(archive_dir)
    if archive_dir.resolve() == study_dir.resolve():
        return []
    copied = []
    for name in ARCHIVED_INPUTS:
        source = study_dir / name
        if not source.exists():
            continue
        data = json.loads(source.read_text())
        if name.endswith("cv_block.json") or name.endswith("cv_random.json"):
            data = _round_logits(data)
        if name == "final/config.json" and data.get("train_seconds") is None:
            data["train_seconds"] = final_training_seconds(study_dir)  # older studies kept it in the log only
        target = archive_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(data, separators=(",", ":")))
        copied.append(name)
    return copied


@dataclass(frozen=True)
class OutOfFold:
    """The full model's held-out predictions pooled over the folds it finished, with their metrics.

    Every section of the report and ``calibration.json`` read the same pooled numbers, computed once here.
    """

    folds: dict[int, FoldResult]
    n_folds: int
    labels: np.ndarray
    logits: np.ndarray
    fold_ids: np.ndarray
    probabilities: np.ndarray  # softmax of the logits, no temperature
    metrics: dict
    intervals: dict[str, list[float]]
    bootstrap_rounds: int

    @property
    def fold_list(self) -> list[int]:
        return list(self.folds)

    @property
    def folds_text(self) -> str:
        return _folds_text(self.fold_list, self.n_folds)


def load_block_cv(block_path: Path) -> tuple[Variants, int]:
    """The block split's variants and fold count; raises if there is nothing to report on."""
    loaded = load_cv(block_path)
    if loaded is None:
        raise FileNotFoundError(f"no block cross-validation results at {block_path}")
    variants, n_folds = loaded
    if "full" not in variants:
        raise ValueError(f"no fold in {block_path} has a completed 'full' entry")
    return variants, n_folds


def pool_full_model(full: dict[int, FoldResult], n_folds: int, bootstrap_rounds: int) -> OutOfFold:
    """Pool the full model's folds and compute the OOF metrics and their bootstrap intervals."""
    labels, logits, fold_ids = pool(full)
    probabilities = softmax(logits)
    return OutOfFold(
        folds=full, n_folds=n_folds, labels=labels, logits=logits, fold_ids=fold_ids, probabilities=probabilities,
        metrics=classification_metrics(labels, probabilities),
        intervals=bootstrap_intervals(labels, probabilities, rounds=bootstrap_rounds),
        bootstrap_rounds=bootstrap_rounds,
    )


def _header_section(study_dir: Path) -> list[str]:
    """Title, where the numbers come from, and the final model's recipe (from ``final/config.json``)."""
    md: list[str] = [f"# Study results: `{study_dir.name}`", ""]
    md.append("Written by `hybridcn report`. All numbers are computed from the stored out-of-fold (OOF) "
              "logits; a fold the time budget did not finish is left out, never filled in.")
    md.append("")
    config_path = study_dir / "final" / "config.json"
    if config_path.exists():
        config = json.loads(config_path.read_text())
        options, profile = config.get("options", {}), config.get("profile", {})
        md.append(f"Final model: profile `{profile.get('name')}`, {options.get('seg_epochs')} segmentation"
                  f" / {options.get('backbone_epochs')} backbone / {options.get('head_epochs')} head epochs, "
                  f"batch {options.get('batch_size')}, lr {options.get('lr')}, label smoothing "
                  f"{options.get('label_smoothing')}{_head_smoothing(options)}, seed {options.get('seed')}; "
                  f"{profile.get('image_size')} px "
                  f"network input, CLAHE/multiscale {_on_off(profile.get('preprocess', {}).get('enhance'))}; "
                  f"trained on `{options.get('device')}`.")
        md.append("")
    return md


def _metrics_section(oof: OutOfFold, docs_dir: Path) -> list[str]:
    """Section 1: pooled metrics with intervals, per fold, per class, confusion matrix (and its plot)."""
    md = ["## 1. Out-of-fold metrics of the full model (block split)", ""]
    md.append(f"Held-out fields pooled over {oof.folds_text}: n = {len(oof.labels)}. "
              f"Intervals: percentile bootstrap over fields ({oof.bootstrap_rounds} rounds). Fields of one block "
              "are correlated (consecutive captures, twins), so these intervals are narrower than the truth; "
              "the spread over folds is the more honest uncertainty.")
    md.append("")
    rows = []
    for key, title in SUMMARY_KEYS:
        per_fold = [r.metrics[key] for r in oof.folds.values()]
        interval = oof.intervals.get(key)
        spread = (f"{np.mean(per_fold):.4f} ± {np.std(per_fold, ddof=1):.4f}" if len(per_fold) > 1
                  else "n/a (1 fold)")
        interval_text = f"[{_num(interval[0])}, {_num(interval[1])}]" if interval else "n/a"
        rows.append([title, _num(oof.metrics[key]), interval_text, spread])
    md += [_table(["Metric", "OOF", "95% bootstrap interval", "Mean ± SD over folds"], rows), ""]
    md += ["### Per fold", ""]
    rows = [[str(r.fold), str(len(r.labels)), *(_num(r.metrics[key]) for key, _ in SUMMARY_KEYS),
             f"{r.entry.get('seconds', float('nan')):.0f}"] for r in oof.folds.values()]
    md += [_table(["Fold", "n", "Accuracy", "Balanced acc.", "Macro AUC", "MCC", "Train s"], rows), ""]
    md += ["### Per class (OOF)", ""]
    rows = [[name, str(v["n"]), _num(v["sensitivity"]), _num(v["specificity"])]
            for name, v in oof.metrics["per_class"].items()]
    md += [_table(["Class", "n", "Sensitivity", "Specificity"], rows), ""]
    md += ["### Confusion matrix (OOF; rows true, columns predicted)", ""]
    confusion = np.asarray(oof.metrics["confusion"])
    md += [_table(["true \\ predicted", *CLASS_NAMES],
                  [[CLASS_NAMES[i], *map(str, row)] for i, row in enumerate(confusion)]), ""]
    _plot_confusion(docs_dir / "confusion_matrix.png", confusion)
    md += ["![confusion matrix](confusion_matrix.png)", ""]
    return md


def _calibration_section(oof: OutOfFold, calibration: Calibration, cv_vs_final: str, docs_dir: Path) -> list[str]:
    """Section 2: temperature, ECE, the review threshold, their leave-one-fold-out check, the reliability plot."""
    review = calibration.review
    crossfit = crossfit_calibration(oof.labels, oof.logits, oof.fold_ids)
    _plot_reliability(docs_dir / "reliability.png", oof.labels, oof.probabilities, calibration.probabilities,
                      calibration.temperature)
    md = ["## 2. Calibration and the review threshold", ""]
    md.append(f"Temperature scaling (Guo et al. 2017) fitted on the OOF logits of the full model "
              f"({len(oof.labels)} fields): T = {calibration.temperature:.3f}. It is fitted and scored on the same "
              f"OOF data, and the CV models {cv_vs_final}, so it is a proxy for the shipped model's temperature.")
    md.append("")
    rows = [["ECE (15 bins), uncalibrated", _num(calibration.ece_before)],
            ["ECE (15 bins), T applied", _num(calibration.ece_after)],
            [f"Review threshold (auto-accept precision ≥ {TARGET_PRECISION})", _num(review["threshold"])],
            ["Precision of auto-accepted fields", _num(review["accepted_precision"])],
            ["Fraction sent to review", _pct(review["review_fraction"], 1)]]
    if crossfit is not None:
        rows += [["Leave-one-fold-out: ECE", _num(crossfit["ece"])],
                 ["Leave-one-fold-out: precision of auto-accepted", _num(crossfit["accepted_precision"])],
                 ["Leave-one-fold-out: fraction sent to review", _pct(crossfit["review_fraction"], 1)]]
    md += [_table(["Quantity", "Value"], rows), ""]
    if crossfit is not None:
        md.append("Leave-one-fold-out rows fit T and the threshold on the other folds and score the fold "
                  "left out.")
        md.append("")
    md += ["![reliability diagram](reliability.png)", ""]
    return md


def _fold_tests_table(variants: Variants, ablations: list[str], n_folds: int) -> list[str]:
    """Each ablation against the full model, paired over the folds both finished."""
    full = variants["full"]
    md = ["Paired t-test and Wilcoxon signed-rank test (Wilcoxon 1945) of variant vs full over "
          "folds, two-sided. A test needs at least 2 paired folds; where there are fewer, no p-value "
          "is given.", ""]
    rows = []
    for name in ablations:
        shared = [f for f in variants[name] if f in full]
        for key, title in PAIRED_KEYS:
            a = [variants[name][f].metrics[key] for f in shared]
            b = [full[f].metrics[key] for f in shared]
            test = paired_tests(a, b)
            rows.append([name, title, ", ".join(map(str, shared)) or "none",
                         " / ".join(_num(x) for x in a), " / ".join(_num(x) for x in b),
                         f"{test.mean_difference:+.4f}" if shared else "n/a",
                         format_pvalue(test.t_pvalue, test.t_note),
                         format_pvalue(test.wilcoxon_pvalue, test.wilcoxon_note)])
    md += [_table(["Variant", "Metric", "Paired folds", "Variant per fold", "Full per fold", "Mean Δ",
                   "t-test p", "Wilcoxon p"], rows), ""]
    md.append(f"With k folds the smallest two-sided exact Wilcoxon p is 2/2^k "
              f"({wilcoxon_min_pvalue(n_folds):.3g} for all {n_folds} folds), so a fold-level test "
              "cannot reach 0.05 below 6 folds.")
    md.append("")
    return md


def _block_tests_table(variants: Variants, ablations: list[str], groups: np.ndarray | None) -> list[str]:
    """Each ablation against the full model with the block as the unit (:func:`block_paired_test`)."""
    if groups is None:
        return ["Block-level tests: not recorded (this cross-validation file has no block ids).", ""]
    md = ["### Paired over blocks", ""]
    md.append("The same comparison with the block (40 consecutive captures of a class, the patient "
              "stand-in) as the unit: accuracy per block, variant vs full, on every block of the folds "
              "both finished. Blocks are far more numerous than folds and closer to independent than "
              "fields.")
    md.append("")
    rows = []
    for name in ablations:
        comparison = block_paired_test(variants[name], variants["full"], groups)
        if comparison is None:
            continue
        test = comparison.test
        rows.append([name, ", ".join(map(str, comparison.folds)), str(comparison.blocks),
                     _num(comparison.variant_accuracy), _num(comparison.full_accuracy),
                     f"{comparison.variant_accuracy - comparison.full_accuracy:+.4f}",
                     format_pvalue(test.t_pvalue, test.t_note),
                     format_pvalue(test.wilcoxon_pvalue, test.wilcoxon_note)])
    md += [_table(["Variant", "Folds", "Blocks", "Variant accuracy", "Full accuracy", "Δ",
                   "t-test p", "Wilcoxon p"], rows), ""]
    return md


def _ablation_section(variants: Variants, n_folds: int, block_path: Path, docs_dir: Path) -> list[str]:
    """Section 3: every ablation paired with the full model over folds and over blocks, and the plot."""
    md = ["## 3. Ablations (paired with the full model on the same folds)", ""]
    ablations = [name for name in variants if name != "full"]
    if not ablations:
        return md + ["No ablation finished.", ""]
    md += _fold_tests_table(variants, ablations, n_folds)
    md += _block_tests_table(variants, ablations, load_groups(block_path))
    _plot_ablation(docs_dir / "ablation.png", variants)
    md += ["![ablations](ablation.png)", ""]
    return md


def _paper_section(study_dir: Path, full: dict[int, FoldResult]) -> list[str]:
    """Section 4: the paper profile's folds beside the compact profile's on the same folds."""
    paper = load_cv(study_dir / "cv_paper" / "cv_block.json")
    if paper is None or "full" not in paper[0]:
        return ["## 4. Paper profile", "", "Not run (no `cv_paper/cv_block.json`).", ""]
    md = ["## 4. Paper profile vs compact profile (block split)", ""]
    rows = []
    for f, r in paper[0]["full"].items():
        compact = full.get(f)
        rows.append([str(f), str(len(r.labels)), _num(r.metrics["accuracy"]), _num(r.metrics["mcc"]),
                     _num(r.metrics["macro_auc"]),
                     _num(compact.metrics["accuracy"]) if compact else "n/a",
                     _num(compact.metrics["mcc"]) if compact else "n/a"])
    headers = ["Fold", "n", "Paper acc.", "Paper MCC", "Paper AUC", "Compact acc.", "Compact MCC"]
    return md + [_table(headers, rows), ""]


def _random_split_section(study_dir: Path, oof: OutOfFold) -> list[str]:
    """Section 5: the leaky random split against the block split (the gap is the leak)."""
    random_cv = load_cv(study_dir / "cv" / "cv_random.json")
    md = ["## 5. Leaky random split vs block split", ""]
    if random_cv is None or "full" not in random_cv[0]:
        return md + ["Not run (no `cv/cv_random.json`).", ""]
    r_labels, r_logits, _ = pool(random_cv[0]["full"])
    r_metrics = classification_metrics(r_labels, softmax(r_logits))
    md.append("The random split puts near-duplicate captures of one smear on both sides (leaky, as in "
              "the paper); the block split keeps them together. The gap is the leak.")
    md.append("")
    rows = [[title, _num(r_metrics[key]), _num(oof.metrics[key])] for key, title in SUMMARY_KEYS]
    rows.append(["Folds", _folds_text(list(random_cv[0]["full"]), random_cv[1]), oof.folds_text])
    return md + [_table(["Metric", "Random split (leaky)", "Block split"], rows), ""]


def _shortcut_section(study_dir: Path, full: dict[int, FoldResult]) -> list[str]:
    """Section 6: the artefact-only probe (``shortcuts.json``) and the full model on altered fields."""
    md = ["## 6. Shortcut audit", ""]
    shortcuts_path = study_dir / "shortcuts.json"
    if shortcuts_path.exists():
        shortcuts = json.loads(shortcuts_path.read_text())
        chance = shortcuts.get("chance_accuracy")
        md.append("Block-CV accuracy of a logistic regression on acquisition artefacts alone (no cell "
                  f"content); chance (majority class) is {_pct(chance, 1)}.")
        md.append("")
        rows = [[name.replace("_", " "), _pct(v["block_cv_accuracy"], 1)]
                for name, v in shortcuts.items() if isinstance(v, dict) and "block_cv_accuracy" in v]
        md += [_table(["Probe features", "Block-CV accuracy"], rows), ""]
    robust = [r for r in full.values() if "shortcut_robustness" in r.entry]
    if not robust:
        return md
    md.append("The full model on held-out fields as they are, with the scale-bar corner blanked, with "
              "the background (non-stained pixels) replaced by a neutral colour, and (newer runs) with "
              "the background recoloured to another class's median background, texture kept:")
    md.append("")
    keys = ("as_is", "corner_blanked", "background_replaced")
    if all("background_recoloured" in r.entry["shortcut_robustness"] for r in robust):
        keys += ("background_recoloured",)
    weights = np.array([len(r.labels) for r in robust], float)
    pooled = {k: float(np.average([r.entry["shortcut_robustness"][k] for r in robust], weights=weights))
              for k in keys}
    rows = [_robustness_row(str(r.fold), r.entry["shortcut_robustness"], keys) for r in robust]
    rows.append(_robustness_row("pooled", pooled, keys))
    headers = ["Fold", "As is", "Corner blanked", "Background replaced", "Background recoloured"][: len(keys) + 1]
    return md + [_table([*headers, "Δ background"], rows), ""]


def _segmentation_section(full: dict[int, FoldResult]) -> list[str]:
    """Section 7: the U-Net's Dice and IoU per fold against the cleaned masks."""
    md = ["## 7. Segmentation (Attention U-Net vs cleaned `Segmented/` masks)", ""]
    segmented = [r for r in full.values() if "segmentation" in r.entry]
    if not segmented:
        return md + ["No segmentation scores stored.", ""]
    rows = [[str(r.fold), str(r.entry["segmentation"]["n"]), _num(r.entry["segmentation"]["dice"]),
             _num(r.entry["segmentation"]["iou"])] for r in segmented]
    return md + [_table(["Fold", "Masks", "Dice", "IoU"], rows), ""]


def _shift_section(full: dict[int, FoldResult], groups: np.ndarray | None) -> list[str]:
    """Section 9: the full model's held-out fields under each seeded stain and camera shift.

    Calibrated as a new lab's fields would be: each fold with the temperature and review threshold
    fitted on the other folds' clean fields (with one fold, on the fold's other blocks).
    """
    md = ["## 9. Stain and camera shifts (held-out fields)", ""]
    scored = [r for r in full.values() if "shifted_logits" in r.entry]
    if not scored:
        return md + ["No shifted scores stored (the study ran before `training.experiments.shifted_logits`).", ""]
    labels = np.concatenate([r.labels for r in scored])
    clean = np.concatenate([r.logits for r in scored])
    if len(scored) >= 2:
        calibration_groups, by = np.concatenate([np.full(len(r.labels), r.fold) for r in scored]), "fold"
    elif groups is not None:
        calibration_groups, by = groups[np.concatenate([r.index for r in scored])], "block"
    else:
        return md + ["One fold and no block ids: nothing to calibrate on that the fields were not fitted on.", ""]
    seeds = sorted({r.entry["shifted_logits"].get("seed") for r in scored})
    md.append(f"Folds {', '.join(str(r.fold) for r in scored)} ({len(labels)} fields), shift seed "
              f"{', '.join(map(str, seeds))} (`preprocessing/shifts.py`). Temperature and review threshold "
              f"fitted leaving one {by} out on the clean fields and applied to the shifted copies of the "
              f"{by} left out. Goal: a drop of at most 1 point on every kind.")
    md.append("")
    rows = []
    base = None
    for kind in ("none", *SHIFTS):
        logits = clean if kind == "none" else np.concatenate(
            [np.asarray(r.entry["shifted_logits"][kind], dtype=np.float64) for r in scored])
        probabilities, accepted = crossfit_scores(labels, clean, calibration_groups, logits)
        correct = probabilities.argmax(axis=1) == labels
        accuracy = float(correct.mean())
        base = accuracy if base is None else base
        drop = "" if kind == "none" else f"{100 * (base - accuracy):+.2f}"
        rows.append([kind.replace("_", " "), _pct(accuracy), drop,
                     _pct(expected_calibration_error(labels, probabilities)),
                     _num(error_detection_auroc(labels, probabilities), 3), _pct(1 - accepted.mean(), 1),
                     _pct(correct[accepted].mean()) if accepted.any() else "n/a",
                     str(int((~correct & accepted).sum()))])
    return md + [_table(["Shift", "Accuracy", "Drop (points)", "ECE", "Error AUROC", "To review", "Accepted right",
                         "Wrong, not flagged"], rows), ""]


def _ood_section(report: dict | None) -> list[str]:
    """Section 10: the served model's out-of-distribution check, as ``hybridcn ood`` measured it when fitted."""
    md = ["## 10. Out-of-distribution and magnification check (served model)", ""]
    if not report:
        return md + ["No check given (`--repository` of a model fitted with `hybridcn ood`).", ""]
    md.append(f"Fitted on {report['fitted_on']['n']} fields of `{report['fitted_on']['data']}`. Method: "
              f"{report.get('method', 'not recorded')}. Goals: at most 3% of held-out in-distribution fields "
              "flagged, at least 95% of probes.")
    md.append("")
    rows = [["held-out in-distribution fields", "", _pct(report["held_out_in_distribution_flagged"], 1), "", ""]]
    for kind, probe in report["probes"].items():
        rows.append([kind.replace("_", " "), str(probe["n"]), _pct(probe["flagged"], 1),
                     _pct(probe["flagged_as_out_of_distribution"], 1),
                     _pct(probe["rescaled"], 1) if "rescaled" in probe else ""])
    rows.append(["all probes", "", _pct(report["probes_flagged"], 1), "", ""])
    return md + [_table(["Fields", "n", "Flagged", "By the OOD score", "Resized to the training scale"], rows), ""]


def _compute_section(study_dir: Path, full: dict[int, FoldResult]) -> list[str]:
    """Section 8: how long the final model and each CV fold took."""
    seconds = final_training_seconds(study_dir)
    final_text = f"{seconds:.0f} s" if seconds is not None else "not recorded"
    fold_text = ", ".join(f"fold {r.fold}: {r.entry.get('seconds', float('nan')):.0f} s"
                          for r in full.values())
    return ["## 8. Compute", "",
            f"Final model training (phases 1-4): {final_text}. CV `full` per fold (training and scoring): {fold_text}.",
            ""]


def _oof_metrics_record(oof: OutOfFold) -> dict:
    """The OOF numbers ``calibration.json`` carries into the export manifest."""
    return {"n": oof.metrics["n"], **{key: oof.metrics[key] for key, _ in SUMMARY_KEYS},
            "intervals_95": oof.intervals, "per_class": oof.metrics["per_class"],
            "confusion": oof.metrics["confusion"], "folds": oof.fold_list, "n_folds": oof.n_folds}


def _summary(oof: OutOfFold, calibration: Calibration, docs_dir: Path, calibration_path: Path) -> str:
    """One paragraph for the terminal: the headline numbers and what was written where."""
    metrics, review = oof.metrics, calibration.review
    acc_ci = oof.intervals.get("accuracy", [float("nan")] * 2)
    return (f"OOF block split ({oof.folds_text}, n={metrics['n']}): "
            f"accuracy {metrics['accuracy']:.4f} [{acc_ci[0]:.4f}, {acc_ci[1]:.4f}], MCC {metrics['mcc']:.4f}, "
            f"macro AUC {metrics['macro_auc']:.4f}; "
            f"T={calibration.temperature:.3f}, ECE {calibration.ece_before:.4f} -> {calibration.ece_after:.4f}; "
            f"review threshold {review['threshold']:.4f} sends {100 * review['review_fraction']:.1f}% to review. "
            f"Wrote {docs_dir / 'results.md'}, {calibration_path} and the inputs under {docs_dir / 'study'}.")


def write_report(study_dir: Path, docs_dir: Path, *, bootstrap_rounds: int = 1000,
                 baseline: Path | None = None, ood: dict | None = None) -> str:
    """Write ``docs_dir/results.md`` with plots and ``study_dir/final/calibration.json``; return a summary.

    The inputs are archived into ``docs_dir/study`` (:func:`archive_inputs`).

    ``baseline`` (another study of the same fields and folds) adds a paired comparison with its full model.
    ``ood`` (a served model's ``manifest.ood.report``) adds the out-of-distribution probes.
    """
    study_dir, docs_dir = Path(study_dir), Path(docs_dir)
    block_path = study_dir / "cv" / "cv_block.json"
    variants, n_folds = load_block_cv(block_path)
    docs_dir.mkdir(parents=True, exist_ok=True)
    oof = pool_full_model(variants["full"], n_folds, bootstrap_rounds)
    calibration = fit_calibration(oof.labels, oof.logits)
    cv_vs_final = _cv_vs_final(block_path, study_dir / "final" / "config.json")

    md = _header_section(study_dir)
    md += _metrics_section(oof, docs_dir)
    if baseline is not None:
        md += baseline_section(oof.folds, block_path, Path(baseline))
    md += _calibration_section(oof, calibration, cv_vs_final, docs_dir)
    md += triage_section(variants)
    md += _ablation_section(variants, n_folds, block_path, docs_dir)
    md += _paper_section(study_dir, oof.folds)
    md += _random_split_section(study_dir, oof)
    md += _shortcut_section(study_dir, oof.folds)
    md += _segmentation_section(oof.folds)
    md += _compute_section(study_dir, oof.folds)
    md += _shift_section(oof.folds, load_groups(block_path))
    md += _ood_section(ood)
    (docs_dir / "results.md").write_text("\n".join(md))
    archive_inputs(study_dir, docs_dir / "study")

    calibration_path = write_calibration(
        study_dir / "final" / "calibration.json", calibration,
        fitted_on=f"out-of-fold logits of 'full', block split, folds {oof.fold_list}",
        oof_metrics=_oof_metrics_record(oof),
    )
    return _summary(oof, calibration, docs_dir, calibration_path)
