"""Export the three served stages to ONNX with chosen tensor names and a dynamic batch axis, then prove parity.

Uses the legacy TorchScript-based exporter (``dynamo=False``) at opset 17, which handles timm's
NASNet-A and ConvNeXt and the Attention U-Net exactly; ONNX Runtime's output is compared with
PyTorch's under an explicit tolerance before a file is accepted.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.runtime import onnx_session

OPSET = 17


@dataclass(frozen=True)
class ParityReport:
    name: str
    max_abs_diff: dict[str, float]
    tolerance: float
    quantized: frozenset[str] = frozenset()  # uint8 outputs: differences counted in steps, at most one

    @property
    def ok(self) -> bool:
        return all(v <= (1.0 if k in self.quantized else self.tolerance) for k, v in self.max_abs_diff.items())


def export_onnx(
    module: nn.Module, example: torch.Tensor, path: Path, *, input_names: tuple[str, ...],
    output_names: tuple[str, ...],
) -> Path:
    """Write ``module`` to ``path`` with named tensors, batch axis 0 dynamic; checks the graph."""
    module = module.eval().cpu()
    path.parent.mkdir(parents=True, exist_ok=True)
    dynamic_axes = {name: {0: "batch"} for name in (*input_names, *output_names)}
    with torch.no_grad():
        torch.onnx.export(
            module, (example,), str(path), input_names=list(input_names), output_names=list(output_names),
            dynamic_axes=dynamic_axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


def check_parity(
    module: nn.Module, path: Path, example: torch.Tensor, *, output_names: tuple[str, ...], tolerance: float,
) -> ParityReport:
    """Max absolute difference per output between PyTorch and ONNX Runtime on ``example``."""
    with torch.no_grad():
        expected = module.eval()(example)
    expected = expected if isinstance(expected, tuple | list) else (expected,)
    session = onnx_session(path)
    actual = session.run(list(output_names), {session.get_inputs()[0].name: example.numpy()})
    diffs, quantized = {}, set()
    for name, want, got in zip(output_names, expected, actual, strict=True):
        want = want.numpy()
        if want.dtype == np.uint8:  # quantised maps: one step of rounding difference is allowed
            diffs[name] = float(np.abs(want.astype(np.int16) - got.astype(np.int16)).max())
            quantized.add(name)
        else:
            diffs[name] = float(np.abs(want.astype(np.float64) - got.astype(np.float64)).max())
    return ParityReport(path.stem, diffs, tolerance, frozenset(quantized))
