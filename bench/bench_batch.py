"""Batch throughput: ``hybridcn batch`` machinery vs a naive sequential loop, same fields, same embedded Triton.

    .venv/bin/python bench/bench_batch.py --fields 500 > bench-batch.json

Writes a synthetic queue (``--slides`` folders of PNG fields), starts the embedded Triton once, then
times (1) the naive loop: read a file, ``prepare_bytes``, one ``TritonClient.infer`` per field,
``interpret``; (2) :func:`batch.runner.run_batch` on the same folder (process pool, batched requests in
flight, ledger, reports), end to end from discovery to the last report file. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batch.runner import BatchOptions, default_workers, run_batch  # noqa: E402
from gateway.client import TritonClient  # noqa: E402
from gateway.service import ServedModel, interpret, prepare_bytes  # noqa: E402
from gateway.triton_launcher import EmbeddedTriton  # noqa: E402
from hybridcn.synth import synth_field  # noqa: E402


def write_queue(root: Path, fields: int, slides: int) -> list[Path]:
    paths = []
    for index in range(fields):
        path = root / f"S{index % slides:02d}" / f"field-{index:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        image = synth_field(index % 4, seed=20_000 + index).image
        cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
        paths.append(path)
    return paths


def naive(paths: list[Path], model: ServedModel, url: str) -> float:
    client = TritonClient(url)
    started = time.perf_counter()
    for path in paths:
        prepared = prepare_bytes(path.read_bytes(), model)
        output = client.infer(prepared.preprocessed[None])
        interpret(prepared, output, model)
    elapsed = time.perf_counter() - started
    client.close()
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=500)
    parser.add_argument("--slides", type=int, default=5, help="slide folders the fields are spread over")
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--workers", type=int, default=0)
    args = parser.parse_args()

    repository = Path(args.repository)
    model = ServedModel.from_repository(repository)
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        queue = Path(scratch) / "queue"
        paths = write_queue(queue, args.fields, args.slides)
        with EmbeddedTriton(repository) as server:
            warm = TritonClient(server.grpc_url)
            for _ in range(3):  # first requests pay for lazy initialisation in the Python backend
                warm.infer(prepare_bytes(paths[0].read_bytes(), model).preprocessed[None].repeat(8, axis=0))
            warm.close()
            load_before = os.getloadavg()
            naive_s = naive(paths, model, server.grpc_url)
            options = BatchOptions(out_dir=Path(scratch) / "out", repository=repository,
                                   triton_urls=(server.grpc_url,), batch_size=args.batch_size,
                                   inflight=args.inflight, workers=args.workers)
            started = time.perf_counter()
            summary = run_batch([queue], options)
            batch_s = time.perf_counter() - started
            load_after = os.getloadavg()
    assert summary.counts["done"] == args.fields, summary.counts
    result = {
        "fields": args.fields,
        "slides": args.slides,
        "cpu_cores": default_workers(),
        "naive_sequential": {"seconds": round(naive_s, 2), "fields_per_s": round(args.fields / naive_s, 2),
                             "how": "read, prepare_bytes, one TritonClient.infer per field, interpret"},
        "hybridcn_batch": {
            "seconds": round(batch_s, 2), "fields_per_s": round(args.fields / batch_s, 2),
            "queue_seconds": round(summary.queue_s, 2), "queue_fields_per_s": round(summary.fields_per_s, 2),
            "how": f"run_batch end to end (discovery, ledger, pool of {args.workers or default_workers()} "
                   f"workers, {args.batch_size} fields/request, {args.inflight} in flight, reports with gallery)",
        },
        "speedup": round(naive_s / batch_s, 2),
        "speedup_queue_only": round(naive_s / summary.queue_s, 2) if summary.queue_s else None,
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "model_version": model.model_version,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
