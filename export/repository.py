"""Write Triton model repositories (``config.pbtxt`` per model, ensembles) for two targets.

- ``embedded``: every model runs in Triton's Python backend (the only backend of the ``tritonserver``
  that the ``nvidia-pytriton`` wheel ships), ONNX Runtime inside, KIND_CPU;
- ``gpu``: ``onnxruntime_onnx`` models with the TensorRT FP16 execution accelerator, KIND_GPU, for
  NVIDIA's Triton container.
Both use dynamic batching and warm-up, and both expose the ``hybridcn_nas`` ensemble (uint8 fields
in) and ``hybridcn_nas_raw`` (encoded image bytes in, through the Python ``preprocess`` step).
Configs are built as Triton's own ``ModelConfig`` protobuf messages and printed in its text format, so a
misspelt field fails here rather than in the server.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from hybridcn.contracts import Manifest
from hybridcn.tensors import FEATURE_OUTPUTS, HEAD_OUTPUTS, OOD_INPUTS, OOD_OUTPUTS, SEGMENTATION_OUTPUTS

TARGETS = ("embedded", "gpu")
ENSEMBLE = "hybridcn_nas"
RAW_ENSEMBLE = "hybridcn_nas_raw"
MANIFEST = "manifest.json"
MAX_BATCH = 16
#: What the raw-bytes ensemble adds to the uint8 one: the gateway's interpretation of each field.
INTERPRET_OUTPUTS = ("result", "needs_review", "cell_count")
TENSORRT_FP16 = {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824", "trt_engine_cache_enable": "1"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str
    dims: tuple[int, ...]
    optional: bool = False  # an input a request may leave out

    def input(self) -> mc.ModelInput:
        return mc.ModelInput(name=self.name, data_type=mc.DataType.Value(self.data_type), dims=self.dims,
                             optional=self.optional)

    def output(self, label_filename: str = "") -> mc.ModelOutput:
        return mc.ModelOutput(name=self.name, data_type=mc.DataType.Value(self.data_type), dims=self.dims,
                              label_filename=label_filename)


def stage_tensors(image_size: int, feature_width: int, tokens: int, classes: int) -> dict[str, TensorSpec]:
    """The tensors the ensembles pass between models, by name (batch dimension left out)."""
    return {
        "image": TensorSpec("image", "TYPE_UINT8", (image_size, image_size, 3)),
        "image_bytes": TensorSpec("image_bytes", "TYPE_STRING", (1,)),
        "pixel_size_um": TensorSpec("pixel_size_um", "TYPE_FP32", (1,), optional=True),
        "mask": TensorSpec("mask", "TYPE_UINT8", (image_size, image_size)),
        "attention": TensorSpec("attention", "TYPE_UINT8", (image_size, image_size)),
        "segmented_image": TensorSpec("segmented_image", "TYPE_FP32", (3, image_size, image_size)),
        "features": TensorSpec("features", "TYPE_FP32", (feature_width,)),
        "probabilities": TensorSpec("probabilities", "TYPE_FP32", (classes,)),
        "feature_attention": TensorSpec("feature_attention", "TYPE_FP32", (tokens,)),
        "qc": TensorSpec("qc", "TYPE_STRING", (1,)),
        "result": TensorSpec("result", "TYPE_STRING", (1,)),
        "needs_review": TensorSpec("needs_review", "TYPE_BOOL", (1,)),
        "cell_count": TensorSpec("cell_count", "TYPE_INT32", (1,)),
        "ood_score": TensorSpec("ood_score", "TYPE_FP32", (1,)),
    }


def _warmup(specs: list[TensorSpec]) -> list[mc.ModelWarmup]:
    if any(spec.data_type == "TYPE_STRING" for spec in specs):
        return []  # a zero-filled string is no image or JSON; such steps warm on their first request
    inputs = {spec.name: mc.ModelWarmup.Input(data_type=mc.DataType.Value(spec.data_type), dims=spec.dims,
                                              zero_data=True) for spec in specs}
    return [mc.ModelWarmup(name="zeros", batch_size=1, inputs=inputs)]


def model_config(
    name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], *, target: str, python: bool,
    parameters: dict[str, str] | None = None, label_output: str | None = None, instances: int = 1,
) -> mc.ModelConfig:
    """The ``ModelConfig`` of one model (not an ensemble)."""
    on_gpu = target == "gpu" and not python
    config = mc.ModelConfig(
        name=name,
        max_batch_size=MAX_BATCH,
        input=[t.input() for t in inputs],
        output=[t.output("labels.txt" if t.name == label_output else "") for t in outputs],
        instance_group=[mc.ModelInstanceGroup(
            count=instances, kind=mc.ModelInstanceGroup.KIND_GPU if on_gpu else mc.ModelInstanceGroup.KIND_CPU)],
        dynamic_batching=mc.ModelDynamicBatching(preferred_batch_size=[4, 8, 16], max_queue_delay_microseconds=2000),
        parameters={key: mc.ModelParameter(string_value=value) for key, value in (parameters or {}).items()},
        model_warmup=_warmup(inputs),
    )
    if on_gpu:
        config.platform = "onnxruntime_onnx"
        accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        accelerator.parameters.update(TENSORRT_FP16)
    else:
        config.backend = "python"
    return config


def ensemble_config(name: str, inputs: list[TensorSpec], outputs: list[TensorSpec], steps: list[tuple]
                    ) -> mc.ModelConfig:
    """``steps``: ``(model, {model_input: ensemble_tensor}, {model_output: ensemble_tensor})``."""
    return mc.ModelConfig(
        name=name, platform="ensemble", max_batch_size=MAX_BATCH,
        input=[t.input() for t in inputs], output=[t.output() for t in outputs],
        ensemble_scheduling=mc.ModelEnsembling(step=[
            mc.ModelEnsembling.Step(model_name=model, model_version=-1, input_map=input_map, output_map=output_map)
            for model, input_map, output_map in steps
        ]),
    )


def parse_config(text: str) -> mc.ModelConfig:
    """Parse ``config.pbtxt`` text into Triton's ``ModelConfig`` message (raises on any error)."""
    return text_format.Parse(text, mc.ModelConfig())


def _python_model(class_name: str, module: str = "export.triton_models") -> bytes:
    """A one-line ``model.py``: the logic lives in the installed package (``export.triton_models`` runs ONNX
    graphs; ``engine.triton_models`` prepares and interprets fields with the gateway's own code)."""
    return f"from {module} import {class_name} as TritonPythonModel  # noqa: F401\n".encode()


def _identity(names: tuple[str, ...]) -> dict[str, str]:
    return {name: name for name in names}


def write_repository(
    out: Path, *, target: str, onnx_files: dict[str, Path], manifest: Manifest, threads_per_model: int = 0,
) -> list[Path]:
    """Write the full repository for ``target`` under ``out``; returns the config paths written.

    ``onnx_files`` maps ``segmentation``, ``features``, ``head`` (and, once fitted, ``ood``) to their graphs.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose one of {TARGETS}")
    size = manifest.image_size
    tensors = stage_tensors(size, manifest.feature_width, manifest.tokens, len(manifest.classes))
    written: list[Path] = []

    def write(config: mc.ModelConfig, files: dict[str, bytes] | None = None) -> None:
        directory = out / config.name
        (directory / "1").mkdir(parents=True, exist_ok=True)
        (directory / "config.pbtxt").write_text(text_format.MessageToString(config))
        for relative, data in (files or {}).items():
            (directory / relative).write_bytes(data)
        written.append(directory / "config.pbtxt")

    ort_parameters = {"intra_op_threads": str(threads_per_model)}
    stage_io = {
        "segmentation": (["image"], list(SEGMENTATION_OUTPUTS)),
        "features": (["segmented_image"], list(FEATURE_OUTPUTS)),
        "head": (["features"], list(HEAD_OUTPUTS)),
    }
    with_ood = "ood" in onnx_files
    if with_ood:
        stage_io["ood"] = (list(OOD_INPUTS), list(OOD_OUTPUTS))
    for stage, (stage_inputs, stage_outputs) in stage_io.items():
        files = {"1/model.onnx": onnx_files[stage].read_bytes()}
        if target == "embedded":
            files["1/model.py"] = _python_model("OnnxRuntimeModel")
        if stage == "head":
            files["labels.txt"] = ("\n".join(manifest.classes) + "\n").encode()
        write(model_config(
            stage, [tensors[n] for n in stage_inputs], [tensors[n] for n in stage_outputs], target=target,
            python=False, parameters=ort_parameters if target == "embedded" else None,
            label_output="probabilities" if stage == "head" else None,
        ), files)
    # the two Python steps read the model from the manifest beside the ensemble: one source of truth
    raw_inputs = [tensors["image_bytes"], tensors["pixel_size_um"]]
    write(model_config("preprocess", raw_inputs, [tensors["image"], tensors["qc"]], target=target,
                       python=True), {"1/model.py": _python_model("PreprocessModel", "engine.triton_models")})
    interpret_inputs = ("probabilities", "mask", "qc", *(OOD_OUTPUTS if with_ood else ()))
    write(model_config("interpret", [tensors[n] for n in interpret_inputs],
                       [tensors[n] for n in INTERPRET_OUTPUTS], target=target, python=True),
          {"1/model.py": _python_model("InterpretModel", "engine.triton_models")})
    outputs = [tensors[n] for n in ("probabilities", "feature_attention", "mask", "attention",
                                    *(OOD_OUTPUTS if with_ood else ()))]
    core_steps = [
        ("segmentation", {"image": "image"}, _identity(SEGMENTATION_OUTPUTS)),
        ("features", {"segmented_image": "segmented_image"}, _identity(FEATURE_OUTPUTS)),
        ("head", {"features": "features"}, _identity(HEAD_OUTPUTS)),
        *([("ood", {"features": "features"}, _identity(OOD_OUTPUTS))] if with_ood else []),
    ]
    write(ensemble_config(ENSEMBLE, [tensors["image"]], outputs, core_steps),
          {MANIFEST: manifest.model_dump_json(indent=2).encode(), "1/.keep": b""})
    raw_steps = [("preprocess", _identity(("image_bytes", "pixel_size_um")), {"image": "image", "qc": "qc"}),
                 *core_steps, ("interpret", _identity(interpret_inputs), _identity(INTERPRET_OUTPUTS))]
    raw_outputs = [*outputs, tensors["image"], *(tensors[n] for n in INTERPRET_OUTPUTS)]
    write(ensemble_config(RAW_ENSEMBLE, raw_inputs, raw_outputs, raw_steps), {"1/.keep": b""})
    return written


def read_manifest(repository: Path) -> Manifest:
    """The manifest that the exporter stored beside the ensemble's config (model version, calibration...)."""
    path = Path(repository) / ENSEMBLE / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {repository} a repository written by `hybridcn export`?")
    return Manifest.model_validate_json(path.read_text())
