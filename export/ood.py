"""Out-of-distribution score of the served model: how far a field's features lie from the training fields'.

Method: the Mahalanobis distance of a field's pooled backbone features (the ``features`` stage, before
the head) to their distribution over the training fields (Lee et al. 2018, "A simple unified framework
for detecting out-of-distribution samples and adversarial attacks", NeurIPS), with the covariance shrunk
by Ledoit-Wolf (2004) because the fields are few for the feature width. Served as a small ONNX graph,
``ood``, after ``features`` in both ensembles, so REST, gRPC, batch and the page read one score:
``ood_score = ||(f - mean) @ L||^2 / D`` with ``L`` the Cholesky factor of the precision matrix (1 on
average for training-like fields). Next to it, the same distance over the field's acquisition
statistics (``preprocessing.fieldstats``: colour, contrast, stain coverage, focus, grain, cell scale),
which the stain-normalised networks cannot see. Thresholds are quantiles of the scores of fields *held
out* of the fit (block folds), so about 2% of in-distribution fields are flagged.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from sklearn.covariance import LedoitWolf

from export.repository import read_manifest
from export.runtime import onnx_session
from hybridcn.contracts import OutOfDistribution
from hybridcn.profiles import Profile
from preprocessing import PreprocessConfig, StainReference, decode_image, enhance_field, fit_field
from preprocessing.fieldstats import STATISTICS, field_statistics
from preprocessing.probes import PROBES, probe_field
from preprocessing.scale import fit_to_plan, plan_scale, red_cell_diameter
from training.data import block_folds, find_samples

#: Share of held-out in-distribution fields the threshold lets through.
IN_DISTRIBUTION_QUANTILE = 0.98
#: Share of training fields each magnification check leaves out at either end of its range.
SCALE_TAIL = 0.0025


@dataclass(frozen=True)
class FeatureDensity:
    """Mean and whitening factor of the training features (``ood_score`` of ``f`` is ``|(f-mean)@L|^2/D``)."""

    mean: np.ndarray  # (D,) float32
    whitening: np.ndarray  # (D, D) float32, lower-triangular Cholesky factor of the precision matrix

    def score(self, features: np.ndarray) -> np.ndarray:
        centred = features.astype(np.float64) - self.mean
        return ((centred @ self.whitening.astype(np.float64)) ** 2).sum(axis=1) / len(self.mean)


def fit_density(features: np.ndarray) -> FeatureDensity:
    """Ledoit-Wolf Gaussian fit of ``features`` (N, D), each dimension standardised first.

    Shrinkage pulls the covariance toward a multiple of the identity, which only makes sense when the
    dimensions share a scale; the standardisation is folded into the whitening factor.
    """
    values = features.astype(np.float64)
    scale = values.std(axis=0)
    scale[scale == 0] = 1.0
    estimate = LedoitWolf().fit(values / scale)
    whitening = np.linalg.cholesky(estimate.precision_) / scale[:, None]
    return FeatureDensity((estimate.location_ * scale).astype(np.float32), whitening.astype(np.float32))


def held_out_scores(features: np.ndarray, folds: np.ndarray) -> np.ndarray:
    """Each field's score under a density fitted without its fold (what an unseen lab field would get)."""
    scores = np.empty(len(features))
    for fold in np.unique(folds):
        held = folds == fold
        scores[held] = fit_density(features[~held]).score(features[held])
    return scores


def threshold_from(scores: np.ndarray, quantile: float = IN_DISTRIBUTION_QUANTILE) -> float:
    return float(np.quantile(scores, quantile))


def feature_extractor(repository: Path, *, threads: int = 0):
    """``extract(fields uint8 (N,S,S,3)) -> features (N,D)`` with the repository's own graphs."""
    segmentation = onnx_session(Path(repository) / "segmentation" / "1" / "model.onnx", threads=threads)
    features = onnx_session(Path(repository) / "features" / "1" / "model.onnx", threads=threads)

    def extract(fields: np.ndarray, batch: int = 32) -> np.ndarray:
        parts = []
        for start in range(0, len(fields), batch):
            _, _, segmented = segmentation.run(None, {"image": fields[start : start + batch]})
            (pooled,) = features.run(["features"], {"segmented_image": segmented})
            parts.append(pooled)
        return np.concatenate(parts)

    return extract


def write_ood_graph(density: FeatureDensity, path: Path) -> Path:
    """The score as an ONNX graph: ``features`` (N, D) float32 in, ``ood_score`` (N, 1) float32 out."""
    width = len(density.mean)
    nodes = [
        helper.make_node("Sub", ["features", "mean"], ["centred"]),
        helper.make_node("MatMul", ["centred", "whitening"], ["white"]),
        helper.make_node("Mul", ["white", "white"], ["squared"]),
        helper.make_node("ReduceSum", ["squared", "axes"], ["total"], keepdims=1),
        helper.make_node("Div", ["total", "width"], ["ood_score"]),
    ]
    initializers = [
        numpy_helper.from_array(density.mean.astype(np.float32), "mean"),
        numpy_helper.from_array(density.whitening.astype(np.float32), "whitening"),
        numpy_helper.from_array(np.array([1], np.int64), "axes"),
        numpy_helper.from_array(np.array(width, np.float32), "width"),
    ]
    graph = helper.make_graph(
        nodes, "ood", [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", width])],
        [helper.make_tensor_value_info("ood_score", TensorProto.FLOAT, ["batch", 1])], initializers)
    # IR 8 (what torch writes for the other graphs): the ONNX Runtime inside NVIDIA's Triton images (1.19 in
    # 24.10) loads IR <= 10, and onnx's own default (the newest IR) would not load there
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="hybridcn-ood",
                              ir_version=OOD_IR_VERSION)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


#: ONNX IR version of the written graph (see :func:`write_ood_graph`).
OOD_IR_VERSION = 8


def _probe_fields(raw: list[np.ndarray], kind: str, count: int) -> list[np.ndarray]:
    chosen = np.random.default_rng(0).choice(len(raw), size=min(count, len(raw)), replace=False)
    return [probe_field(raw[i], kind, seed=0, field=int(i)) for i in chosen]


def fit_out_of_distribution(data: Path, repository: Path, *, probe_fields: int = 150, log=print
                            ) -> tuple[OutOfDistribution, FeatureDensity]:
    """Fit both densities on the labelled fields of ``data`` with the repository's graphs, set the thresholds
    on block-held-out fields, and measure every probe kind; returns the manifest entry and the feature fit."""
    model_manifest = read_manifest(repository)
    size = model_manifest.image_size
    reference = StainReference.from_dict(model_manifest.stain_reference)
    config = PreprocessConfig.from_dict(model_manifest.profile["preprocess"])
    samples = find_samples(data)
    log(f"ood: reading {len(samples)} fields of {data}")
    with ThreadPoolExecutor() as pool:
        raw = list(pool.map(lambda s: decode_image(s.path.read_bytes()), samples))
    extract = feature_extractor(repository)

    field_size = Profile.from_dict(model_manifest.profile).field_size

    def measure(images: list[np.ndarray], plans: list | None = None) -> tuple[np.ndarray, np.ndarray]:
        plans = plans or [None] * len(images)
        with ThreadPoolExecutor() as pool:
            originals = list(pool.map(lambda item: fit_to_plan(item[0], size, item[1], field_size=field_size,
                                                               max_aspect_ratio=config.max_aspect_ratio),
                                      zip(images, plans, strict=True)))
            fields = np.stack(list(pool.map(lambda im: enhance_field(im, reference, config), originals)))
            statistics = np.stack(list(pool.map(field_statistics, originals)))
        return extract(fields), statistics

    features, statistics = measure(raw)
    folds = block_folds(samples)
    held_features, held_statistics = held_out_scores(features, folds), held_out_scores(statistics, folds)
    # each score flags half of the in-distribution share, so together they flag about 1 - quantile
    quantile = 1 - (1 - IN_DISTRIBUTION_QUANTILE) / 2
    feature_threshold = threshold_from(held_features, quantile)
    statistics_threshold = threshold_from(held_statistics, quantile)
    held = np.maximum(held_features / feature_threshold, held_statistics / statistics_threshold)
    feature_density, statistics_density = fit_density(features), fit_density(statistics)
    with ThreadPoolExecutor() as pool:
        measured = list(pool.map(lambda im: red_cell_diameter(fit_field(im, field_size)), raw))
    diameters = np.array([d for d in measured if d is not None])
    red_cells = (float(np.quantile(diameters, SCALE_TAIL)), float(np.median(diameters)),
                 float(np.quantile(diameters, 1 - SCALE_TAIL)))
    log(f"ood: red cells {red_cells[1]:.1f} px across at the field size ({red_cells[0]:.1f}-{red_cells[2]:.1f}); "
        f"{len(measured) - len(diameters)} fields without a measurement")

    blob = np.exp(statistics[:, STATISTICS.index("log_blob_scale")])
    scale_range = (float(np.quantile(blob, SCALE_TAIL)), float(np.quantile(blob, 1 - SCALE_TAIL)))

    def in_blob_range(values: np.ndarray) -> np.ndarray:
        radius = np.exp(values[:, STATISTICS.index("log_blob_scale")])
        return (radius >= scale_range[0]) & (radius <= scale_range[1])

    def plans_for(images: list[np.ndarray]) -> list:
        with ThreadPoolExecutor() as pool:
            return list(pool.map(lambda im: plan_scale(im, field_size, red_cells), images))

    probes = {}
    for kind in PROBES:
        images = _probe_fields(raw, kind, probe_fields)
        plans = plans_for(images)
        probe_features, probe_statistics = measure(images, plans)
        score = np.maximum(feature_density.score(probe_features) / feature_threshold,
                           statistics_density.score(probe_statistics) / statistics_threshold)
        flagged_scale = np.array([plan.reason is not None for plan in plans]) | ~in_blob_range(probe_statistics)
        rescaled = np.array([plan.rescaled_by is not None for plan in plans])
        flagged = (score > 1) | flagged_scale
        probes[kind] = {"n": len(score), "flagged": round(float(flagged.mean()), 4),
                        "flagged_as_out_of_distribution": round(float((score > 1).mean()), 4),
                        "rescaled": round(float(rescaled.mean()), 4)}
        log(f"ood: probe {kind:<18} flagged {flagged.mean():.1%} (rescaled {rescaled.mean():.1%})")
    in_scale = np.array([plan.reason is None for plan in plans_for(raw)]) & in_blob_range(statistics)
    report = {
        "fitted_on": {"data": Path(data).name, "n": len(samples)},
        "held_out_in_distribution_flagged": round(float(((held > 1) | ~in_scale).mean()), 4),
        "held_out_flagged_as_out_of_distribution": round(float((held > 1).mean()), 4),
        "probes": probes,
        "probes_flagged": round(float(np.mean([p["flagged"] for p in probes.values()])), 4),
        "method": "Mahalanobis distance (Ledoit-Wolf covariance) of the backbone features and of the field's "
                  "acquisition statistics; thresholds at block-held-out quantiles; magnification from the red "
                  "cells' distance-transform radii, fields off the training range rescaled and flagged",
    }
    log(f"ood: held-out in-distribution fields flagged {report['held_out_in_distribution_flagged']:.1%}, "
        f"probes flagged {report['probes_flagged']:.1%}")
    entry = OutOfDistribution(
        feature_threshold=feature_threshold, statistics_names=list(STATISTICS),
        statistics_mean=statistics_density.mean.astype(float).tolist(),
        statistics_whitening=statistics_density.whitening.astype(float).tolist(),
        statistics_threshold=statistics_threshold, scale_range=scale_range, red_cell_diameter=red_cells,
        report=report)
    return entry, feature_density
