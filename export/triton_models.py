"""The Triton Python-backend model that runs an exported ONNX graph on ONNX Runtime (embedded target).

Each model directory's ``1/model.py`` is one import line naming a class here (or, for the steps that
prepare and interpret fields, in :mod:`engine.triton_models`), so the logic lives in the installed,
tested package. ``execute`` returns exactly one response per request, and a bad
request (an undecodable upload) gets its own ``TritonError`` without failing its batch-mates.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def _pb_utils():
    import triton_python_backend_utils as pb_utils  # only importable inside the Triton stub

    return pb_utils


def _parameter(config: dict, key: str, default: str) -> str:
    return config.get("parameters", {}).get(key, {}).get("string_value", default)


class OnnxRuntimeModel:
    """Runs ``<version>/model.onnx`` on ONNX Runtime over the whole dynamic batch at once."""

    def initialize(self, args: dict) -> None:
        from export.runtime import onnx_session

        self.config = json.loads(args["model_config"])
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        threads = int(os.environ.get("HYBRIDCN_ORT_THREADS", _parameter(self.config, "intra_op_threads", "0")))
        self.session = onnx_session(path, threads=threads, spin=False)
        self.input_names = [tensor["name"] for tensor in self.config["input"]]
        self.output_names = [tensor["name"] for tensor in self.config["output"]]

    def execute(self, requests: list) -> list:
        pb_utils = _pb_utils()
        inputs = [[pb_utils.get_input_tensor_by_name(r, name).as_numpy() for name in self.input_names]
                  for r in requests]
        sizes = [batch[0].shape[0] for batch in inputs]
        feed = {name: np.concatenate([batch[i] for batch in inputs]) for i, name in enumerate(self.input_names)}
        outputs = self.session.run(self.output_names, feed)
        responses = []
        start = 0
        for size in sizes:
            tensors = [pb_utils.Tensor(name, np.ascontiguousarray(out[start : start + size]))
                       for name, out in zip(self.output_names, outputs, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
            start += size
        return responses

    def finalize(self) -> None:
        self.session = None
