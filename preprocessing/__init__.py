"""Phase 1 (CPU): decode, validate, QC, Reinhard, CLAHE, multiscale enhancement; watershed cell split.

Pure numpy/OpenCV functions shared by training, the gateway and the Triton ``preprocess`` step.
"""

from preprocessing.cells import Cell, split_cells
from preprocessing.decode import decode_image, read_image_file
from preprocessing.errors import InvalidImageError
from preprocessing.pipeline import PreprocessConfig, enhance_field, fit_field, preprocess_bytes, preprocess_field
from preprocessing.qc import FieldQC, field_qc
from preprocessing.stain import StainReference, fit_stain_reference, reinhard_normalize

__all__ = [
    "Cell",
    "FieldQC",
    "InvalidImageError",
    "PreprocessConfig",
    "StainReference",
    "decode_image",
    "enhance_field",
    "field_qc",
    "fit_field",
    "fit_stain_reference",
    "preprocess_bytes",
    "preprocess_field",
    "read_image_file",
    "reinhard_normalize",
    "split_cells",
]
