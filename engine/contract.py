"""The integrator contract, read from the repository Triton serves: the README's tensor table comes from here.

``python -m engine.contract [REPOSITORY]`` prints the Markdown table; a test fails when the README's copy
or the running server's metadata differ from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

from tritonclient.grpc import model_config_pb2 as mc

from export.repository import ENSEMBLE, RAW_ENSEMBLE, parse_config
from hybridcn.config import default_repository

START, END = "<!-- tensor-table:start -->", "<!-- tensor-table:end -->"
_TYPES = {"TYPE_UINT8": "UINT8", "TYPE_FP32": "FP32", "TYPE_STRING": "BYTES", "TYPE_BOOL": "BOOL",
          "TYPE_INT32": "INT32"}


def ensemble_tensors(repository: Path, name: str) -> tuple[int, list[tuple[str, str, str, list[int]]]]:
    """``(max_batch_size, [(direction, tensor, datatype, shape with -1 for the batch)])`` of one ensemble."""
    config = parse_config((Path(repository) / name / "config.pbtxt").read_text())
    rows = [(direction, tensor.name, _TYPES[mc.DataType.Name(tensor.data_type)], [-1, *tensor.dims])
            for direction, tensors in (("input", config.input), ("output", config.output)) for tensor in tensors]
    return config.max_batch_size, rows


def optional_inputs(repository: Path, name: str) -> set[str]:
    """The inputs of one ensemble that a request may leave out."""
    config = parse_config((Path(repository) / name / "config.pbtxt").read_text())
    return {tensor.name for tensor in config.input if tensor.optional}


def tensor_table(repository: Path) -> str:
    """The Markdown table of both ensembles' tensors, as the README shows it."""
    lines = ["| ensemble | max batch | in/out | tensor | datatype | shape |", "|---|---|---|---|---|---|"]
    for name in (ENSEMBLE, RAW_ENSEMBLE):
        max_batch, rows = ensemble_tensors(repository, name)
        optional = optional_inputs(repository, name)
        for direction, tensor, kind, shape in rows:
            direction = f"{direction} (optional)" if tensor in optional else direction
            lines.append(f"| `{name}` | {max_batch} | {direction} | `{tensor}` | {kind} | "
                         f"`[{', '.join(str(d) for d in shape)}]` |")
    return "\n".join(lines) + "\n"


def readme_table(readme: Path) -> str:
    """The table between the README's markers."""
    text = Path(readme).read_text()
    return text[text.index(START) + len(START) : text.index(END)].strip("\n") + "\n"


if __name__ == "__main__":
    print(tensor_table(Path(sys.argv[1]) if len(sys.argv) > 1 else default_repository()), end="")
