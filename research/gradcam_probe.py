"""Would Grad-CAM on the served features stage show the cells? Measured on the shipped graphs, no training.

    .venv/bin/python research/gradcam_probe.py --data DATA --per-class 50

The served features graph pools two final feature maps (ConvNeXt 320 x 3 x 3, NASNet 384 x 4 x 4 at
112 px). Grad-CAM (Selvaraju et al., ICCV 2017) weights each map channel by the mean gradient of the
predicted class's logit and keeps the positive part. Here the maps are read from the shipped ONNX graph
(exposed as extra outputs in memory), the head is rebuilt in PyTorch from the shipped head graph's
weights (checked against ONNX Runtime), and the gradient is taken through the head, the ConvNeXt head
norm and the pooling. For each field: the mean map inside the cells (the U-Net mask the model used,
over 0.5) against outside, for Grad-CAM and for the U-Net attention gate the page shows today. Prints
the medians and the share of fields where inside >= 2x outside. Reads the fields the shipped model was
trained on (no held-out fold model is kept in git), which is what the page shows anyway.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.field import prepare_array  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from export.runtime import onnx_session  # noqa: E402
from hybridcn.profiles import Profile  # noqa: E402
from models import create_model  # noqa: E402
from research.gradcam import GradCam  # noqa: E402
from training.data import find_samples, read_rgb  # noqa: E402

REPOSITORY = ROOT / "model_repository"
MAPS = ("/features/convnext/stages/stages.3/blocks/blocks.1/Add_output_0", "/features/nasnet/act/Relu_output_0")
# the head graph's MatMul weights (transposed Linear weights), in module order
LINEARS = ("embed", "layers.0.attention.qkv", "layers.0.attention.proj", "layers.0.mlp.0", "layers.0.mlp.3",
           "layers.1.attention.qkv", "layers.1.attention.proj", "layers.1.mlp.0", "layers.1.mlp.3")


def rebuilt_head(model: ServedModel) -> torch.nn.Module:
    graph = onnx.load(REPOSITORY / "head" / "1" / "model.onnx")
    weights = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.graph.initializer}
    head = create_model("mhsa_head", Profile.from_dict(model.manifest.profile),
                        num_features=model.manifest.feature_width, k=int(weights["head.selection.index"].numel()))
    matmuls = [w for name, w in weights.items() if name.startswith("onnx::MatMul")]
    state = {f"{name}.weight": w.T.contiguous() for name, w in zip(LINEARS, matmuls, strict=True)}
    state.update({name[len("head."):]: w for name, w in weights.items() if name.startswith("head.")})
    head.load_state_dict(state, strict=True)
    return head.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--per-class", type=int, default=50)
    args = parser.parse_args()
    model = ServedModel.from_repository(REPOSITORY)
    head = rebuilt_head(model)
    features_graph = onnx.load(REPOSITORY / "features" / "1" / "model.onnx")
    norm = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in features_graph.graph.initializer
            if i.name.startswith("features.convnext.head.norm")}
    for name in MAPS:
        features_graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    segmentation = onnx_session(REPOSITORY / "segmentation" / "1" / "model.onnx")
    features = ort.InferenceSession(features_graph.SerializeToString(), providers=["CPUExecutionProvider"])
    check = onnx_session(REPOSITORY / "head" / "1" / "model.onnx")
    everything = find_samples(args.data)
    samples = [s for c in range(4) for s in [s for s in everything if s.label == c][: args.per_class]]
    hires = GradCam.from_repository(REPOSITORY, model.manifest)
    ratios = {"gradcam": [], "unet_gate": [], "hirescam_stage1": []}
    deletion = {"top": [], "random": []}
    rng = np.random.default_rng(0)
    parity = 0.0
    for sample in samples:
        prepared = prepare_array(read_rgb(sample.path), model)
        mask, gate, segmented = segmentation.run(None, {"image": prepared.preprocessed[None]})
        pooled, convnext_map, nasnet_map = features.run(None, {"segmented_image": segmented})
        a_c = torch.from_numpy(convnext_map).requires_grad_(True)
        a_n = torch.from_numpy(nasnet_map).requires_grad_(True)
        c = F.layer_norm(a_c.mean((2, 3)), (a_c.shape[1],), norm["features.convnext.head.norm.weight"],
                         norm["features.convnext.head.norm.bias"], eps=1e-6)
        logits, _ = head(torch.cat([c, a_n.mean((2, 3))], 1))
        parity = max(parity, float(np.abs(torch.cat([c, a_n.mean((2, 3))], 1).detach().numpy() - pooled).max()))
        expected = check.run(None, {"features": pooled})[0]
        parity = max(parity, float(np.abs(torch.softmax(logits, 1).detach().numpy() - expected).max()))
        logits[0, logits.argmax()].backward()
        cams = []
        for a in (a_c, a_n):
            weights = a.grad.mean((2, 3), keepdim=True)
            cam = F.relu((weights * a).sum(1, keepdim=True))
            cam = F.interpolate(cam, size=mask.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
            cams.append(cam / cam.max() if cam.max() > 0 else cam)
        cam = ((cams[0] + cams[1]) / 2).detach().numpy()
        fine = hires.explain(segmented, pooled)[0].astype(np.float32)
        inside = mask[0] > 127
        if inside.any() and (~inside).any():
            for name, values in (("gradcam", cam), ("unet_gate", gate[0].astype(np.float32)),
                                 ("hirescam_stage1", fine)):
                ratios[name].append(values[inside].mean() / max(values[~inside].mean(), 1e-6))
        # deletion (Petsiuk et al., BMVC 2018): blank the top 10% of the map in the backbones' input, or as
        # many random pixels; a map that shows what the answer rests on costs the answer more
        label = int(expected[0].argmax())
        count = fine.size // 10
        for name, chosen in (("top", np.argsort(fine.reshape(-1))[-count:]),
                             ("random", rng.choice(fine.size, count, replace=False))):
            blanked = segmented.copy().reshape(1, 3, -1)
            blanked[..., chosen] = 0.0
            features_now = features.run(None, {"segmented_image": blanked.reshape(segmented.shape)})[0]
            probability = check.run(None, {"features": features_now})[0][0, label]
            deletion[name].append(float(expected[0, label] - probability))
    print(f"fields {len(samples)}; rebuilt head vs ONNX max abs diff {parity:.2e}")
    for name, values in ratios.items():
        values = np.array(values)
        print(f"{name:<16} inside/outside: median {np.median(values):.2f}, share >= 2x {np.mean(values >= 2):.1%}")
    print(f"deletion of the top 10% of the HiResCAM map: the answer's probability falls by "
          f"{np.mean(deletion['top']):.4f} on average; of 10% random pixels: {np.mean(deletion['random']):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
