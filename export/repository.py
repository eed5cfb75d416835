"""Write Triton model repositories (``config.pbtxt`` per model, ensembles) for two targets.

- ``embedded``: every model runs in Triton's Python backend (the only backend of the ``tritonserver``
  that the ``nvidia-pytriton`` wheel ships), ONNX Runtime inside, KIND_CPU;
- ``gpu``: ``onnxruntime_onnx`` models with the TensorRT FP16 execution accelerator, KIND_GPU, for
  NVIDIA's Triton container.
Both use dynamic batching and warm-up, and both expose the ``hybridcn_nas`` ensemble (uint8 fields
in) and ``hybridcn_nas_raw`` (encoded image bytes in, through the Python ``preprocess`` step).
Every generated config is parsed back with Triton's ``ModelConfig`` protobuf before it is written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybridcn.tensors import FEATURE_OUTPUTS, HEAD_OUTPUTS, SEGMENTATION_OUTPUTS

TARGETS = ("embedded", "gpu")
ENSEMBLE = "hybridcn_nas"
RAW_ENSEMBLE = "hybridcn_nas_raw"
MANIFEST = "manifest.json"
MAX_BATCH = 16


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]

    def pbtxt(self, extra: str = "") -> str:
        dims = ", ".join(str(d) for d in self.dims)
        return f'  {{ name: "{self.name}" data_type: {self.data_type} dims: [ {dims} ]{extra} }}'


def stage_tensors(image_size: int, feature_width: int, tokens: int, classes: int) -> dict[str, TensorSpec]:
    """The tensors the ensembles pass between models, by name (batch dimension left out)."""
    return {
        "image": TensorSpec("image", "TYPE_UINT8", (image_size, image_size, 3)),
        "image_bytes": TensorSpec("image_bytes", "TYPE_STRING", (1,)),
        "mask": TensorSpec("mask", "TYPE_UINT8", (image_size, image_size)),
        "attention": TensorSpec("attention", "TYPE_UINT8", (image_size, image_size)),
        "segmented_image": TensorSpec("segmented_image", "TYPE_FP32", (3, image_size, image_size)),
        "features": TensorSpec("features", "TYPE_FP32", (feature_width,)),
        "probabilities": TensorSpec("probabilities", "TYPE_FP32", (classes,)),
        "feature_attention": TensorSpec("feature_attention", "TYPE_FP32", (tokens,)),
    }


def _block(key: str, specs: list[str]) -> str:
    return f"{key} [\n" + ",\n".join(specs) + "\n]"


def _warmup(spec: TensorSpec) -> str:
    if spec.data_type == "TYPE_STRING":
        return ""  # a zero-filled string is no image; the preprocess step warms on its first request
    dims = ", ".join(str(d) for d in spec.dims)
    return (
        "model_warmup [ { name: \"zeros\" batch_size: 1 inputs { key: \"" + spec.name + "\" value: { "
        f"data_type: {spec.data_type} dims: [ {dims} ] zero_data: true }} }} }} ]"
    )


def model_config(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *, target: str, python: bool,
    parameters: dict[str, str] | None = None, label_output: str | None = None, instances: int = 1,
) -> str:
    """``config.pbtxt`` text of one model (not an ensemble)."""
    lines = [f'name: "{name}"']
    if python or target == "embedded":
        lines.append('backend: "python"')
    else:
        lines.append('platform: "onnxruntime_onnx"')
    lines.append(f"max_batch_size: {MAX_BATCH}")
    lines.append(_block("input", [t.pbtxt() for t in inputs]))
    outs = [t.pbtxt(' label_filename: "labels.txt"' if t.name == label_output else "") for t in outputs]
    lines.append(_block("output", outs))
    kind = "KIND_GPU" if target == "gpu" and not python else "KIND_CPU"
    lines.append(f"instance_group [ {{ count: {instances} kind: {kind} }} ]")
    lines.append("dynamic_batching { preferred_batch_size: [ 4, 8, 16 ] max_queue_delay_microseconds: 2000 }")
    if target == "gpu" and not python:
        lines.append(
            "optimization { execution_accelerators { gpu_execution_accelerator: [ { name: \"tensorrt\" "
            "parameters { key: \"precision_mode\" value: \"FP16\" } "
            "parameters { key: \"max_workspace_size_bytes\" value: \"1073741824\" } "
            "parameters { key: \"trt_engine_cache_enable\" value: \"1\" } } ] } }"
        )
    for key, value in (parameters or {}).items():
        escaped = json.dumps(value)
        lines.append(f'parameters {{ key: "{key}" value: {{ string_value: {escaped} }} }}')
    warmup = _warmup(inputs[0])
    if warmup:
        lines.append(warmup)
    return "\n".join(lines) + "\n"


def ensemble_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], steps: list[tuple]) -> str:
    """``steps``: ``(model, {model_input: ensemble_tensor}, {model_output: ensemble_tensor})``."""
    lines = [f'name: "{name}"', 'platform: "ensemble"', f"max_batch_size: {MAX_BATCH}",
             _block("input", [t.pbtxt() for t in inputs]), _block("output", [t.pbtxt() for t in outputs])]
    rendered = []
    for model, input_map, output_map in steps:
        maps = [f'input_map {{ key: "{k}" value: "{v}" }}' for k, v in input_map.items()]
        maps += [f'output_map {{ key: "{k}" value: "{v}" }}' for k, v in output_map.items()]
        rendered.append(f'    {{ model_name: "{model}" model_version: -1 ' + " ".join(maps) + " }")
    lines.append("ensemble_scheduling { step [\n" + ",\n".join(rendered) + "\n  ] }")
    return "\n".join(lines) + "\n"


def parse_config(text: str):
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` message (raises on any error)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def _python_model(class_name: str) -> bytes:
    """A one-line ``model.py``: the logic lives in the installed package (``export.triton_models``)."""
    return f"from export.triton_models import {class_name} as TritonPythonModel  # noqa: F401\n".encode()


def _identity(names: tuple[str, ...]) -> dict[str, str]:
    return {name: name for name in names}


def write_repository(
    out: Path, *, target: str, onnx_files: dict[str, Path], manifest: dict, threads_per_model: int = 0,
) -> list[Path]:
    """Write the full repository for ``target`` under ``out``; returns the config paths written.

    ``onnx_files`` maps ``segmentation``, ``features``, ``head`` to their exported graphs.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    profile = manifest["profile"]
    size = profile["image_size"]
    tensors = stage_tensors(size, manifest["feature_width"], manifest["tokens"], len(profile["classes"]))
    written: list[Path] = []

    def write(name: str, text: str, files: dict[str, bytes] | None = None) -> None:
        parse_config(text)
        directory = out / name
        (directory / "1").mkdir(parents=True, exist_ok=True)
        (directory / "config.pbtxt").write_text(text)
        for relative, data in (files or {}).items():
            (directory / relative).write_bytes(data)
        written.append(directory / "config.pbtxt")

    ort_parameters = {"intra_op_threads": str(threads_per_model)}
    stage_io = {
        "segmentation": (["image"], list(SEGMENTATION_OUTPUTS)),
        "features": (["segmented_image"], list(FEATURE_OUTPUTS)),
        "head": (["features"], list(HEAD_OUTPUTS)),
    }
    for stage, (stage_inputs, stage_outputs) in stage_io.items():
        files = {"1/model.onnx": onnx_files[stage].read_bytes()}
        if target == "embedded":
            files["1/model.py"] = _python_model("OnnxRuntimeModel")
        if stage == "head":
            files["labels.txt"] = ("\n".join(profile["classes"]) + "\n").encode()
        write(stage, model_config(
            stage, [tensors[n] for n in stage_inputs], [tensors[n] for n in stage_outputs], target=target,
            python=False, parameters=ort_parameters if target == "embedded" else None,
            label_output="probabilities" if stage == "head" else None,
        ), files)
    write("preprocess", model_config(
        "preprocess", [tensors["image_bytes"]], [tensors["image"]], target=target, python=True,
        parameters={
            "image_size": str(size),
            "stain_reference": json.dumps(manifest["stain_reference"]),
            "preprocess": json.dumps(profile["preprocess"]),
        },
    ), {"1/model.py": _python_model("PreprocessModel")})
    outputs = [tensors[n] for n in ("probabilities", "feature_attention", "mask", "attention")]
    core_steps = [
        ("segmentation", {"image": "image"}, _identity(SEGMENTATION_OUTPUTS)),
        ("features", {"segmented_image": "segmented_image"}, _identity(FEATURE_OUTPUTS)),
        ("head", {"features": "features"}, _identity(HEAD_OUTPUTS)),
    ]
    write(ENSEMBLE, ensemble_config(ENSEMBLE, [tensors["image"]], outputs, core_steps),
          {MANIFEST: json.dumps(manifest, indent=2).encode(), "1/.keep": b""})
    raw_steps = [("preprocess", {"image_bytes": "image_bytes"}, {"image": "image"}), *core_steps]
    write(RAW_ENSEMBLE, ensemble_config(RAW_ENSEMBLE, [tensors["image_bytes"]], [*outputs, tensors["image"]],
                                        raw_steps), {"1/.keep": b""})
    return written


def read_manifest(repository: Path) -> dict:
    """The manifest that the exporter stored beside the ensemble's config (model version, calibration...)."""
    path = Path(repository) / ENSEMBLE / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {repository} a repository written by `hybridcn export`?")
    return json.loads(path.read_text())
