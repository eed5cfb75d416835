"""Changes to an exported segmentation graph that need no retraining, for a repository already shipped.

A graph exported from now on has them from the modules themselves (:func:`models.stages.smooth_mask`);
this brings an older graph to the same served outputs without touching a weight:

    python -m export.graph_patches model_repository

It is idempotent, and a deliberate step like any change to the shipped model (the graph file changes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

#: Prefix of the nodes and initialisers the mask filter adds.
MASK_FILTER = "mask_filter"


def _producer(graph: onnx.GraphProto, name: str) -> onnx.NodeProto:
    return next(node for node in graph.node if name in node.output)


def add_mask_filter(model: onnx.ModelProto) -> bool:
    """Put :func:`models.stages.smooth_mask` on the path to the ``mask`` output; ``False`` if it is there.

    The exported mask path is ``probability (N,1,H,W) -> Gather(channel 0) -> Clip -> Mul -> Round ->
    Cast``; the filter (edge padding, then a fixed 3 x 3 binomial convolution) goes before the Gather,
    so the gate the backbones see is untouched.
    """
    graph = model.graph
    node = _producer(graph, "mask")
    while node.op_type != "Gather":
        node = _producer(graph, node.input[0])
    probability = node.input[0]
    source = _producer(graph, probability)
    if source.op_type == "Conv" and _producer(graph, source.input[0]).op_type == "Pad":
        return False  # patched before, or exported with the filter (models.stages.smooth_mask)
    taps = np.array([0.25, 0.5, 0.25], np.float32)
    graph.initializer.extend([
        numpy_helper.from_array((taps[:, None] * taps[None, :]).reshape(1, 1, 3, 3), f"{MASK_FILTER}_kernel"),
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), f"{MASK_FILTER}_pads"),
    ])
    padded, smoothed = f"{MASK_FILTER}_padded", f"{MASK_FILTER}_output"
    nodes = [
        helper.make_node("Pad", [probability, f"{MASK_FILTER}_pads"], [padded], name=f"{MASK_FILTER}_pad", mode="edge"),
        helper.make_node("Conv", [padded, f"{MASK_FILTER}_kernel"], [smoothed], name=f"{MASK_FILTER}_conv"),
    ]
    position = list(graph.node).index(node)
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)
    node.input[0] = smoothed
    onnx.checker.check_model(model)
    return True


def patch_repository(repository: Path) -> bool:
    """Apply :func:`add_mask_filter` to ``repository``'s segmentation graph in place; whether it changed."""
    path = repository / "segmentation" / "1" / "model.onnx"
    model = onnx.load(path)
    if not add_mask_filter(model):
        return False
    onnx.save(model, path)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", type=Path)
    args = parser.parse_args(argv)
    changed = patch_repository(args.repository)
    print(f"{args.repository}: mask filter {'added' if changed else 'already present'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
