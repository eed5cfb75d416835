"""Runs built from the pipeline: the final model on all data, block cross-validation with ablations,
the leaky random split for comparison with the paper, and the shortcut audit.

Every run writes JSON as it goes, so a run cut short by a deadline still leaves its results.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import cv2
import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from hybridcn.profiles import Profile
from preprocessing import fit_field
from preprocessing.shifts import SHIFTS, shift_field
from preprocessing.stain import background_colour, corner_box, foreground_mask
from training.data import Sample, block_folds, block_groups, clean_mask, find_samples, random_folds, read_rgb
from training.metrics import classification_metrics
from training.pipeline import (
    TrainedModel,
    TrainOptions,
    dice_iou,
    fit_pipeline,
    load_trained,
    predict,
    remove_checkpoints,
    save_atomically,
)

Log = Callable[[str], None]

#: Ablations of the paper's components; each is (what changes in preprocessing, in training options).
ABLATIONS: dict[str, tuple[dict, dict]] = {
    "full": ({}, {}),
    "no_stain_normalization": ({"stain_normalize": False}, {}),
    "no_clahe_multiscale": ({"enhance": False}, {}),
    # the paper's CLAHE + multiscale put back, for a profile that runs without them (compact)
    "with_clahe_multiscale": ({"enhance": True}, {}),
    "flat_background": ({"flatten_background": True}, {}),
    "clahe_cells_only": ({"clahe_cells_only": True}, {}),
    "no_segmentation": ({}, {"use_segmentation": False}),
    "convnext_only": ({}, {"use_nasnet": False}),
    "nasnet_only": ({}, {"use_convnext": False}),
    "no_mrmr": ({}, {"use_mrmr": False}),
    "mlp_head": ({}, {"head": "mlp_head"}),
    # label smoothing bounds the head's logits and degrades the ranking the review threshold relies on
    # (Xia et al., ICLR 2025); head-only, so the backbones keep theirs
    "head_no_label_smoothing": ({}, {"head_label_smoothing": 0.0}),
    # the converse, for a recipe whose head runs without: the head smoothed like the backbones (ε = 0.1)
    "head_label_smoothing": ({}, {"head_label_smoothing": None}),
}
#: Ablations that reuse the full model's segmentation and backbones and retrain only phase 4.
HEAD_ONLY = {"convnext_only", "nasnet_only", "no_mrmr", "mlp_head", "head_no_label_smoothing", "head_label_smoothing"}


@dataclass
class Dataset:
    samples: list[Sample]
    images: np.ndarray  # (N,H,W,3) uint8, decoded and fitted to the profile size
    masks: np.ndarray  # (N,H,W) bool, cleaned Segmented/ masks
    mask_ok: np.ndarray  # (N,) bool
    labels: np.ndarray  # (N,) int64


def load_dataset(root: str | Path, size: int, *, masks_file: str | Path | None = None, log: Log = print) -> Dataset:
    """Decode every field; masks come from ``Segmented/`` or from a cache written by :func:`write_mask_cache`."""
    samples = find_samples(root)
    images = np.stack([fit_field(read_rgb(s.path), size) for s in samples])
    labels = np.array([s.label for s in samples], dtype=np.int64)
    if masks_file is not None and Path(masks_file).exists():
        cache = np.load(masks_file)
        names = list(cache["names"])
        position = {name: i for i, name in enumerate(names)}
        rows = [position.get(f"{s.class_name}/{s.path.name}") for s in samples]
        packed = cache["masks"]
        shape = tuple(cache["shape"])
        masks = np.stack([np.unpackbits(packed[r])[: shape[0] * shape[1]].reshape(shape).astype(bool)
                          if r is not None else np.zeros(shape, bool) for r in rows])
        mask_ok = np.array([bool(cache["ok"][r]) if r is not None else False for r in rows])
    else:
        masks_list, ok_list = [], []
        for s in samples:
            if s.segmented is None:
                masks_list.append(np.zeros((size, size), bool))
                ok_list.append(False)
                continue
            mask, ok = clean_mask(fit_field(read_rgb(s.segmented), size))
            masks_list.append(mask)
            ok_list.append(ok)
        masks, mask_ok = np.stack(masks_list), np.array(ok_list)
    masks = np.stack([cv2.resize(m.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST).astype(bool)
                      if m.shape != (size, size) else m for m in masks])
    log(f"loaded {len(samples)} fields from {root}; {int(mask_ok.sum())} masks usable for phase 2")
    return Dataset(samples, images, masks, mask_ok, labels)


def write_mask_cache(root: str | Path, out: str | Path, size: int = 224) -> dict:
    """Clean every ``Segmented/`` mask once and store them bit-packed (to move data to a GPU machine)."""
    samples = find_samples(root)
    names, packed, ok = [], [], []
    for s in samples:
        if s.segmented is None:
            continue
        mask, plausible = clean_mask(fit_field(read_rgb(s.segmented), size))
        names.append(f"{s.class_name}/{s.path.name}")
        packed.append(np.packbits(mask.reshape(-1)))
        ok.append(plausible)
    np.savez_compressed(out, names=np.array(names), masks=np.stack(packed), ok=np.array(ok),
                        shape=np.array([size, size]))
    return {"masks": len(names), "plausible": int(np.sum(ok))}


def variant_setup(profile: Profile, options: TrainOptions, variant: str) -> tuple[Profile, TrainOptions]:
    pre_changes, option_changes = ABLATIONS[variant]
    variant_profile = profile.with_changes(preprocess=replace(profile.preprocess, **pre_changes))
    return variant_profile, replace(options, **option_changes)


def _save_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def crossvalidate(
    data: Dataset, profile: Profile, options: TrainOptions, out_dir: Path, *, variants: list[str],
    folds: int = 5, split: str = "block", deadline: float | None = None, log: Log = print,
    max_folds: int | None = None, fold_order: list[int] | None = None,
) -> dict:
    """Out-of-fold predictions and per-fold metrics of every variant; resumable from ``out_dir/cv.json``.

    Folds run in ``fold_order`` (default ``0..folds-1``), the first ``max_folds`` of it: a recipe
    trial can start on its hardest fold, and a later call with the same setup fills in the rest.
    """
    order = list(range(folds)) if fold_order is None else list(fold_order)
    if len(set(order)) != len(order) or not set(order) <= set(range(folds)):
        raise ValueError(f"fold_order must list distinct folds out of 0..{folds - 1}, got {order}")
    out_dir.mkdir(parents=True, exist_ok=True)
    results_path = out_dir / f"cv_{split}.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {"split": split, "folds": {}}
    setup = json.loads(json.dumps({  # as it reads back from the file
        "profile": profile.to_json_dict(),
        "options": {k: v for k, v in options.to_dict().items() if k not in ("device", "workers", "progress")}}))
    stored = results.setdefault("setup", setup)
    # an option or profile field added after a fold was trained had its default value then
    defaults = json.loads(json.dumps(TrainOptions().to_dict()))
    try:
        stored_profile = Profile.from_dict(stored["profile"]).to_json_dict()
    except (KeyError, TypeError):  # a field since removed or renamed
        stored_profile = stored["profile"]
    if (stored_profile != setup["profile"]
            or {k: defaults[k] for k in setup["options"]} | stored["options"] != setup["options"]):
        raise ValueError(f"{results_path} holds folds trained with another profile or options; "
                         "resume with the same ones or write to another folder")
    groups = block_groups(data.samples)  # also the unit of the report's block-level paired tests
    assignment = (block_folds(data.samples, folds=folds, groups=groups) if split == "block"
                  else random_folds(data.samples, folds=folds))
    results["assignment"] = assignment.tolist()
    results["labels"] = data.labels.tolist()
    results["groups"] = groups.tolist()
    _save_json(results_path, results)
    for fold in order[: max_folds or len(order)]:
        fold_key = str(fold)
        fold_results = results["folds"].setdefault(fold_key, {})
        train = assignment != fold
        test = assignment == fold
        if not test.any():
            continue
        full_model: TrainedModel | None = None
        for variant in variants:
            if variant in fold_results:
                continue
            if deadline is not None and time.time() > deadline:
                log(f"deadline reached before fold {fold} {variant}; stopping")
                _save_json(results_path, results)
                return results
            variant_profile, variant_options = variant_setup(profile, options, variant)
            reuse = None
            if variant in HEAD_ONLY:
                if full_model is None:
                    full_model = _fold_full_model(data, profile, options, out_dir, split, fold, train, test,
                                                  fold_results, log)
                reuse = full_model
            started = time.time()
            log(f"[{split} fold {fold}] training {variant}")
            # backbone epochs are checkpointed: a fold whose run was stopped resumes mid-training
            run_dir = None if reuse is not None else _fold_run_dir(out_dir, split, fold, variant)
            model = fit_pipeline(data.images[train], data.masks[train], data.mask_ok[train], data.labels[train],
                                 variant_profile, variant_options, log, reuse=reuse, run_dir=run_dir)
            prediction = predict(model, data.images[test], variant_options)
            metrics = classification_metrics(data.labels[test], prediction["probabilities"])
            entry = {"metrics": metrics, "logits": prediction["logits"].tolist(),
                     "index": np.nonzero(test)[0].tolist(), "seconds": time.time() - started,
                     # the training alone, the part before an interruption included
                     "train_seconds": model.history["train_seconds"]}
            if variant == "full" or ABLATIONS[variant][0]:  # the full model and every preprocessing variant
                entry["shortcut_robustness"] = background_swap_accuracy(model, data, test, variant_options)
            if variant == "full":
                entry["shifted_logits"] = shifted_logits(model, data, test, variant_options)
                full_model = model
                _save_model(model, full_checkpoint(out_dir, split, fold))
                test_masks = data.masks[test]
                ok = data.mask_ok[test]
                if ok.any():
                    dice, iou = dice_iou(torch.as_tensor(prediction["masks"][ok]).float() / 255.0,
                                         torch.as_tensor(test_masks[ok]).float())
                    entry["segmentation"] = {"dice": dice, "iou": iou, "n": int(ok.sum())}
            fold_results[variant] = entry
            if run_dir is not None:
                remove_checkpoints(run_dir)
                run_dir.rmdir()
            log(f"[{split} fold {fold}] {variant}: acc {metrics['accuracy']:.4f} mcc {metrics['mcc']:.4f} "
                f"auc {metrics['macro_auc']:.4f} ({time.time() - started:.0f}s)")
            _save_json(results_path, results)
    return results


def full_checkpoint(out_dir: Path, split: str, fold: int) -> Path:
    """Where :func:`crossvalidate` keeps a fold's full model, so head-only ablations can be added later."""
    return out_dir / "models" / f"{split}_fold{fold}_full.pt"


def _fold_run_dir(out_dir: Path, split: str, fold: int, variant: str) -> Path:
    """Where a fold's unfinished training keeps its backbone checkpoint (removed once the fold is scored)."""
    path = out_dir / "models" / f"{split}_fold{fold}_{variant}_training"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _save_model(model: TrainedModel, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(model.state_dicts(), path)


def _fold_full_model(data: Dataset, profile: Profile, options: TrainOptions, out_dir: Path, split: str, fold: int,
                     train: np.ndarray, test: np.ndarray, fold_results: dict, log: Log) -> TrainedModel:
    """The fold's full model for the head-only ablations: its checkpoint, or retrained with the same seed.

    A retrained model should reproduce the stored full entry (same seed, data and code); its held-out
    accuracy is recorded next to the stored one so a drift (other hardware, other library versions) shows.
    """
    path = full_checkpoint(out_dir, split, fold)
    if path.exists():
        log(f"[{split} fold {fold}] full model from {path}")
        return load_trained(path, options.device)
    log(f"[{split} fold {fold}] retraining full (same seed) for the head-only ablations")
    full_profile, full_options = variant_setup(profile, options, "full")
    model = fit_pipeline(data.images[train], data.masks[train], data.mask_ok[train], data.labels[train],
                         full_profile, full_options, log)
    _save_model(model, path)
    if "full" in fold_results:
        predicted = predict(model, data.images[test], full_options)["probabilities"].argmax(1)
        accuracy = float((predicted == data.labels[test]).mean())
        fold_results["full"]["retrained_accuracy"] = accuracy
        log(f"[{split} fold {fold}] retrained full: acc {accuracy:.4f} "
            f"(stored {fold_results['full']['metrics']['accuracy']:.4f})")
    return model


#: Seed of the stain and camera shifts scored on every fold's held-out fields.
SHIFT_SEED = 0


def shifted_logits(model: TrainedModel, data: Dataset, test: np.ndarray, options: TrainOptions, *,
                   seed: int = SHIFT_SEED) -> dict[str, list]:
    """Logits of the held-out fields under each seeded stain and camera shift (:mod:`preprocessing.shifts`).

    Each field is read again at its own size, shifted there (as a lab's stain or camera would change it,
    and as ``hybridcn evaluate --shift`` does) and then fitted to the model's size; the amount is drawn
    from the seed and the field's index in the dataset. ``hybridcn report`` turns these into the shift
    benchmark of the out-of-fold fields, calibrated as the clean ones are.
    """
    indices = np.nonzero(test)[0]
    originals = [read_rgb(data.samples[i].path) for i in indices]
    size = model.profile.image_size
    out: dict[str, list] = {"seed": seed}
    for kind in SHIFTS:
        fields = np.stack([fit_field(shift_field(rgb, kind, seed=seed, field=int(i))[0], size)
                           for rgb, i in zip(originals, indices, strict=True)])
        out[kind] = predict(model, fields, options)["logits"].tolist()
    return out


def background_swap_accuracy(model: TrainedModel, data: Dataset, test: np.ndarray, options: TrainOptions) -> dict:
    """Accuracy on held-out fields as they are, with the corner box blanked, and with the background changed.

    ``background_replaced`` paints the background one flat neutral colour; ``background_recoloured`` keeps
    its texture but moves its median colour onto the median background of another class's fields (class
    ``c`` gets class ``c+1``'s), the shortcut a model reading acquisition colour would fall for; the share
    of fields then predicted as that other class is reported too. A model that does not read the
    background keeps its accuracy in all three.
    """
    images = data.images[test]
    labels = data.labels[test]
    masks = [foreground_mask(image) for image in images]
    medians = np.array([background_colour(image, foreground=mask) for image, mask in zip(images, masks, strict=True)])
    class_background = {c: np.median(medians[labels == c], axis=0) for c in np.unique(labels)}
    present = sorted(class_background)
    other = np.array([present[(present.index(c) + 1) % len(present)] for c in labels])
    blanked, replaced, recoloured = images.copy(), images.copy(), images.copy()
    neutral = np.array([235, 230, 235], np.uint8)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        rows, cols = corner_box(image.shape, corner_fraction=model.profile.preprocess.corner_fraction)
        blanked[i, rows, cols] = 0
        replaced[i][~mask] = neutral
        shift = class_background[other[i]] - medians[i]
        recoloured[i][~mask] = np.clip(image[~mask] + shift, 0, 255).round().astype(np.uint8)
    out = {}
    for name, batch in (("as_is", images), ("corner_blanked", blanked), ("background_replaced", replaced),
                        ("background_recoloured", recoloured)):
        predicted = predict(model, batch, options)["probabilities"].argmax(1)
        out[name] = float((predicted == labels).mean())
        if name == "background_recoloured":
            out["recoloured_predicted_as_donor_class"] = float((predicted == other).mean())
    return out


def shortcut_probe(data: Dataset, *, folds: int = 5) -> dict:
    """How well acquisition artefacts alone predict the class, under the same block split.

    Background colour: the median RGB of the non-stained pixels; corner: the scale-bar box
    downsampled to 8x8 RGB. A logistic regression on each; block-fold accuracy reported.
    """
    background, corner = [], []
    for image in data.images:
        background.append(background_colour(image))
        rows, cols = corner_box(image.shape, corner_fraction=(0.12, 0.3))
        corner.append(cv2.resize(image[rows, cols], (8, 8), interpolation=cv2.INTER_AREA).reshape(-1))
    assignment = block_folds(data.samples, folds=folds)
    out = {}
    for name, features in (("background_colour", np.array(background)), ("scale_bar_corner", np.array(corner))):
        correct = 0
        for fold in range(folds):
            train, test = assignment != fold, assignment == fold
            if not test.any() or len(np.unique(data.labels[train])) < 2:
                continue
            scaler = StandardScaler().fit(features[train])
            classifier = LogisticRegression(max_iter=2000).fit(scaler.transform(features[train]), data.labels[train])
            correct += (classifier.predict(scaler.transform(features[test])) == data.labels[test]).sum()
        out[name] = {"block_cv_accuracy": float(correct / len(data.labels))}
    out["chance_accuracy"] = float(np.bincount(data.labels).max() / len(data.labels))
    return out
