"""The four phases of HybridCN-NAS trained on one split, with the same modules that are exported and served.

Phase 1 runs :func:`preprocessing.preprocess_field` (the gateway's code) on every field; phase 2
trains the Attention U-Net on cleaned masks; phase 3 trains ConvNeXt and NASNet-A from scratch on
the segmented fields (a linear probe per backbone and one on the concatenation give the gradient);
phase 4 z-scores the concatenated features, selects K with mRMR inside the training split only, and
trains the multi-head self-attention classifier.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from timm.scheduler import CosineLRScheduler
from torch import nn

from hybridcn.profiles import Profile
from models import FeatureStage, HeadStage, SegmentationStage, create_model, segmentation_stage
from models.stages import uint8_to_normalized
from preprocessing import PreprocessConfig, StainReference, enhance_field, fit_stain_reference
from preprocessing.normalize import fit_zscore
from preprocessing.stain import foreground_mask
from training.augment import acquisition_views, augment_batch, replace_background
from training.data import group_balanced_weights, white_balance_groups
from training.mrmr import mrmr_select

Log = Callable[[str], None]


@dataclass
class TrainOptions:
    seg_epochs: int = 12
    backbone_epochs: int = 30
    head_epochs: int = 150
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    # phase 4's own; None keeps ``label_smoothing`` (the shipped recipe). 0 keeps the head's top probability
    # informative for the review threshold (Xia et al., ICLR 2025; MODEL_CARD.md)
    head_label_smoothing: float | None = None
    feature_views: int = 2  # augmented passes added to the clean one when extracting head-training features
    seed: int = 0
    use_segmentation: bool = True
    use_convnext: bool = True
    use_nasnet: bool = True
    use_mrmr: bool = True
    head: str = "mhsa_head"
    background_augment: float = 0.0  # share of training fields whose background is repainted (0 = off)
    balance_acquisition: bool = False  # draw each class's yellow- and blue-background fields equally often
    look_augment: float = 0.0  # share of training fields re-focused and re-saturated (0 = off)
    stain_views: int = 0  # stain- and camera-shifted copies of each raw field, drawn from per batch (0 = off)
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1)))
    progress: bool = True

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainedModel:
    profile: Profile
    reference: StainReference
    segmentation: SegmentationStage
    features: FeatureStage
    head: HeadStage
    history: dict = field(default_factory=dict)

    def state_dicts(self) -> dict:
        return {
            "profile": self.profile.to_dict(),
            "reference": self.reference.to_dict(),
            "use_mask": self.segmentation.use_mask,
            "feature_parts": [self.features.features.convnext is not None, self.features.features.nasnet is not None],
            "head_name": type(self.head.head).__name__,
            "head_k": int(self.head.head.selection.index.numel()),
            "segmentation": self.segmentation.state_dict(),
            "features": self.features.state_dict(),
            "head": self.head.state_dict(),
            "history": self.history,
        }


def seed_everything(seed: int) -> None:
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


def _progress(iterable, total: int, description: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=description, leave=False, dynamic_ncols=True, mininterval=2.0)


def _enhance_one(args: tuple[np.ndarray, StainReference, PreprocessConfig]) -> np.ndarray:
    rgb, reference, config = args
    return enhance_field(rgb, reference, config)


def preprocess_all(
    images: np.ndarray, reference: StainReference, config: PreprocessConfig, *, workers: int = 1
) -> np.ndarray:
    """Phase 1 on a stack of fields ``(N,H,W,3) uint8`` with the served preprocessing code."""
    jobs = [(image, reference, config) for image in images]
    if workers <= 1 or len(images) < 64:
        return np.stack([_enhance_one(job) for job in jobs])
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(_enhance_one, jobs, chunksize=32)))


def background_keep(preprocessed: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """Where :func:`~training.augment.replace_background` must not paint: the stained matter of each
    phase-1 field. The scale-bar box is painted too: phase 1 fills it with the field's own background
    colour, so a repainted field keeps none of its old background (a served field would not either)."""
    return np.stack([foreground_mask(field, corner_fraction=config.corner_fraction) for field in preprocessed])


def _augment(images: torch.Tensor, keep: torch.Tensor | None, index: torch.Tensor | slice, options: TrainOptions,
             generator: torch.Generator, masks: torch.Tensor | None = None):
    """The training batch ``index``: background repainted (if ``options`` asks), then :func:`augment_batch`.

    ``images`` of shape ``(V, N, H, W, 3)`` holds V phase-1 versions of each field (the clean one and
    :func:`~training.augment.acquisition_views`); each field of the batch comes from one drawn at random.
    """
    if images.ndim == 5:
        count = len(range(*index.indices(images.shape[1]))) if isinstance(index, slice) else len(index)
        view = (torch.rand(count, generator=generator) * images.shape[0]).long().to(images.device)
        rows = torch.arange(images.shape[1], device=images.device)[index]
        batch = images[view, rows]
    else:
        batch = images[index]
    if keep is not None:
        batch = replace_background(batch, keep[index], probability=options.background_augment, generator=generator)
    return augment_batch(batch, masks, generator=generator, look=options.look_augment)


def _epoch_order(count: int, generator: torch.Generator, weights: torch.Tensor | None) -> torch.Tensor:
    """One epoch's field indices: a permutation, or ``count`` draws with replacement by ``weights``."""
    if weights is None:
        return torch.randperm(count, generator=generator)
    return torch.multinomial(weights, count, replacement=True, generator=generator)


def _autocast(device: str):
    if device.startswith("cuda"):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def cosine_schedule(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> CosineLRScheduler:
    """timm's cosine schedule, stepped per update: linear warmup over ``warmup`` updates, then cosine decay to 0.

    Call ``step_update(step)`` before update ``step`` (0-based; ``total`` updates in all). The warmup keeps
    the first updates of networks trained from scratch small; it starts at lr / warmup rather than 0, so no
    update is wasted, and reaches the optimizer's lr at update ``warmup - 1``. The decay reaches 0 one update
    after the last, so the last update still learns. Build it before loading a checkpoint: timm takes the
    lr it finds in the optimizer as the peak, and a resumed optimizer holds a decayed one.
    """
    base_lr = optimizer.param_groups[0]["lr"]
    warmup_updates = max(0, warmup - 1)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, total - warmup_updates), lr_min=0.0, warmup_t=warmup_updates,
        warmup_lr_init=base_lr / max(1, warmup), warmup_prefix=True, t_in_epochs=False,
    )


#: What a run directory keeps while its training is unfinished, so an interrupted run resumes where it stopped.
SEGMENTATION_CHECKPOINT = "segmentation.ckpt"
BACKBONE_CHECKPOINT = "backbones.ckpt"


def remove_checkpoints(run_dir: Path) -> None:
    """Drop the resume files of a finished training (the saved model replaces them)."""
    for name in (SEGMENTATION_CHECKPOINT, BACKBONE_CHECKPOINT):
        (run_dir / name).unlink(missing_ok=True)


def save_atomically(state: dict, path: Path) -> None:
    """``torch.save`` through a temporary file, so a run killed mid-write leaves the previous checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


class TrainingClock:
    """Seconds of training that survive a resume: checkpoints record them, a resumed run continues from them.

    The model card reports how long a recipe takes; a run resumed after an interruption would otherwise
    count only its last part.
    """

    def __init__(self) -> None:
        self._start = time.time()

    def seconds(self) -> float:
        return time.time() - self._start

    def resume_at(self, seconds: float) -> None:
        """Continue counting from ``seconds`` (what the interrupted run had spent up to its checkpoint)."""
        self._start = time.time() - seconds


def dice_iou(probability: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    predicted = probability >= 0.5
    target = target >= 0.5
    intersection = (predicted & target).sum().item()
    total = predicted.sum().item() + target.sum().item()
    union = (predicted | target).sum().item()
    return (2 * intersection / total if total else 1.0), (intersection / union if union else 1.0)


def train_segmentation(
    images: torch.Tensor, masks: torch.Tensor, profile: Profile, options: TrainOptions, log: Log,
    generator: torch.Generator, keep: torch.Tensor | None = None,
) -> SegmentationStage:
    """Phase 2: Attention U-Net on cleaned masks, BCE + soft Dice."""
    stage = segmentation_stage(profile).to(options.device).to(memory_format=torch.channels_last)
    unet = stage.unet
    optimizer = torch.optim.AdamW(unet.parameters(), lr=options.lr, weight_decay=1e-4)
    steps_per_epoch = max(1, len(images) // options.batch_size)
    schedule = cosine_schedule(optimizer, steps_per_epoch, steps_per_epoch * options.seg_epochs)
    step = 0
    unet.train()
    for epoch in range(options.seg_epochs):
        order = torch.randperm(len(images), generator=generator)
        running = 0.0
        for batch_index in _progress(range(steps_per_epoch), steps_per_epoch, f"unet {epoch + 1}", options.progress):
            index = order[batch_index * options.batch_size : (batch_index + 1) * options.batch_size].to(images.device)
            batch, target = _augment(images, keep, index, options, generator, masks[index])
            schedule.step_update(step)
            with _autocast(options.device):
                logits, _ = stage.mask_logits(uint8_to_normalized(batch).contiguous(memory_format=torch.channels_last))
            logits = logits.float()[:, 0]
            target = target.float()
            probability = torch.sigmoid(logits)
            overlap = 2 * (probability * target).sum((1, 2)) + 1
            soft_dice = 1 - overlap / (probability.sum((1, 2)) + target.sum((1, 2)) + 1)
            loss = F.binary_cross_entropy_with_logits(logits, target) + soft_dice.mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            running += loss.item()
            step += 1
        log(f"segmentation epoch {epoch + 1}/{options.seg_epochs} loss {running / steps_per_epoch:.4f}")
    unet.eval()
    return stage


class BackboneTrainer(nn.Module):
    """HybridCN-NAS backbones with linear probes (concatenation + one per backbone) for end-to-end training."""

    def __init__(self, features: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.features = features
        self.joint = nn.Linear(features.num_features, num_classes)
        self.parts = nn.ModuleList(
            nn.Linear(width, num_classes) for width in (features.convnext_dim, features.nasnet_dim) if width
        )

    def forward(self, segmented: torch.Tensor) -> list[torch.Tensor]:
        parts = self.features.forward_parts(segmented)
        outputs = [self.joint(torch.cat(parts, dim=1))]
        if len(parts) > 1:
            outputs += [probe(part) for probe, part in zip(self.parts, parts, strict=True)]
        return outputs


def train_backbones(
    segmentation: SegmentationStage, images: torch.Tensor, labels: torch.Tensor, profile: Profile,
    options: TrainOptions, log: Log, generator: torch.Generator, checkpoint: Path | None = None,
    keep: torch.Tensor | None = None, sample_weights: torch.Tensor | None = None, clock: TrainingClock | None = None,
) -> FeatureStage:
    """Phase 3: ConvNeXt + NASNet-A from scratch on segmented, augmented fields (drawn by ``sample_weights``)."""
    features = create_model(
        "hybrid_features", profile, use_convnext=options.use_convnext, use_nasnet=options.use_nasnet
    )
    trainer = BackboneTrainer(features, len(profile.classes)).to(options.device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(trainer.parameters(), lr=options.lr, weight_decay=options.weight_decay)
    fields = images.shape[-4]  # images may hold several phase-1 versions of each field (see _augment)
    steps_per_epoch = max(1, fields // options.batch_size)
    schedule = cosine_schedule(optimizer, steps_per_epoch, steps_per_epoch * options.backbone_epochs)
    start_epoch = 0
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, map_location=options.device, weights_only=False)
        trainer.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        generator.set_state(state["generator"])
        if "torch_rng" in state:  # checkpoints written before torch_rng was stored lack it
            torch.set_rng_state(state["torch_rng"])
        if clock is not None and state.get("seconds") is not None:
            clock.resume_at(state["seconds"])
        start_epoch = state["epoch"]
        log(f"backbones resumed from {checkpoint} at epoch {start_epoch}")
    class_counts = torch.bincount(labels.cpu(), minlength=len(profile.classes)).float()
    class_weight = (class_counts.sum() / (len(class_counts) * class_counts.clamp(min=1))).to(options.device)
    for epoch in range(start_epoch, options.backbone_epochs):
        trainer.train()
        order = _epoch_order(fields, generator, sample_weights)
        running, correct, seen = 0.0, 0, 0
        batches = _progress(range(steps_per_epoch), steps_per_epoch, f"backbones {epoch + 1}", options.progress)
        for batch_index in batches:
            index = order[batch_index * options.batch_size : (batch_index + 1) * options.batch_size].to(images.device)
            batch, _ = _augment(images, keep, index, options, generator)
            target = labels[index]
            with torch.no_grad():
                _, _, segmented = segmentation(batch)
            schedule.step_update(epoch * steps_per_epoch + batch_index)
            with _autocast(options.device):
                outputs = trainer(segmented.contiguous(memory_format=torch.channels_last))
            losses = [
                F.cross_entropy(o.float(), target, weight=class_weight, label_smoothing=options.label_smoothing)
                for o in outputs
            ]
            loss = losses[0] + 0.5 * sum(losses[1:])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(trainer.parameters(), 5.0)
            optimizer.step()
            running += loss.item()
            correct += (outputs[0].argmax(1) == target).sum().item()
            seen += len(target)
        log(f"backbone epoch {epoch + 1}/{options.backbone_epochs} loss {running / steps_per_epoch:.4f} "
            f"train-acc {correct / max(seen, 1):.4f}")
        if checkpoint is not None:
            save_atomically({"model": trainer.state_dict(), "optimizer": optimizer.state_dict(),
                              "generator": generator.get_state(), "torch_rng": torch.get_rng_state(),
                              "seconds": clock.seconds() if clock is not None else None, "epoch": epoch + 1},
                             checkpoint)
    features.eval()
    return FeatureStage(features)


@torch.no_grad()
def extract_features(
    segmentation: SegmentationStage, features: FeatureStage, images: torch.Tensor, batch_size: int,
    device: str, *, augment: TrainOptions | None = None, generator: torch.Generator | None = None,
    keep: torch.Tensor | None = None,
) -> np.ndarray:
    """Pooled features of every field; ``augment`` (the run's options) draws one augmented view instead
    (``images`` as in :func:`_augment`; without ``augment`` they must be one version, ``(N,H,W,3)``)."""
    out = []
    for start in range(0, images.shape[-4], batch_size):
        if augment is not None:
            batch, _ = _augment(images, keep, slice(start, start + batch_size), augment, generator)
        else:
            batch = images[start : start + batch_size]
        _, _, segmented = segmentation(batch)
        with _autocast(device):
            out.append(features(segmented.contiguous(memory_format=torch.channels_last)).float().cpu())
    return torch.cat(out).numpy()


def head_k(profile: Profile, width: int, use_mrmr: bool) -> int:
    """K selected features: the profile's K capped at the width, a multiple of the token size."""
    token = profile.head.token_dim
    k = width if not use_mrmr else min(profile.head.mrmr_k, width)
    return max(token, (k // token) * token)


def train_head(
    train_features: np.ndarray, train_labels: np.ndarray, profile: Profile, options: TrainOptions, log: Log,
    generator: torch.Generator, *, columns: np.ndarray | None = None, clean_rows: int | None = None,
    sample_weights: np.ndarray | None = None,
) -> HeadStage:
    """Phase 4: z-score (training split), mRMR to K, then the MHSA (or MLP) classifier."""
    width = train_features.shape[1]
    columns = np.arange(width) if columns is None else columns
    k = head_k(profile, len(columns), options.use_mrmr)
    mean, std = fit_zscore(train_features)
    clean = train_features[: clean_rows or len(train_features)]
    clean_labels = train_labels[: clean_rows or len(train_labels)]
    standardized = (clean[:, columns] - mean[columns]) / std[columns]
    if options.use_mrmr:
        chosen = columns[mrmr_select(standardized, clean_labels, k, device=options.device)]
    else:
        chosen = columns[:k]
    head = create_model(options.head, profile, num_features=width, k=k).to(options.device)
    head.selection.set_statistics(mean, std, chosen)
    x = torch.as_tensor(train_features, dtype=torch.float32, device=options.device)
    y = torch.as_tensor(train_labels, dtype=torch.int64, device=options.device)
    weights = None if sample_weights is None else torch.as_tensor(sample_weights, dtype=torch.float64)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-3, weight_decay=0.05)
    smoothing = options.label_smoothing if options.head_label_smoothing is None else options.head_label_smoothing
    batch = 128
    steps_per_epoch = max(1, len(x) // batch)
    schedule = cosine_schedule(optimizer, steps_per_epoch, steps_per_epoch * options.head_epochs)
    for epoch in range(options.head_epochs):
        head.train()
        order = _epoch_order(len(x), generator, weights).to(options.device)
        for i in range(steps_per_epoch):
            index = order[i * batch : (i + 1) * batch]
            schedule.step_update(epoch * steps_per_epoch + i)
            selected = head.selection(x[index])
            selected = selected + 0.1 * torch.randn_like(selected)  # feature noise regularises the head
            logits, _ = head.forward_selected(selected)
            loss = F.cross_entropy(logits, y[index], label_smoothing=smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        if (epoch + 1) % max(1, options.head_epochs // 5) == 0:
            log(f"head epoch {epoch + 1}/{options.head_epochs} loss {loss.item():.4f}")
    head.eval()
    return HeadStage(head)


def fit_pipeline(
    raw_images: np.ndarray, masks: np.ndarray, mask_ok: np.ndarray, labels: np.ndarray, profile: Profile,
    options: TrainOptions, log: Log, *, run_dir: Path | None = None,
    reuse: TrainedModel | None = None,
) -> TrainedModel:
    """Train all four phases on one training split (``raw_images`` are decoded, un-preprocessed fields).

    ``reuse`` lends an earlier model's segmentation and backbones (for the head-only ablations).
    """
    seed_everything(options.seed)
    generator = torch.Generator().manual_seed(options.seed)
    history: dict = {"options": options.to_dict()}
    clock = TrainingClock()
    reference = reuse.reference if reuse is not None else fit_stain_reference(
        raw_images[:: max(1, len(raw_images) // 400)], corner_fraction=profile.preprocess.corner_fraction,
        lightness_threshold=profile.preprocess.stain_lightness_threshold)
    pre = preprocess_all(raw_images, reference, profile.preprocess, workers=options.workers)
    images = torch.as_tensor(pre).to(options.device)
    # phase 3 and the head's augmented views draw from these; the U-Net and the clean features see ``images``
    viewed = images
    if options.stain_views > 0:
        shifted = [preprocess_all(view, reference, profile.preprocess, workers=options.workers)
                   for view in acquisition_views(raw_images, views=options.stain_views, seed=options.seed)]
        viewed = torch.as_tensor(np.stack([pre, *shifted])).to(options.device)
        log(f"phase 1: {options.stain_views} stain- and camera-shifted copies of every field")
    keep = (torch.as_tensor(background_keep(pre, profile.preprocess)).to(options.device)
            if options.background_augment > 0 else None)
    weights = None
    if options.balance_acquisition:
        groups = white_balance_groups(raw_images)
        weights = group_balanced_weights(labels, groups)
        counts = {name: [int(((labels == c) & (groups == g)).sum()) for g in (0, 1)]
                  for c, name in enumerate(profile.classes)}
        history["white_balance_groups"] = counts
        log(f"balancing acquisition looks per class, [bluish, yellowish] fields: {counts}")
    if reuse is not None:
        segmentation, features = reuse.segmentation, reuse.features
    else:
        log(f"phase 1: preprocessed {len(pre)} fields in {clock.seconds():.1f}s")
        usable = np.nonzero(mask_ok)[0]
        history["segmentation_training_masks"] = {"kept": int(len(usable)), "total": int(len(mask_ok))}
        segmentation_checkpoint = run_dir / SEGMENTATION_CHECKPOINT if run_dir is not None else None
        if segmentation_checkpoint is not None and segmentation_checkpoint.exists():
            state = torch.load(segmentation_checkpoint, map_location=options.device, weights_only=False)
            segmentation = segmentation_stage(profile).to(options.device).to(memory_format=torch.channels_last)
            segmentation.load_state_dict(state["model"])
            segmentation.eval()
            generator.set_state(state["generator"])
            torch.set_rng_state(state["torch_rng"])
            clock.resume_at(state["seconds"])
            log(f"phase 2 resumed from {segmentation_checkpoint}")
        else:
            mask_tensor = torch.as_tensor(masks[usable].astype(np.uint8)).to(options.device)
            usable_index = torch.as_tensor(usable).to(options.device)
            segmentation = train_segmentation(images[usable_index], mask_tensor, profile, options, log, generator,
                                              keep=None if keep is None else keep[usable_index] | mask_tensor.bool())
            if segmentation_checkpoint is not None:
                save_atomically({"model": segmentation.state_dict(), "generator": generator.get_state(),
                                  "torch_rng": torch.get_rng_state(), "seconds": clock.seconds()},
                                 segmentation_checkpoint)
        segmentation.use_mask = options.use_segmentation
        log(f"phase 2 done at {clock.seconds():.1f}s")
        label_tensor = torch.as_tensor(labels, dtype=torch.int64).to(options.device)
        checkpoint = run_dir / BACKBONE_CHECKPOINT if run_dir is not None else None
        features = train_backbones(segmentation, viewed, label_tensor, profile, options, log, generator, checkpoint,
                                   keep=keep, sample_weights=None if weights is None else torch.as_tensor(weights),
                                   clock=clock)
        log(f"phase 3 done at {clock.seconds():.1f}s")
    views = [extract_features(segmentation, features, images, 2 * options.batch_size, options.device)]
    for _ in range(options.feature_views):
        views.append(extract_features(segmentation, features, viewed, 2 * options.batch_size, options.device,
                                      augment=options, generator=generator, keep=keep))
    train_features = np.concatenate(views)
    train_labels = np.tile(labels, len(views))
    columns = None
    extractor = features.features
    if reuse is not None and (not options.use_convnext or not options.use_nasnet):
        columns = (np.arange(extractor.convnext_dim) if options.use_convnext
                   else np.arange(extractor.convnext_dim, extractor.num_features))
    head = train_head(train_features, train_labels, profile, options, log, generator, columns=columns,
                      clean_rows=len(labels), sample_weights=None if weights is None else np.tile(weights, len(views)))
    history["train_seconds"] = clock.seconds()
    log(f"phase 4 done at {clock.seconds():.1f}s")
    return TrainedModel(profile, reference, segmentation, features, head, history)


@torch.no_grad()
def predict(model: TrainedModel, raw_images: np.ndarray, options: TrainOptions) -> dict[str, np.ndarray]:
    """Logits, probabilities, masks for raw fields, through exactly the served stages."""
    pre = preprocess_all(raw_images, model.reference, model.profile.preprocess, workers=options.workers)
    images = torch.as_tensor(pre).to(options.device)
    logits_all, masks_all = [], []
    batch = 2 * options.batch_size
    for start in range(0, len(images), batch):
        mask, _, segmented = model.segmentation(images[start : start + batch])
        with _autocast(options.device):
            feats = model.features(segmented.contiguous(memory_format=torch.channels_last)).float()
        logits, _ = model.head.head(feats)
        logits_all.append(logits.float().cpu())
        masks_all.append(mask.cpu())
    logits = torch.cat(logits_all).numpy()
    return {"logits": logits, "probabilities": torch.softmax(torch.as_tensor(logits), 1).numpy(),
            "masks": torch.cat(masks_all).numpy(), "preprocessed": pre}


def load_trained(path: Path, device: str = "cpu") -> TrainedModel:
    """Rebuild a :class:`TrainedModel` from ``model.pt`` written by :meth:`TrainedModel.state_dicts`."""
    state = torch.load(path, map_location=device, weights_only=False)
    profile = Profile.from_dict(state["profile"])
    use_convnext, use_nasnet = state["feature_parts"]
    segmentation = segmentation_stage(profile, use_mask=state["use_mask"])
    segmentation.load_state_dict(state["segmentation"])
    features = FeatureStage(create_model("hybrid_features", profile, use_convnext=use_convnext, use_nasnet=use_nasnet))
    features.load_state_dict(state["features"])
    head_name = "mhsa_head" if state["head_name"] == "MHSAHead" else "mlp_head"
    head = HeadStage(create_model(head_name, profile, num_features=features.features.num_features, k=state["head_k"]))
    head.load_state_dict(state["head"])
    model = TrainedModel(profile, StainReference.from_dict(state["reference"]), segmentation.eval().to(device),
                         features.eval().to(device), head.eval().to(device), state.get("history", {}))
    return model
