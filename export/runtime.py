"""The served ensemble run in-process on ONNX Runtime, from the same repository files Triton loads.

Used to check that Triton returns what the graphs compute, by ``hybridcn evaluate`` without a
server, and as the in-process baseline of the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hybridcn.tensors import ENSEMBLE_OUTPUTS as OUTPUTS
from hybridcn.tensors import FEATURE_OUTPUTS, HEAD_OUTPUTS, OOD_OUTPUTS, SEGMENTATION_OUTPUTS

ALL_OUTPUTS = (*OUTPUTS, *OOD_OUTPUTS)


def onnx_session(path: Path, *, threads: int = 0, spin: bool = True, flush_denormals: bool = True):
    """An ONNX Runtime CPU session (``threads=0`` lets ORT choose), subnormal floats flushed to zero.

    ``spin=False`` stops idle worker threads from busy-waiting: several sessions in separate Triton
    stub processes would otherwise burn the cores that the busy one needs.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if flush_denormals:
        # Real fields drive some activations into the subnormal range, where x86 float arithmetic is many
        # times slower; flushing them to zero leaves the served outputs unchanged (tests/unit/test_runtime.py).
        options.add_session_config_entry("session.set_denormal_as_zero", "1")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class EnsembleOutput:
    probabilities: np.ndarray  # (N, C) float32
    feature_attention: np.ndarray  # (N, T) float32
    mask: np.ndarray  # (N, H, W) uint8
    attention: np.ndarray  # (N, H, W) uint8
    ood_score: np.ndarray | None = None  # (N, 1) float32, when the repository has the ``ood`` step

    def item(self, index: int) -> EnsembleOutput:
        return EnsembleOutput(*(None if (v := getattr(self, name)) is None else v[index : index + 1]
                                for name in ALL_OUTPUTS))

    @classmethod
    def concatenate(cls, parts: list[EnsembleOutput]) -> EnsembleOutput:
        return cls(*(None if getattr(parts[0], name) is None else np.concatenate([getattr(p, name) for p in parts])
                     for name in ALL_OUTPUTS))


class OnnxEnsemble:
    """``infer(fields uint8 (N,H,W,3))`` through segmentation -> features -> head, like the ensemble."""

    def __init__(self, repository: Path, *, threads: int = 0) -> None:
        stages = ["segmentation", "features", "head"]
        if (Path(repository) / "ood" / "1" / "model.onnx").is_file():
            stages.append("ood")
        self.sessions = {name: onnx_session(Path(repository) / name / "1" / "model.onnx", threads=threads)
                         for name in stages}

    def infer(self, images: np.ndarray) -> EnsembleOutput:
        mask, attention, segmented = self.sessions["segmentation"].run(list(SEGMENTATION_OUTPUTS), {"image": images})
        (features,) = self.sessions["features"].run(list(FEATURE_OUTPUTS), {"segmented_image": segmented})
        probabilities, feature_attention = self.sessions["head"].run(list(HEAD_OUTPUTS), {"features": features})
        ood = self.sessions["ood"].run(list(OOD_OUTPUTS), {"features": features})[0] if "ood" in self.sessions else None
        return EnsembleOutput(probabilities, feature_attention, mask, attention, ood)
