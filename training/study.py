"""One command that does a whole study under a time budget (what a lent GPU session runs):
the final model on all data first (so there is always something to ship), then block cross-validation
with the ablations, the shortcut probe, the leaky random split, and finally a paper-profile fold.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from hybridcn.profiles import Profile, get_profile
from training.experiments import ABLATIONS, HEAD_ONLY, crossvalidate, load_dataset, shortcut_probe
from training.pipeline import TrainOptions, fit_pipeline


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
    if config_path.exists() and json.loads(config_path.read_text())["profile"] != json.loads(
            json.dumps(profile.to_dict())):
        raise ValueError(f"{out_dir} holds a run of another profile; resume it with the same one or use another --out")
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
    (out_dir / "backbones.ckpt").unlink(missing_ok=True)
    log(f"saved {target}")
    return target


def run_study(data_dir: str, out_dir: Path, *, profile: Profile | str, options: TrainOptions, minutes: float,
              masks_file: str | None = None, folds: int = 5, paper_fold: bool = True,
              cv_backbone_epochs: int | None = None) -> None:
    """Final model, then cross-validation in priority order, each step only if the budget allows.

    Order: the full model with the head-only ablations (they reuse its backbones) on every fold; no
    CLAHE/multiscale; the segmentation ablation; one paper-profile fold; no stain normalisation; the
    leaky random split.
    """
    deadline = time.time() + minutes * 60
    log = make_logger(out_dir / "log.txt")
    profile = get_profile(profile) if isinstance(profile, str) else profile
    data = load_dataset(data_dir, profile.image_size, masks_file=masks_file, log=log)
    train_final(data_dir, out_dir / "final", profile, options, masks_file=masks_file, log=log, data=data)
    (out_dir / "shortcuts.json").write_text(json.dumps(shortcut_probe(data, folds=folds), indent=2))
    cv_options = replace(options, backbone_epochs=cv_backbone_epochs or options.backbone_epochs)
    cv_dir = out_dir / "cv"
    head_only = [name for name in ABLATIONS if name in HEAD_ONLY]
    steps: list[tuple[Profile, TrainOptions, Path, list[str], str, int]] = [
        (profile, cv_options, cv_dir, ["full", *head_only], "block", folds),
        # first: on a CPU fold-0 run at 112 px it beat the full model by 1.9 points (MODEL_CARD.md)
        (profile, cv_options, cv_dir, ["no_clahe_multiscale"], "block", folds),
        (profile, cv_options, cv_dir, ["no_segmentation"], "block", folds),
    ]
    if paper_fold:
        paper_options = replace(cv_options, batch_size=min(options.batch_size, 96),
                                seg_epochs=max(4, options.seg_epochs // 2),
                                backbone_epochs=min(cv_options.backbone_epochs, 10))
        steps.append((get_profile("paper"), paper_options, out_dir / "cv_paper", ["full"], "block", 1))
    steps += [
        (profile, cv_options, cv_dir, ["no_stain_normalization"], "block", folds),
        (profile, cv_options, cv_dir, ["full"], "random", folds),
    ]
    for step_profile, step_options, step_dir, variants, split, step_folds in steps:
        if time.time() > deadline:
            log(f"budget spent; skipped {variants} ({split})")
            continue
        crossvalidate(data, step_profile, step_options, step_dir, variants=variants, folds=folds, split=split,
                      deadline=deadline, log=log, max_folds=step_folds)
    log("study finished")
