"""Occlusion evidence: which parts of a field the served model's call depends on.

Zeiler MD, Fergus R. "Visualizing and understanding convolutional networks". ECCV 2014, section 4.2
(occlusion sensitivity). Each window of the preprocessed field is painted with the field's own
background colour ("nothing here") and the whole served pipeline (U-Net gate, backbones, head) runs
again; the evidence at a pixel is the mean fall, over the windows that cover it, of the predicted
class's margin: the log of its probability over the runner-up's, which is the logit difference divided
by the temperature. The margin and not the probability, because a confident call stays at 0.99 when a
region it rests on is hidden, while its margin falls. It is faithful by construction: it measures what
hiding a region does to the answer, where a gradient map only estimates it. It costs one extra
inference per window (49 at the defaults), so the gateway computes it on request (``?explain=true``,
the web page) and batch runs do not.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from export.repository import MAX_BATCH
from preprocessing.stain import background_colour

#: Window side and stride as fractions of the field side: 7 x 7 overlapping windows of a quarter field.
WINDOW_FRACTION = 0.25
STRIDE_FRACTION = 0.125
#: A peak fall of the margin (natural log units) below this is drawn dim, not stretched to full colour.
MIN_PEAK = 0.1
#: The smallest normal float32: softmax outputs below it are 0 or denormal (flushed on some runtimes).
FLOOR = 1.1754944e-38


@dataclass(frozen=True)
class Evidence:
    """The occlusion map of one field and what it was computed for."""

    values: np.ndarray  # (H, W) float32: mean fall of the class margin when the pixel is hidden (may be < 0)
    label_index: int  # the class whose margin was followed
    base_margin: float  # log(p_class / p_runner_up) with nothing hidden
    peak: float  # the largest fall when one window is hidden (>= the map's maximum, a mean over windows)

    def to_uint8(self) -> np.ndarray:
        """The map for display: 0 where hiding helps or changes nothing, 255 at the map's maximum.

        The full colour range is used when hiding some window lowers the margin by at least
        :data:`MIN_PEAK`; below that the map stays dim, so noise is not drawn as evidence.
        """
        scale = float(self.values.max()) if self.peak >= MIN_PEAK else MIN_PEAK
        return (np.clip(self.values / max(scale, 1e-12), 0.0, 1.0) * 255.0).round().astype(np.uint8)


def windows(size: int, *, window_fraction: float = WINDOW_FRACTION,
            stride_fraction: float = STRIDE_FRACTION) -> tuple[int, list[tuple[int, int]]]:
    """The window side and the top-left corners ``(y, x)`` of the windows that tile a ``size`` x ``size`` field.

    The last row and column of windows end at the field's edge, so every pixel is covered.
    """
    side = max(1, round(size * window_fraction))
    stride = max(1, round(size * stride_fraction))
    starts = list(range(0, size - side + 1, stride))
    if starts[-1] != size - side:
        starts.append(size - side)
    return side, [(y, x) for y in starts for x in starts]


def margins(probabilities: np.ndarray, label_index: int) -> np.ndarray:
    """``log(p[label] / max of the other p)`` per row of ``probabilities (N, C)``, in float64.

    For a softmax this is the logit difference over the temperature; probabilities are floored at the
    smallest normal float32 so a class that underflowed to 0 gives a large finite margin, not infinity.
    """
    p = np.maximum(probabilities.astype(np.float64), FLOOR)
    others = np.delete(p, label_index, axis=1).max(axis=1)
    return np.log(p[:, label_index]) - np.log(others)


def occluded_copies(field: np.ndarray, corners: list[tuple[int, int]], side: int) -> np.ndarray:
    """``(len(corners), H, W, 3)`` uint8 copies of ``field`` with one window painted its background colour each."""
    fill = background_colour(field).round().astype(np.uint8)
    copies = np.repeat(field[None], len(corners), axis=0)
    for copy, (y, x) in zip(copies, corners, strict=True):
        copy[y : y + side, x : x + side] = fill
    return copies


@dataclass(frozen=True)
class OcclusionPlan:
    """The occluded copies of one preprocessed field, to be run through the served model in batches."""

    size: int
    side: int
    corners: list[tuple[int, int]]
    copies: np.ndarray  # (len(corners), H, W, 3) uint8

    def batches(self, batch: int) -> list[np.ndarray]:
        """The copies in slices of at most ``batch`` (the ensemble's ``max_batch_size``)."""
        return [self.copies[i : i + batch] for i in range(0, len(self.copies), batch)]

    def evidence(self, probabilities: np.ndarray, occluded: np.ndarray) -> Evidence:
        """:class:`Evidence` for the predicted class, from the field's own ``probabilities (C,)`` and the
        copies' ``occluded (len(corners), C)``; the evidence at a pixel is the mean fall over its windows."""
        label_index = int(np.argmax(probabilities))
        base = float(margins(probabilities[None], label_index)[0])
        falls = base - margins(occluded, label_index)
        total = np.zeros((self.size, self.size))
        count = np.zeros((self.size, self.size))
        for fall, (y, x) in zip(falls, self.corners, strict=True):
            total[y : y + self.side, x : x + self.side] += fall
            count[y : y + self.side, x : x + self.side] += 1
        values = (total / np.maximum(count, 1)).astype(np.float32)
        return Evidence(values=values, label_index=label_index, base_margin=base,
                        peak=float(max(0.0, falls.max())))


def plan_occlusion(field: np.ndarray) -> OcclusionPlan:
    """The windows and occluded copies of ``field``, the preprocessed uint8 field the ensemble takes."""
    size = field.shape[0]
    side, corners = windows(size)
    return OcclusionPlan(size=size, side=side, corners=corners, copies=occluded_copies(field, corners, side))


def occlusion_evidence(infer: Callable[[np.ndarray], np.ndarray], field: np.ndarray, probabilities: np.ndarray,
                       *, batch: int = MAX_BATCH) -> Evidence:
    """:class:`Evidence` for the predicted class of ``field`` with a synchronous model.

    ``infer`` maps a uint8 batch ``(N, H, W, 3)`` to class probabilities ``(N, C)``; ``probabilities`` are
    the field's own, unoccluded. The gateway does the same with its asynchronous Triton client.
    """
    plan = plan_occlusion(field)
    return plan.evidence(probabilities, np.concatenate([infer(part) for part in plan.batches(batch)]))
