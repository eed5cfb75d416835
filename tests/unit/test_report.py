"""The study report on a small synthetic study, and the paired tests on examples with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from preprocessing.shifts import SHIFTS
from training.report import (
    FoldResult,
    block_paired_test,
    crossfit_calibration,
    final_training_seconds,
    pool,
    write_report,
)
from training.stats import format_pvalue, paired_tests, wilcoxon_min_pvalue

N_FIELDS = 200
N_FOLDS = 5


def _logits(rng: np.random.Generator, labels: np.ndarray, *, strength: float,
            error_rate: float) -> np.ndarray:
    """Overconfident logits: the right class (or, for ``error_rate`` of fields, a wrong one) pushed up."""
    predicted = labels.copy()
    flip = rng.random(len(labels)) < error_rate
    predicted[flip] = (labels[flip] + rng.integers(1, 4, flip.sum())) % 4
    logits = rng.normal(0, 1, (len(labels), 4))
    logits[np.arange(len(labels)), predicted] += strength
    return logits


def _cv(rng: np.random.Generator, labels: np.ndarray, assignment: np.ndarray,
        variants: dict[str, list[int]]) -> dict:
    # fold 3 started but empty, fold 4 absent: what a study cut short by its budget leaves
    folds: dict[str, dict] = {"3": {}}
    for variant, fold_list in variants.items():
        for fold in fold_list:
            index = np.nonzero(assignment == fold)[0]
            entry = {"metrics": {}, "index": index.tolist(), "seconds": 10.0 + fold,
                     "logits": _logits(rng, labels[index], strength=6.0,
                                       error_rate=0.1 if variant == "full" else 0.2).tolist()}
            if variant == "full":
                entry["shortcut_robustness"] = {"as_is": 0.9, "corner_blanked": 0.9,
                                                "background_replaced": 0.7}
                entry["segmentation"] = {"dice": 0.85, "iou": 0.74, "n": len(index)}
            folds.setdefault(str(fold), {})[variant] = entry
    return {"split": "block", "assignment": assignment.tolist(), "labels": labels.tolist(), "folds": folds,
            "groups": (np.arange(len(labels)) // 5).tolist()}


def _study(tmp_path: Path, *, extras: bool = True, random_split: bool = False) -> Path:
    rng = np.random.default_rng(0)
    labels = np.arange(N_FIELDS) % 4
    assignment = (np.arange(N_FIELDS) // 10) % N_FOLDS
    study = tmp_path / "study"
    (study / "cv").mkdir(parents=True)
    (study / "final").mkdir()
    cv = _cv(rng, labels, assignment, {"full": [0, 1, 2], "mlp_head": [0, 1], "no_mrmr": [0]})
    (study / "cv" / "cv_block.json").write_text(json.dumps(cv))
    if random_split:
        leaky = _cv(rng, labels, assignment, {"full": [0, 1, 2, 3, 4]})
        leaky["split"] = "random"
        (study / "cv" / "cv_random.json").write_text(json.dumps(leaky))
    if extras:
        (study / "shortcuts.json").write_text(json.dumps({"background_colour": {"block_cv_accuracy": 0.6},
                                                          "scale_bar_corner": {"block_cv_accuracy": 0.5},
                                                          "chance_accuracy": 0.25}))
        (study / "final" / "config.json").write_text(json.dumps({"profile": {"name": "compact"},
                                                                 "options": {"backbone_epochs": 40}}))
        (study / "log.txt").write_text("05:44:59 phase 2 done at 17.0s\n05:48:13 phase 4 done at 210.9s\n"
                                       "05:50:07 phase 4 done at 106.9s\n")
    return study


def test_write_report_writes_tables_plots_and_calibration(tmp_path: Path) -> None:
    study = _study(tmp_path)
    docs = tmp_path / "docs"

    summary = write_report(study, docs, bootstrap_rounds=50)

    for name in ("results.md", "reliability.png", "confusion_matrix.png", "ablation.png"):
        assert (docs / name).stat().st_size > 0, name
    assert "folds 0, 1, 2 of 5" in summary
    calibration = json.loads((study / "final" / "calibration.json").read_text())
    assert calibration["temperature"] > 1.0  # the synthetic logits are overconfident
    assert 0.0 <= calibration["review_threshold"] <= 1.0
    assert 0.0 <= calibration["review_fraction"] <= 1.0
    assert calibration["target_precision"] == 0.995
    assert calibration["ece_after"] < calibration["ece_before"]
    assert calibration["oof_metrics"]["n"] == 120  # 3 folds of 40 fields
    assert calibration["oof_metrics"]["folds"] == [0, 1, 2]
    low, high = calibration["oof_metrics"]["intervals_95"]["accuracy"]
    assert low <= calibration["oof_metrics"]["accuracy"] <= high

    results = (docs / "results.md").read_text()
    assert "n/a (1 paired fold)" in results  # no_mrmr has fold 0 only: no p-value invented
    assert "smallest reachable p with 2 pairs is 0.5" in results  # mlp_head pairs on folds 0 and 1
    assert "Not run (no `cv/cv_random.json`)" in results
    assert "### Paired over blocks" in results
    assert "| mlp_head | 0, 1 | 16 |" in results  # two folds of 40 fields, blocks of 5
    assert "| 0 | 40 | 0.8500 | 0.7400 |" in results
    assert "210 s" in results or "211 s" in results
    # full (3 folds) and mlp_head (2 folds) are triaged; no_mrmr has one fold, too few to leave one out
    triage = results.split("### Triage by variant")[1].split("\n## ")[0]
    assert "| full | 0, 1, 2 |" in triage and "| mlp_head | 0, 1 |" in triage
    assert "no_mrmr" not in triage


def test_the_archived_inputs_reproduce_the_report(tmp_path: Path) -> None:
    study = _study(tmp_path, random_split=True)
    cv_path = study / "cv" / "cv_block.json"
    cv = json.loads(cv_path.read_text())
    clean = np.asarray(cv["folds"]["0"]["full"]["logits"])
    cv["folds"]["0"]["full"]["shifted_logits"] = {"seed": 0, **{kind: (clean * 0.9).tolist() for kind in SHIFTS}}
    cv_path.write_text(json.dumps(cv))
    docs = tmp_path / "docs"
    write_report(study, docs, bootstrap_rounds=50)

    archive = docs / "study"
    assert json.loads((archive / "shortcuts.json").read_text()) == json.loads((study / "shortcuts.json").read_text())
    for name in ("cv/cv_block.json", "cv/cv_random.json"):
        stored, original = json.loads((archive / name).read_text()), json.loads((study / name).read_text())
        assert len((archive / name).read_text()) < 0.7 * len((study / name).read_text())
        for fold, variants in original["folds"].items():
            for variant, entry in variants.items():
                kept = stored["folds"][fold][variant]
                pairs = [(kept.pop("logits"), entry.pop("logits"))]
                for kind in SHIFTS if "shifted_logits" in entry else ():
                    pairs.append((kept["shifted_logits"].pop(kind), entry["shifted_logits"].pop(kind)))
                for rounded, full in pairs:
                    rounded, full = np.asarray(rounded), np.asarray(full)
                    assert np.abs(rounded - full).max() <= 5e-5 and np.array_equal(np.round(rounded, 4), rounded)
                assert kept == entry, (name, fold, variant)  # everything but the logits is kept as it was
    config = json.loads((archive / "final" / "config.json").read_text())
    assert config.pop("train_seconds") == 210.9  # from the study's log, which is not archived
    assert config == json.loads((study / "final" / "config.json").read_text())
    assert not (archive / "log.txt").exists()  # logs and checkpoints stay in the run folder

    write_report(archive, tmp_path / "again", bootstrap_rounds=50)
    assert (tmp_path / "again" / "results.md").read_text() == (docs / "results.md").read_text()
    assert not (archive / "study").exists()  # reporting an archive into its own docs folder copies nothing
    write_report(archive, docs, bootstrap_rounds=50)
    assert not (archive / "study").exists()


@pytest.mark.parametrize(
    ("study_options", "expected"),
    [
        ({"random_split": True}, ["Random split (leaky)", "folds 0, 1, 2, 3, 4 of 5"]),  # leaky comparison
        ({"extras": False}, ["not recorded", "Not run (no `cv_paper/cv_block.json`)"]),  # optional inputs absent
    ],
)
def test_write_report_sections_follow_the_inputs(tmp_path: Path, study_options: dict, expected: list[str]) -> None:
    study = _study(tmp_path, **study_options)

    write_report(study, tmp_path / "docs", bootstrap_rounds=20)

    results = (tmp_path / "docs" / "results.md").read_text()
    for text in expected:
        assert text in results


def test_write_report_rejects_a_study_without_block_cv(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no block cross-validation results"):
        write_report(tmp_path, tmp_path / "docs")


def test_write_report_rejects_a_study_without_a_full_fold(tmp_path: Path) -> None:
    (tmp_path / "cv").mkdir()
    (tmp_path / "cv" / "cv_block.json").write_text(json.dumps({"labels": [0, 1], "assignment": [0, 1],
                                                               "folds": {"0": {}}}))
    with pytest.raises(ValueError, match="completed 'full' entry"):
        write_report(tmp_path, tmp_path / "docs")


def test_crossfit_calibration_needs_two_folds(tmp_path: Path) -> None:
    from training.report import load_cv

    study = _study(tmp_path)
    variants, _ = load_cv(study / "cv" / "cv_block.json")
    labels, logits, fold_ids = pool(variants["full"])
    assert crossfit_calibration(labels[fold_ids == 0], logits[fold_ids == 0], fold_ids[fold_ids == 0]) is None
    result = crossfit_calibration(labels, logits, fold_ids)
    assert 0.0 <= result["review_fraction"] <= 1.0


def test_final_training_seconds_prefers_the_final_config_over_the_log(tmp_path: Path) -> None:
    assert final_training_seconds(tmp_path) is None
    (tmp_path / "log.txt").write_text("phase 4 done at 210.9s\nphase 4 done at 106.9s\n")
    assert final_training_seconds(tmp_path) is None  # fold trials only: no final model to time
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "model.pt").write_bytes(b"")
    assert final_training_seconds(tmp_path) == pytest.approx(210.9)  # older studies: the first phase 4 line
    (tmp_path / "final" / "config.json").write_text(json.dumps({"profile": {}, "train_seconds": 2215.2}))
    assert final_training_seconds(tmp_path) == pytest.approx(2215.2)  # a fold trained before it cannot mislead


def test_paired_tests_known_example() -> None:
    # differences 1, 2, 3, 4: t = 2.5 / (1.29099 / 2) = 3.873 with 3 df; exact Wilcoxon p = 2 / 2^4
    result = paired_tests([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 0.0, 0.0])
    assert result.n == 4
    assert result.mean_difference == pytest.approx(2.5)
    assert result.t_pvalue == pytest.approx(0.030466, abs=1e-5)
    assert result.wilcoxon_pvalue == pytest.approx(0.125)
    assert "smallest reachable p with 4 pairs" in result.wilcoxon_note


def test_paired_tests_clear_difference_gives_small_p() -> None:
    reference = np.linspace(0.90, 0.94, 8)
    variant = reference - np.linspace(0.05, 0.12, 8)
    result = paired_tests(variant, reference)
    assert result.t_pvalue < 1e-3
    assert result.wilcoxon_pvalue == pytest.approx(2 / 2**8)
    assert result.wilcoxon_note == ""


def test_paired_tests_identical_samples_give_no_p_value() -> None:
    result = paired_tests([0.9, 0.8, 0.85], [0.9, 0.8, 0.85])
    assert result.t_pvalue is None and result.wilcoxon_pvalue is None
    assert result.t_note == "n/a (no difference in any fold)"


def test_paired_tests_too_few_pairs_or_constant_shift() -> None:
    single = paired_tests([0.97], [0.95])
    assert single.t_pvalue is None and single.t_note == "n/a (1 paired fold)"
    assert single.mean_difference == pytest.approx(0.02)
    shifted = paired_tests([0.91, 0.92, 0.93], [0.90, 0.91, 0.92])
    assert shifted.t_pvalue is None and shifted.t_note == "n/a (differences have zero spread)"
    assert shifted.wilcoxon_pvalue == pytest.approx(0.25)


def test_paired_tests_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="equal length"):
        paired_tests([0.9, 0.8], [0.9])
    with pytest.raises(ValueError, match="finite"):
        paired_tests([0.9, float("nan")], [0.9, 0.8])
    with pytest.raises(ValueError, match="n must be >= 1, got 0"):
        wilcoxon_min_pvalue(0)


def test_wilcoxon_floor_and_pvalue_format() -> None:
    assert wilcoxon_min_pvalue(3) == pytest.approx(0.25)
    assert wilcoxon_min_pvalue(1) == 1.0
    assert format_pvalue(None, "n/a (1 paired fold)") == "n/a (1 paired fold)"
    assert format_pvalue(0.0304663) == "0.0305"
    assert format_pvalue(1e-7) == "<1e-4"
    assert format_pvalue(0.5, "floor 0.5") == "0.5 (floor 0.5)"


def _fold(fold: int, index: np.ndarray, labels: np.ndarray, predicted: np.ndarray) -> FoldResult:
    logits = np.eye(4)[predicted] * 5.0
    return FoldResult(fold, index, labels, logits, {}, {})


def test_block_paired_test_pairs_blocks_of_the_shared_folds() -> None:
    labels = np.arange(80) % 4
    groups = np.arange(80) // 4  # 20 blocks of 4 fields
    index = [np.arange(40), np.arange(40, 80)]
    wrong = (labels + 1) % 4
    # the full model is right everywhere; the variant misses the first field of every block of fold 0
    variant_pred = labels.copy()
    variant_pred[0:40:4] = wrong[0:40:4]
    full = {f: _fold(f, index[f], labels[index[f]], labels[index[f]]) for f in (0, 1)}
    variant = {0: _fold(0, index[0], labels[index[0]], variant_pred[index[0]])}

    comparison = block_paired_test(variant, full, groups)

    assert comparison.folds == [0] and comparison.blocks == 10
    assert comparison.variant_accuracy == 0.75 and comparison.full_accuracy == 1.0
    assert comparison.test.n == 10 and comparison.test.mean_difference == -0.25
    assert comparison.test.wilcoxon_pvalue < 0.01  # ten blocks all worse: significant, unlike 1 fold
    assert block_paired_test({}, full, groups) is None
    with pytest.raises(ValueError, match="different fields"):
        block_paired_test({0: _fold(0, index[1], labels[index[1]], labels[index[1]])}, full, groups)


def test_a_baseline_study_is_compared_fold_by_fold_and_over_blocks(tmp_path: Path) -> None:
    study = _study(tmp_path / "new")
    baseline = _study(tmp_path / "old", extras=False)
    # the baseline's full model: a weaker recipe on folds 0 and 1 only
    cv = json.loads((baseline / "cv" / "cv_block.json").read_text())
    rng = np.random.default_rng(1)
    labels = np.asarray(cv["labels"])
    cv["folds"] = {str(f): {"full": {**cv["folds"][str(f)]["full"], "logits": _logits(
        rng, labels[cv["folds"][str(f)]["full"]["index"]], strength=6.0, error_rate=0.5).tolist()}} for f in (0, 1)}
    cv["setup"] = {"options": {"backbone_epochs": 10, "batch_size": 64, "lr": 0.002}}
    (baseline / "cv" / "cv_block.json").write_text(json.dumps(cv))

    write_report(study, tmp_path / "docs", bootstrap_rounds=20, baseline=baseline)

    results = (tmp_path / "docs" / "results.md").read_text()
    assert "### Against the baseline study `study`" in results
    assert "10 backbone epochs, batch 64" in results and "the 2 folds both finished" in results
    assert "paired over 16 blocks" in results  # folds 0 and 1: 80 fields in blocks of 5
    pooled = results.split("Pooled over those folds: accuracy ")[1]
    before, after = (float(text.split("%")[0]) for text in pooled.split(" → "))
    assert after - before > 20  # error rate 0.1 against 0.5

    cv["assignment"] = cv["assignment"][::-1]
    (baseline / "cv" / "cv_block.json").write_text(json.dumps(cv))
    with pytest.raises(ValueError, match="not the same fields and folds"):
        write_report(study, tmp_path / "docs", bootstrap_rounds=20, baseline=baseline)


def test_the_shift_benchmark_is_reported_calibrated_on_the_other_folds(tmp_path: Path) -> None:
    study = _study(tmp_path)
    write_report(study, tmp_path / "before", bootstrap_rounds=20)
    assert "No shifted scores stored" in (tmp_path / "before" / "results.md").read_text()
    cv_path = study / "cv" / "cv_block.json"
    cv = json.loads(cv_path.read_text())
    rng = np.random.default_rng(5)
    labels = np.asarray(cv["labels"])

    for fold in ("0", "1", "2"):
        entry = cv["folds"][fold]["full"]
        clean = np.asarray(entry["logits"])
        shifted = {kind: clean.tolist() for kind in SHIFTS}  # no kind moves a field...
        blue = clean.copy()
        wrong = rng.random(len(blue)) < 0.25  # ...but blue: a quarter of the fields go to another class
        index = np.asarray(entry["index"])
        blue[wrong, (labels[index][wrong] + 1) % 4] += 20.0
        shifted["hue_blue"] = blue.tolist()
        entry["shifted_logits"] = {"seed": 0, **shifted}
    cv_path.write_text(json.dumps(cv))
    write_report(study, tmp_path / "after", bootstrap_rounds=20)
    section = (tmp_path / "after" / "results.md").read_text().split("## 9. Stain and camera shifts")[1]
    assert "Folds 0, 1, 2 (120 fields)" in section and "leaving one fold out" in section
    rows = {line.split("|")[1].strip(): line.split("|")[2:-1] for line in section.splitlines() if line.startswith("| ")}
    assert rows["contrast"][1].strip() == "+0.00" and rows["contrast"][0] == rows["none"][0]
    assert float(rows["hue blue"][1]) > 15  # the drop in points


def test_the_served_models_ood_check_is_tabulated(tmp_path: Path) -> None:
    study = _study(tmp_path)
    report = {"fitted_on": {"data": "taleqani", "n": 2519}, "held_out_in_distribution_flagged": 0.026,
              "probes": {"zoom_in_2x": {"n": 150, "flagged": 0.867, "flagged_as_out_of_distribution": 0.23,
                                        "rescaled": 0.72}},
              "probes_flagged": 0.952, "method": "Mahalanobis"}
    write_report(study, tmp_path / "docs", bootstrap_rounds=20, ood=report)
    section = (tmp_path / "docs" / "results.md").read_text().split("## 10. Out-of-distribution")[1]
    assert "| held-out in-distribution fields |  | 2.6% |" in section
    assert "| zoom in 2x | 150 | 86.7% | 23.0% | 72.0% |" in section and "| all probes |  | 95.2% |" in section
    write_report(study, tmp_path / "none", bootstrap_rounds=20)
    assert "No check given" in (tmp_path / "none" / "results.md").read_text()
