"""Labelled smear folders in the public release's layouts, cleaned masks, and leakage-aware splits.

Layouts read as they are: ``<root>/Original/<class>/*``, ``<root>/<class>/*``, with the class
folders named as in either public release (``Pro`` or ``[Malignant] Pro-B``). Masks for phase 2
come from the ``Segmented/`` twin of each field (the authors' HSV threshold: noisy) after cleaning.
Benign-vs-malignant folders (``Benign/`` and ``Malignant/``, or the four classes read as two) are
read by :func:`find_binary_samples`; :func:`find_samples` refuses them rather than drop a class.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from hybridcn.profiles import CLASS_NAMES
from preprocessing.stain import background_tint

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
#: Labels of :func:`find_binary_samples`: 0 benign, 1 malignant (any of the three B-ALL subtypes).
BINARY_NAMES = ("Benign", "Malignant")

_CLASS_ALIASES = {
    "benign": "Benign",
    "early": "Early",
    "[malignant] early pre-b": "Early",
    "early pre-b": "Early",
    "pre": "Pre",
    "[malignant] pre-b": "Pre",
    "pre-b": "Pre",
    "pro": "Pro",
    "[malignant] pro-b": "Pro",
    "pro-b": "Pro",
}


class DataLayoutError(ValueError):
    """A data folder is not in a layout that can be read for the task asked (a user error, not a bug)."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    number: int  # file number within its class (consecutive numbers = same slide/session)
    segmented: Path | None = None

    @property
    def class_name(self) -> str:
        return CLASS_NAMES[self.label]


def canonical_class(folder_name: str) -> str | None:
    """``'[Malignant] Pro-B'`` -> ``'Pro'``; ``None`` for a folder that is not a class."""
    return _CLASS_ALIASES.get(folder_name.strip().lower())


def file_number(path: Path) -> int:
    match = re.search(r"(\d+)(?=\.[^.]+$)", path.name)
    return int(match.group(1)) if match else 0


def _class_folders(root: Path) -> dict[str, Path]:
    found = {}
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        name = canonical_class(child.name) if child.is_dir() else None
        if name:
            found[name] = child
    return found


def _image_root(root: Path) -> Path:
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist")
    return root / "Original" if (root / "Original").is_dir() else root


def _subfolder_names(root: Path) -> list[str]:
    return sorted(child.name for child in root.iterdir() if child.is_dir() and not child.name.startswith("."))


def find_samples(root: str | Path) -> list[Sample]:
    """All labelled fields under ``root`` in class order, then file number.

    Raises :class:`DataLayoutError` for a folder without class folders, and for one with a ``Malignant/``
    folder: its fields have no subtype, and scoring the rest alone would silently drop a class.
    """
    root = Path(root)
    image_root = _image_root(root)
    folders = _class_folders(image_root)
    found = _subfolder_names(image_root)
    if any(name.strip().lower() == "malignant" for name in found):
        raise DataLayoutError(
            f"{image_root} holds a Malignant folder: benign-vs-malignant labels, not the four classes "
            f"{', '.join(CLASS_NAMES)}; score it with `hybridcn evaluate --binary`"
        )
    if not folders:
        raise DataLayoutError(
            f"no class folders under {image_root}; expected {', '.join(CLASS_NAMES)} "
            f"(or the public release's '[Malignant] ...' names), found {found or 'no sub-folders'}"
        )
    segmented_root = root / "Segmented" if (root / "Segmented").is_dir() else None
    segmented_folders = _class_folders(segmented_root) if segmented_root else {}
    samples = []
    for name, folder in folders.items():
        label = CLASS_NAMES.index(name)
        for path in sorted(folder.iterdir(), key=lambda p: (file_number(p), p.name)):
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            twin = segmented_folders.get(name, Path("/nonexistent")) / path.name
            samples.append(Sample(path, label, file_number(path), twin if twin.is_file() else None))
    samples.sort(key=lambda s: (s.label, s.number, s.path.name))
    return samples


def binary_label(folder_name: str) -> int | None:
    """0 for a benign folder, 1 for ``Malignant`` or any malignant subtype's folder, ``None`` for others."""
    if folder_name.strip().lower() == "malignant":
        return 1
    name = canonical_class(folder_name)
    return None if name is None else int(name != "Benign")


def find_binary_samples(root: str | Path) -> list[tuple[Path, int]]:
    """``(path, label)`` of every field under ``root`` labelled benign (0) or malignant (1), benign first.

    Folders: ``Benign/`` and ``Malignant/``, or any of the four-class names (``Pro``, ``[Malignant]
    Pro-B``...) with the three subtypes read as malignant; mixed layouts are read too. The sub-folders of
    ``Malignant/`` are read as well (a subtype split below it).
    """
    image_root = _image_root(Path(root))
    found = _subfolder_names(image_root)
    labelled = [(image_root / name, binary_label(name)) for name in found if binary_label(name) is not None]
    if not labelled:
        raise DataLayoutError(f"no benign or malignant folders under {image_root}; expected Benign and Malignant "
                              f"(or the four class names), found {found or 'no sub-folders'}")
    samples = []
    for folder, label in labelled:
        paths = (p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        samples += [(path, label) for path in paths if path.suffix.lower() in IMAGE_SUFFIXES]
    samples.sort(key=lambda s: (s[1], file_number(s[0]), str(s[0])))
    return samples


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"cannot decode {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def clean_mask(
    segmented_rgb: np.ndarray, *, min_component: int = 40, min_fraction: float = 0.01, max_fraction: float = 0.6
) -> tuple[np.ndarray, bool]:
    """Binary cell mask from a ``Segmented/`` field, and whether it is plausible enough to train on.

    Non-black pixels, then closing, hole filling and removal of specks smaller than
    ``min_component`` pixels. Masks covering under ``min_fraction`` (the near-empty Pro masks) or
    over ``max_fraction`` of the field are marked implausible.
    """
    raw = (segmented_rgb.max(axis=2) > 25).astype(np.uint8)
    closed = cv2.morphologyEx(raw, cv2.MORPH_CLOSE, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (7, 7)))
    contours, _ = cv2.findContours(closed, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    filled = np.zeros_like(closed)
    kept = [c for c in contours if cv2.contourArea(c) >= min_component]
    cv2.drawContours(filled, kept, -1, 1, thickness=cv2.FILLED)
    filled = cv2.morphologyEx(filled, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (5, 5)))
    fraction = float(filled.mean())
    return filled.astype(bool), bool(min_fraction <= fraction <= max_fraction)


def content_digest(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def block_groups(samples: list[Sample], *, block: int = 40) -> np.ndarray:
    """Patient stand-in per sample: blocks of ``block`` consecutive file numbers within a class.

    Byte-identical twins are kept in one group (their blocks are merged). Ids are unique across classes
    (``label * 1_000_000 + first block number``); they are the unit of folds and of paired tests.
    """
    groups = np.full(len(samples), -1, dtype=np.int64)
    digests = [content_digest(s.path) for s in samples]
    for label in sorted({s.label for s in samples}):
        indices = [i for i, s in enumerate(samples) if s.label == label]
        parent = {i: (samples[i].number - 1) // block for i in indices}
        union = {b: b for b in parent.values()}

        def find(b: int, union: dict[int, int] = union) -> int:
            while union[b] != b:
                b = union[b]
            return b

        by_digest: dict[str, int] = {}
        for i in indices:
            seen = by_digest.setdefault(digests[i], parent[i])
            union[find(parent[i])] = find(seen)
        for i in indices:
            groups[i] = label * 1_000_000 + find(parent[i])
    return groups


def block_folds(samples: list[Sample], *, folds: int = 5, block: int = 40, seed: int = 0,
                groups: np.ndarray | None = None) -> np.ndarray:
    """Fold index per sample: the :func:`block_groups` of each class shuffled with ``seed`` and dealt
    round-robin, so every class is spread over all folds and no group is split. Pass ``groups`` when
    already computed (it hashes every file)."""
    rng = np.random.default_rng(seed)
    groups = block_groups(samples, block=block) if groups is None else groups
    assignment = np.full(len(samples), -1, dtype=np.int64)
    labels = np.array([s.label for s in samples])
    for label in sorted(set(labels.tolist())):
        roots = np.unique(groups[labels == label])
        order = rng.permutation(len(roots))
        fold_of_root = {int(roots[j]): rank % folds for rank, j in enumerate(order)}
        for i in np.nonzero(labels == label)[0]:
            assignment[i] = fold_of_root[int(groups[i])]
    return assignment


def random_folds(samples: list[Sample], *, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Image-level stratified random folds: LEAKY on this data (near-duplicate neighbours), for comparison only."""
    rng = np.random.default_rng(seed)
    assignment = np.empty(len(samples), dtype=np.int64)
    for label in sorted({s.label for s in samples}):
        indices = np.array([i for i, s in enumerate(samples) if s.label == label])
        assignment[indices[rng.permutation(len(indices))]] = np.arange(len(indices)) % folds
    return assignment


def white_balance_groups(images: np.ndarray) -> np.ndarray:
    """Acquisition look of each raw field ``(N,H,W,3) uint8``: 1 for a yellowish background, 0 for a bluish one.

    In the Taleqani data the two looks follow the class (most Pro-B fields are yellowish, most Pre-B
    fields bluish; consecutive Pre-B files alternate between them), and the shipped model's errors
    cluster on each class's rarer look (MODEL_CARD.md, "Metrics"). Sign of the background's CIE b*
    (:func:`preprocessing.stain.background_tint`).
    """
    return np.array([int(background_tint(image) > 0) for image in images], dtype=np.int64)


def group_balanced_weights(labels: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Sampling weight per field so that, within each class, every group is drawn equally often.

    Each class keeps its total weight (its field count), so class balance is as without it; a class's
    rare acquisition look is drawn as often as its common one. Group reweighting as in Sagawa et al.,
    "Distributionally robust neural networks for group shifts", ICLR 2020, in its simplest form.
    """
    weights = np.zeros(len(labels), dtype=np.float64)
    for label in np.unique(labels):
        in_class = labels == label
        present = np.unique(groups[in_class])
        for group in present:
            members = in_class & (groups == group)
            weights[members] = in_class.sum() / (len(present) * members.sum())
    return weights
