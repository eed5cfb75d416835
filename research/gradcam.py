"""What drove the served model's answer: a HiResCAM of the shipped graphs (research; not served).

HiResCAM (Draelos RL, Carin L, "Use HiResCAM instead of Grad-CAM for faithful explanations of
convolutional neural networks", arXiv:2011.08891, 2020), the element-wise variant of Grad-CAM
(Selvaraju RR et al., ICCV 2017): a feature map times the gradient of the predicted class's logit with
respect to it, summed over channels, the positive part kept. Grad-CAM averages the gradient over the map
first, which can light up places that do not raise the score; HiResCAM shows exactly where the map's
contribution to the logit sits. The map is ConvNeXt's stage-1 output, 14 x 14 of a 112 px field; the
gradient flows from the head's logit through the rest of ConvNeXt, its head norm and the pooling. The
final feature maps (3 x 3 and 4 x 4) are too coarse to tell a cell from the glass around it
(``research/gradcam_probe.py``). It explains the ConvNeXt half of the features; NASNet's half enters the
logit as served but is not mapped.

The networks come from the served repository itself: ConvNeXt and the head are rebuilt in PyTorch from
the ONNX graphs' weights (nothing else is shipped) and checked against them when loaded. NASNet's part
of the features is taken as served, so the gradient is the served model's at the served point.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
import torch.nn.functional as F
from onnx import numpy_helper

from hybridcn.contracts import Manifest
from hybridcn.profiles import Profile
from models import create_model

#: ConvNeXt stage whose output is explained (0-3): stage 1 is 14 x 14 at 112 px.
STAGE = 1


def _module_path(node_name: str, prefix: str) -> str:
    """``/features/convnext/stages/stages.0/blocks/blocks.1/Mul`` -> ``stages.0.blocks.1`` (under ``prefix``).

    The exporter names a node by its module scopes, each child as ``parent.child``; the last segment is
    the operator.
    """
    segments = node_name[len(prefix):].strip("/").split("/")[:-1]
    path: list[str] = []
    for segment in segments:
        if path and segment.startswith(path[-1] + "."):
            path[-1] = segment
        else:
            path.append(segment)
    return ".".join(path)


def _weights(graph: onnx.ModelProto, prefix: str) -> dict[str, torch.Tensor]:
    """A state dict for the module exported under ``prefix``: named initialisers, and the unnamed ones
    (transposed Linear weights, ConvNeXt's layer scales) named after the node that uses them."""
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    dotted = prefix.strip("/").replace("/", ".") + "."
    state = {name[len(dotted):]: torch.from_numpy(array.copy()) for name, array in arrays.items()
             if name.startswith(dotted)}
    for node in graph.graph.node:
        if not node.name.startswith(prefix + "/"):
            continue
        for name in node.input:
            if not name.startswith("onnx::") or name not in arrays:
                continue
            path = _module_path(node.name, prefix)
            if node.op_type == "MatMul":
                state[f"{path}.weight"] = torch.from_numpy(arrays[name].T.copy())
            elif node.op_type == "Mul":
                state[f"{path}.gamma"] = torch.from_numpy(arrays[name].reshape(-1).copy())
    return state


@dataclass
class GradCam:
    """``explain(segmented (N,3,H,W) f32, features (N,F) f32)`` -> uint8 maps ``(N,H,W)``, each 0-255."""

    convnext: torch.nn.Module
    head: torch.nn.Module

    @classmethod
    def from_repository(cls, repository: Path, manifest: Manifest) -> GradCam:
        """Rebuild ConvNeXt and the head from ``repository``'s graphs (ValueError if they do not fit)."""
        profile = Profile.from_dict(manifest.profile)
        features = onnx.load(repository / "features" / "1" / "model.onnx")
        convnext = timm.create_model(profile.features.convnext, num_classes=0)
        convnext.load_state_dict(_weights(features, "/features/convnext"), strict=True)
        head_graph = onnx.load(repository / "head" / "1" / "model.onnx")
        head_weights = _weights(head_graph, "/head")
        head = create_model("mhsa_head", profile, num_features=manifest.feature_width,
                            k=int(head_weights["selection.index"].numel()))
        head.load_state_dict(head_weights, strict=True)
        return cls(convnext.eval(), head.eval())

    def explain(self, segmented: np.ndarray, features: np.ndarray) -> np.ndarray:
        """The map of each field's top class, upsampled to the field and scaled to its own maximum (255).

        ``segmented`` and ``features`` are the served segmentation and features stages' outputs for the
        fields (:meth:`engine.client.TritonClient.explain_inputs`).
        """
        image = torch.from_numpy(np.ascontiguousarray(segmented, np.float32))
        served = torch.from_numpy(np.ascontiguousarray(features, np.float32))
        with torch.enable_grad():
            x = self.convnext.stem(image)
            explained = None
            for index, stage in enumerate(self.convnext.stages):
                x = stage(x)
                if index == STAGE:
                    explained = x
            pooled = self.convnext.forward_head(self.convnext.norm_pre(x), pre_logits=True)
            width = pooled.shape[1]
            logits, _ = self.head(torch.cat([pooled, served[:, width:]], dim=1))
            top = logits.gather(1, logits.argmax(dim=1, keepdim=True)).sum()
            (gradient,) = torch.autograd.grad(top, explained)
        with torch.no_grad():
            cam = F.relu((gradient * explained).sum(dim=1, keepdim=True))
            cam = F.interpolate(cam, size=image.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
            peak = cam.amax(dim=(1, 2), keepdim=True)
            cam = torch.where(peak > 0, cam / peak.clamp(min=1e-12), torch.zeros_like(cam))
            return torch.round(cam * 255.0).to(torch.uint8).numpy()
