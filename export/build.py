"""``hybridcn export``: trained checkpoint -> three ONNX graphs (parity-checked) -> Triton repository."""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from export.onnx_export import check_parity, export_onnx
from export.repository import read_manifest, write_repository
from hybridcn.contracts import Manifest
from hybridcn.tensors import (
    FEATURE_INPUTS,
    FEATURE_OUTPUTS,
    HEAD_INPUTS,
    HEAD_OUTPUTS,
    SEGMENTATION_INPUTS,
    SEGMENTATION_OUTPUTS,
)

#: Parity tolerances (max abs difference, ONNX Runtime vs PyTorch, float32).
TOLERANCES = {"segmentation": 1e-3, "features": 1e-3, "head": 1e-5}


def _example_fields(size: int, count: int = 2) -> torch.Tensor:
    """Synthetic smear fields, so the parity check runs through realistic activations."""
    import numpy as np

    from hybridcn.synth import synth_field

    return torch.as_tensor(np.stack([synth_field(i % 4, seed=i, size=size).image for i in range(count)]))


def export_graphs(model, out_dir: Path, *, check: bool = True) -> tuple[dict[str, Path], dict]:
    """Export segmentation, features and head of a :class:`training.pipeline.TrainedModel`."""
    size = model.profile.image_size
    images = _example_fields(size)
    with torch.no_grad():
        _, _, segmented = model.segmentation(images)
        features = model.features(segmented)
    plan = {
        "segmentation": (model.segmentation, images, SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS),
        "features": (model.features, segmented, FEATURE_INPUTS, FEATURE_OUTPUTS),
        "head": (model.head, features, HEAD_INPUTS, HEAD_OUTPUTS),
    }
    paths, parity = {}, {}
    for name, (module, example, inputs, outputs) in plan.items():
        paths[name] = export_onnx(module, example, out_dir / f"{name}.onnx", input_names=inputs, output_names=outputs)
        if check:
            report = check_parity(module, paths[name], example, output_names=outputs, tolerance=TOLERANCES[name])
            if not report.ok:
                raise RuntimeError(f"ONNX parity failed for {name}: {report.max_abs_diff} > {report.tolerance}")
            parity[name] = report.max_abs_diff
    return paths, parity


def model_version(paths: dict[str, Path], profile_name: str) -> str:
    digest = hashlib.sha256()
    for name in sorted(paths):
        digest.update(paths[name].read_bytes())
    return f"{profile_name}-{digest.hexdigest()[:10]}"


def build_repository(
    model_path: Path, out: Path, *, target: str = "embedded", calibration: Path | None = None,
    check_parity: bool = True, training_summary: dict | None = None,
) -> Manifest:
    """Export ``model.pt`` into a fresh model repository at ``out``; returns the manifest."""
    from training.pipeline import load_trained

    model = load_trained(model_path)
    calibration_data = json.loads(calibration.read_text()) if calibration else {}
    temperature = float(calibration_data.get("temperature", 1.0))
    model.head.head.temperature.fill_(temperature)
    with tempfile.TemporaryDirectory() as scratch:
        paths, parity = export_graphs(model, Path(scratch), check=check_parity)
        manifest = Manifest(
            model_version=model_version(paths, model.profile.name),
            exported_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            profile=model.profile.to_dict(),
            stain_reference=model.reference.to_dict(),
            feature_width=int(model.features.features.num_features),
            tokens=int(model.head.head.tokens),
            temperature=temperature,
            review_threshold=float(calibration_data.get("review_threshold", 0.9)),
            review_target_precision=calibration_data.get("target_precision"),
            parity_max_abs_diff=parity,
            training={**model.history.get("options", {}), **(training_summary or {}),
                      "n_train": model.history.get("n_train")},
            oof_metrics=calibration_data.get("oof_metrics"),
        )
        staging = out.with_name(out.name + ".staging")
        shutil.rmtree(staging, ignore_errors=True)
        write_repository(staging, target=target, onnx_files=paths, manifest=manifest)
    _replace(staging, out)
    return manifest


def _replace(staging: Path, out: Path) -> None:
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)


def rebuild_repository(source: Path, out: Path, *, target: str = "embedded", manifest: Manifest | None = None,
                       extra_graphs: dict[str, Path] | None = None) -> Manifest:
    """Write a repository for ``target`` from an existing one's ONNX graphs and manifest (no checkpoint).

    How a fresh clone gets the GPU repository of the shipped model, and how config changes reach the
    shipped repository without touching its weights (the model version, a hash of the graphs, stays).
    """
    manifest = manifest or read_manifest(source)
    onnx_files = {stage: Path(source) / stage / "1" / "model.onnx" for stage in ("segmentation", "features", "head")}
    if (Path(source) / "ood" / "1" / "model.onnx").is_file():
        onnx_files["ood"] = Path(source) / "ood" / "1" / "model.onnx"
    onnx_files.update(extra_graphs or {})
    missing = [str(path) for path in onnx_files.values() if not path.is_file()]
    if missing:
        raise FileNotFoundError(f"{source} lacks the exported graphs: {', '.join(missing)}")
    staging = out.with_name(out.name + ".staging")
    shutil.rmtree(staging, ignore_errors=True)
    write_repository(staging, target=target, onnx_files=onnx_files, manifest=manifest)
    _replace(staging, out)
    return manifest
