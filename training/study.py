"""One command that does a whole study under a time budget (what a lent GPU machine runs):
the final model on all data first (so there is always something to ship), then block cross-validation
with the ablations, the shortcut probe, the leaky random split, and finally a paper-profile fold.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import torch

from hybridcn.profiles import Profile, get_profile
from training.experiments import ABLATIONS, HEAD_ONLY, crossvalidate, load_dataset, shortcut_probe
from training.pipeline import TrainOptions, fit_pipeline, remove_checkpoints


def make_logger(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a", buffering=1)

    def log(message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} {message}"
        print(line, flush=True)
        handle.write(line + "\n")

    return log


def train_final(data_dir: str, out_dir: Path, profile: Profile | str, options: TrainOptions, *,
                masks_file: str | None = None, log=print, data=None) -> Path:
    """Train on every field of ``data_dir``; writes ``out_dir/model.pt`` and ``config.json`` (resumable)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    profile = get_profile(profile) if isinstance(profile, str) else profile
    config_path = out_dir / "config.json"
    if config_path.exists():
        # read through from_dict: a run written before a profile field existed gets that field's default
        saved = Profile.from_dict(json.loads(config_path.read_text())["profile"])
        if saved.to_json_dict() != profile.to_json_dict():
            raise ValueError(f"{out_dir} holds a run of another profile; resume it with the same one "
                             "or use another --out")
    target = out_dir / "model.pt"
    if target.exists():
        log(f"{target} exists; final model already trained")
        return target
    (out_dir / "config.json").write_text(json.dumps({"profile": profile.to_dict(), "options": options.to_dict(),
                                                      "data": str(data_dir)}, indent=2))
    data = data or load_dataset(data_dir, profile.image_size, masks_file=masks_file, log=log)
    model = fit_pipeline(data.images, data.masks, data.mask_ok, data.labels, profile, options, log, run_dir=out_dir)
    state = model.state_dicts()
    state["history"]["n_train"] = int(len(data.labels))
    torch.save(state, target)
    config = json.loads(config_path.read_text())
    config["train_seconds"] = model.history["train_seconds"]  # the report's compute section reads it here
    config_path.write_text(json.dumps(config, indent=2))
    remove_checkpoints(out_dir)
    log(f"saved {target}")
    return target


class StudyStep(NamedTuple):
    """One cross-validation call of a study: these variants of this profile on ``max_folds`` folds of a split."""

    profile: Profile
    options: TrainOptions
    out_dir: Path
    variants: list[str]
    split: str
    max_folds: int


def plan_study(profile: Profile, cv_options: TrainOptions, out_dir: Path, *, folds: int = 5, paper_fold: bool = True,
               variants: list[str] | None = None) -> list[StudyStep]:
    """The cross-validation steps of a study, in priority order.

    The full model with the head-only ablations (they reuse its backbones) on every fold; CLAHE and
    multiscale switched (off, or on for a profile without them); the segmentation ablation; one
    paper-profile fold; no stain normalisation; the leaky random split. ``variants`` keeps only those
    (a CPU run affords ``["full"]``); the paper fold counts as ``full``.
    """
    unknown = sorted(set(variants or ()) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {sorted(ABLATIONS)}")
    cv_dir = out_dir / "cv"
    head_only = [name for name in ABLATIONS if name in HEAD_ONLY]
    enhance_ablation = "no_clahe_multiscale" if profile.preprocess.enhance else "with_clahe_multiscale"
    steps = [
        StudyStep(profile, cv_options, cv_dir, ["full", *head_only], "block", folds),
        # early: on CPU fold-0 runs at 112 px, CLAHE/multiscale off beat on by 1.9 and 3.6 points (MODEL_CARD.md)
        StudyStep(profile, cv_options, cv_dir, [enhance_ablation], "block", folds),
        StudyStep(profile, cv_options, cv_dir, ["no_segmentation"], "block", folds),
    ]
    if paper_fold:
        paper_options = replace(cv_options, batch_size=min(cv_options.batch_size, 96),
                                seg_epochs=max(4, cv_options.seg_epochs // 2),
                                backbone_epochs=min(cv_options.backbone_epochs, 10))
        steps.append(StudyStep(get_profile("paper"), paper_options, out_dir / "cv_paper", ["full"], "block", 1))
    steps += [
        StudyStep(profile, cv_options, cv_dir, ["no_stain_normalization"], "block", folds),
        StudyStep(profile, cv_options, cv_dir, ["full"], "random", folds),
    ]
    if variants is not None:
        steps = [step._replace(variants=[name for name in step.variants if name in variants]) for step in steps]
    return [step for step in steps if step.variants]


def run_study(data_dir: str, out_dir: Path, *, profile: Profile | str, options: TrainOptions, minutes: float,
              masks_file: str | None = None, folds: int = 5, paper_fold: bool = True,
              cv_backbone_epochs: int | None = None, variants: list[str] | None = None) -> None:
    """Final model, the shortcut probe, then the steps of :func:`plan_study`, each only if the budget allows."""
    profile = get_profile(profile) if isinstance(profile, str) else profile
    cv_options = replace(options, backbone_epochs=cv_backbone_epochs or options.backbone_epochs)
    steps = plan_study(profile, cv_options, out_dir, folds=folds, paper_fold=paper_fold, variants=variants)
    deadline = time.time() + minutes * 60
    log = make_logger(out_dir / "log.txt")
    data = load_dataset(data_dir, profile.image_size, masks_file=masks_file, log=log)
    train_final(data_dir, out_dir / "final", profile, options, masks_file=masks_file, log=log, data=data)
    (out_dir / "shortcuts.json").write_text(json.dumps(shortcut_probe(data, folds=folds), indent=2))
    for step in steps:
        if time.time() > deadline:
            log(f"budget spent; skipped {step.variants} ({step.split})")
            continue
        crossvalidate(data, step.profile, step.options, step.out_dir, variants=step.variants, folds=folds,
                      split=step.split, deadline=deadline, log=log, max_folds=step.max_folds)
    log("study finished")
