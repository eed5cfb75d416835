"""Triton Python-backend steps of the raw-bytes ensemble: prepare a field, interpret the answer.

They run the gateway's own code (:func:`engine.field.prepare_bytes` and :func:`engine.field.interpret`)
with the model read from the repository's manifest, so an integrator on gRPC gets the same class,
review decision, reasons, QC flags and cell count as ``POST /v1/classify``. Each request gets its own
response; an undecodable upload fails only its own request, with the gateway's error code in the text.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from engine.field import PreparedField, interpret, prepare_bytes
from engine.model import ServedModel
from export.runtime import EnsembleOutput
from preprocessing import FieldQC, InvalidImageError
from preprocessing.scale import ScalePlan, check_pixel_size


def _pb_utils():
    import triton_python_backend_utils as pb_utils  # only importable inside the Triton stub

    return pb_utils


def _served_model(args: dict) -> ServedModel:
    """The model of the repository this step belongs to (the manifest sits beside the ensemble)."""
    return ServedModel.from_repository(Path(args["model_repository"]).parent)


class PreprocessModel:
    """Encoded image bytes (and, optionally, each image's pixel size in um) -> the preprocessed uint8 field
    and its QC (JSON), as the gateway prepares it."""

    def initialize(self, args: dict) -> None:
        self.model = _served_model(args)

    def execute(self, requests: list) -> list:
        pb_utils = _pb_utils()
        responses = []
        for request in requests:
            encoded = pb_utils.get_input_tensor_by_name(request, "image_bytes").as_numpy().reshape(-1)
            stated = pb_utils.get_input_tensor_by_name(request, "pixel_size_um")
            try:
                sizes = _pixel_sizes(None if stated is None else stated.as_numpy(), len(encoded))
                prepared = [prepare_bytes(bytes(item), self.model, pixel_size_um=size)
                            for item, size in zip(encoded, sizes, strict=True)]
            except InvalidImageError as error:
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(
                    f"{error.code}: {error.message}")))
                continue
            qc = np.array([[json.dumps(_carried(p)).encode()] for p in prepared], dtype=object)
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("image", np.stack([p.preprocessed for p in prepared])),
                pb_utils.Tensor("qc", qc),
            ]))
        return responses


def _pixel_sizes(stated: np.ndarray | None, count: int) -> list[float | None]:
    """The pixel size of each of ``count`` images: none stated (measured from the red cells), or one each.

    A value outside ``PIXEL_SIZE_RANGE_UM`` (or not a number) fails the request as ``bad_pixel_size``,
    as ``POST /v1/classify`` answers 422: a wrong magnification would rescale the field silently.
    """
    if stated is None:
        return [None] * count
    values = stated.reshape(-1)
    if len(values) != count:
        raise InvalidImageError("bad_pixel_size", f"{len(values)} pixel sizes for {count} images")
    try:
        return [check_pixel_size(value) for value in values]
    except ValueError as error:
        raise InvalidImageError("bad_pixel_size", str(error)) from error


def _carried(prepared: PreparedField) -> dict:
    """What ``interpret`` needs of the preparation: the QC, the field statistics (OOD check) and the scale plan."""
    statistics = None if prepared.statistics is None else prepared.statistics.tolist()
    scale = None if prepared.scale is None else asdict(prepared.scale)
    return {**prepared.qc.to_dict(), "statistics": statistics, "scale": scale}


def _uncarried(encoded: bytes) -> tuple[FieldQC, np.ndarray | None, ScalePlan | None]:
    values = json.loads(encoded)
    values.pop("flags", None)  # derived from the others
    statistics = values.pop("statistics", None)
    scale = values.pop("scale", None)
    return (FieldQC(**values), None if statistics is None else np.asarray(statistics, np.float32),
            None if scale is None else ScalePlan(**scale))


class InterpretModel:
    """Probabilities, mask and QC -> the field's ``FieldResult`` (JSON), review flag and cell count."""

    def initialize(self, args: dict) -> None:
        self.model = _served_model(args)
        size = self.model.image_size
        self._empty = np.empty((0, 0, 3), np.uint8)
        self._shape = (size, size)

    def execute(self, requests: list) -> list:
        pb_utils = _pb_utils()
        responses = []
        for request in requests:
            probabilities = pb_utils.get_input_tensor_by_name(request, "probabilities").as_numpy()
            mask = pb_utils.get_input_tensor_by_name(request, "mask").as_numpy()
            qc = pb_utils.get_input_tensor_by_name(request, "qc").as_numpy().reshape(-1)
            ood = pb_utils.get_input_tensor_by_name(request, "ood_score")
            ood = None if ood is None else ood.as_numpy()
            results = []
            for i in range(len(probabilities)):
                field_qc, statistics, scale = _uncarried(bytes(qc[i]))
                prepared = PreparedField(self._empty, self._empty, self._empty, field_qc, self._shape,
                                         statistics=statistics, scale=scale)
                output = EnsembleOutput(probabilities[i : i + 1], np.zeros((1, 0), np.float32), mask[i : i + 1],
                                        mask[i : i + 1], None if ood is None else ood[i : i + 1])
                results.append(interpret(prepared, output, self.model))
            responses.append(pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor("result", np.array([[r.model_dump_json(exclude_none=True).encode()]
                                                    for r in results], dtype=object)),
                pb_utils.Tensor("needs_review", np.array([[r.needs_review] for r in results], dtype=bool)),
                pb_utils.Tensor("cell_count", np.array([[r.cell_count] for r in results], dtype=np.int32)),
            ]))
        return responses
