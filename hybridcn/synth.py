"""Deterministic synthetic blood-smear fields for tests and demos (never a stand-in for real data).

A field is a pale background with red cells (pink discs with central pallor) and one to three
lymphoid cells whose morphology follows the four classes: Benign hematogones are small with a dense
round nucleus; Early Pre-B blasts are medium with fine chromatin and a thin rim; Pre-B blasts are
larger with an indented nucleus and a nucleolus; Pro-B blasts are the largest, with an irregular
cleaved nucleus and vacuolated cytoplasm. Each field comes with its label and its lymphoid mask.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hybridcn.profiles import CLASS_NAMES

# radius range of the whole cell, nucleus/cell ratio, nucleus irregularity, nucleoli, vacuoles
_MORPHOLOGY = {
    "Benign": dict(radius=(11, 14), nc=0.85, irregular=0.0, nucleoli=0, vacuoles=0, chromatin=40),
    "Early": dict(radius=(15, 19), nc=0.82, irregular=0.05, nucleoli=0, vacuoles=0, chromatin=10),
    "Pre": dict(radius=(19, 23), nc=0.75, irregular=0.18, nucleoli=1, vacuoles=0, chromatin=18),
    "Pro": dict(radius=(23, 28), nc=0.65, irregular=0.32, nucleoli=2, vacuoles=4, chromatin=25),
}


@dataclass(frozen=True)
class SyntheticField:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    mask: np.ndarray  # (H, W) uint8, 255 = lymphoid cell
    label: int


def _blob(rng: np.random.Generator, center, radius: float, irregular: float, points: int = 24) -> np.ndarray:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    wobble = 1 + irregular * np.sin(angles * rng.integers(2, 4) + rng.uniform(0, 2 * np.pi))
    wobble *= 1 + 0.04 * rng.standard_normal(points)
    xs = center[0] + radius * wobble * np.cos(angles)
    ys = center[1] + radius * wobble * np.sin(angles)
    return np.stack([xs, ys], axis=1).round().astype(np.int32)


def synth_field(label: int, *, seed: int, size: int = 224) -> SyntheticField:
    """One deterministic field of class ``CLASS_NAMES[label]`` (same seed, same pixels)."""
    rng = np.random.default_rng([seed, label])
    morphology = _MORPHOLOGY[CLASS_NAMES[label]]
    background = np.array([236, 222, 226]) + rng.integers(-8, 9, 3)
    image = np.empty((size, size, 3), np.float32)
    image[:] = background
    mask = np.zeros((size, size), np.uint8)
    for _ in range(int(rng.integers(12, 22))):  # red cells
        center = rng.uniform(0, size, 2)
        radius = rng.uniform(7, 10) * size / 224
        color = np.array([214, 150, 160]) + rng.integers(-10, 10, 3)
        cv2.circle(image, tuple(int(v) for v in center), int(radius), color.tolist(), -1, cv2.LINE_AA)
        cv2.circle(image, tuple(int(v) for v in center), int(radius * 0.45), (color * 0.5 + background * 0.5).tolist(),
                   -1, cv2.LINE_AA)
    for _ in range(int(rng.integers(1, 4))):  # lymphoid cells
        radius = rng.uniform(*morphology["radius"]) * size / 224
        center = rng.uniform(radius + 2, size - radius - 2, 2)
        cytoplasm = np.array([170, 170, 215]) + rng.integers(-12, 12, 3)
        outline = _blob(rng, center, radius, 0.05)
        cv2.fillPoly(image, [outline], cytoplasm.tolist(), cv2.LINE_AA)
        cv2.fillPoly(mask, [outline], 255)
        offset = rng.uniform(-0.1, 0.1, 2) * radius
        nucleus = _blob(rng, center + offset, radius * morphology["nc"], morphology["irregular"])
        nucleus_color = np.array([95, 55, 140]) + rng.integers(-10, 10, 3)
        cv2.fillPoly(image, [nucleus], nucleus_color.tolist(), cv2.LINE_AA)
        for _ in range(morphology["nucleoli"]):
            spot = center + offset + rng.uniform(-0.35, 0.35, 2) * radius
            cv2.circle(image, tuple(int(v) for v in spot), max(2, int(radius * 0.12)), (140, 110, 185), -1,
                       cv2.LINE_AA)
        for _ in range(morphology["vacuoles"]):
            angle = rng.uniform(0, 2 * np.pi)
            spot = center + 0.82 * radius * np.array([np.cos(angle), np.sin(angle)])
            cv2.circle(image, tuple(int(v) for v in spot), max(1, int(radius * 0.08)), (225, 220, 240), -1,
                       cv2.LINE_AA)
    grain = rng.normal(0, morphology["chromatin"] / 10.0, (size, size, 1)).astype(np.float32)
    image = cv2.GaussianBlur(image + grain, (0, 0), sigmaX=0.8)
    image += rng.normal(0, 2.0, image.shape).astype(np.float32)
    return SyntheticField(image=np.clip(image, 0, 255).round().astype(np.uint8), mask=mask, label=label)


def write_dataset(out_dir: str | Path, *, per_class: int = 8, size: int = 224, seed: int = 0) -> Path:
    """Write ``Original/<class>/*.png`` and ``Segmented/<class>/*.png`` like the public release, plus labels.csv."""
    out = Path(out_dir)
    rows = []
    for label, name in enumerate(CLASS_NAMES):
        (out / "Original" / name).mkdir(parents=True, exist_ok=True)
        (out / "Segmented" / name).mkdir(parents=True, exist_ok=True)
        for index in range(per_class):
            field = synth_field(label, seed=seed * 100_003 + index, size=size)
            filename = f"SYN-{name}-{index + 1:03d}.png"
            bgr = cv2.cvtColor(field.image, cv2.COLOR_RGB2BGR)
            cv2.imwrite(str(out / "Original" / name / filename), bgr)
            segmented = np.where(field.mask[..., None] > 0, bgr, 0).astype(np.uint8)
            cv2.imwrite(str(out / "Segmented" / name / filename), segmented)
            rows.append((f"Original/{name}/{filename}", name))
    with open(out / "labels.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label"])
        writer.writerows(rows)
    return out
