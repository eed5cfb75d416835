"""Batch throughput: ``hybridcn batch`` machinery vs a naive sequential loop, same fields, same embedded Triton.

    .venv/bin/python bench/bench_batch.py --fields 500 > bench-batch.json

Writes a synthetic queue (``--slides`` folders of PNG fields), then times (1) the naive loop: read a
file, ``prepare_bytes``, one ``TritonClient.infer`` per field, ``interpret``, both on the embedded Triton
as ``hybridcn serve`` starts it and as ``hybridcn batch`` starts it; (2) :func:`batch.runner.run_batch`
on the same folder (process pool, batched requests in flight, ledger, reports), end to end from
discovery to the last report file, on the server ``hybridcn batch`` starts. Server start-up and warm-up
are outside every timing. The speedup is against the faster naive run. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import cv2

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batch.runner import BatchOptions, default_workers, run_batch  # noqa: E402
from engine.client import TritonClient  # noqa: E402
from engine.field import interpret, prepare_bytes  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from engine.triton_server import EmbeddedTriton  # noqa: E402
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


def _features_loop(path: str, iterations: int) -> float:
    """Seconds for ``iterations`` single-threaded ONNX Runtime runs of the features graph (batch 8)."""
    import numpy as np

    from export.runtime import onnx_session

    session = onnx_session(Path(path), threads=1)
    channels, height, width = session.get_inputs()[0].shape[1:]  # the model's own input size
    feed = {"segmented_image": np.random.default_rng(0).standard_normal((8, channels, height, width), dtype=np.float32)}
    session.run(None, feed)
    started = time.perf_counter()
    for _ in range(iterations):
        session.run(None, feed)
    return time.perf_counter() - started


def parallel_efficiency(repository: Path, iterations: int = 6) -> float:
    """How much two CPU-bound processes slow each other here: 1.0 = two independent cores.

    The same work alone, then in two processes at once; the ratio of the times. On shared virtual
    machines it is often well below 1, which caps what any pipeline can gain over a sequential loop.
    """
    from concurrent.futures import ProcessPoolExecutor

    path = str(repository / "features" / "1" / "model.onnx")
    with ProcessPoolExecutor(2) as pool:
        list(pool.map(_features_loop, [path] * 2, [1] * 2))  # start both workers, load the graph
        alone = pool.submit(_features_loop, path, iterations).result()
        together = max(pool.map(_features_loop, [path] * 2, [iterations] * 2))
    return alone / together


def warm_up(url: str, path: Path, model: ServedModel) -> None:
    """First requests pay for lazy initialisation in the Python backend; keep that out of the timings."""
    client = TritonClient(url)
    batch = prepare_bytes(path.read_bytes(), model).preprocessed[None].repeat(8, axis=0)
    for _ in range(3):
        client.infer(batch)
    client.close()


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
    options = BatchOptions(out_dir=Path("."), repository=repository, batch_size=args.batch_size,
                           inflight=args.inflight, workers=args.workers)
    batch_threads = options.ort_threads  # what `hybridcn batch` gives the embedded server it starts
    naive_s: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        queue = Path(scratch) / "queue"
        paths = write_queue(queue, args.fields, args.slides)
        load_before = os.getloadavg()
        efficiency = parallel_efficiency(repository)
        # The naive loop against the server `hybridcn serve` starts (ORT's default threads: lowest latency per
        # request, its best case) and against the one `hybridcn batch` starts (one ORT thread per stage).
        with EmbeddedTriton(repository) as server:
            warm_up(server.grpc_url, paths[0], model)
            naive_s["serve_server"] = naive(paths, model, server.grpc_url)
        with EmbeddedTriton(repository, ort_threads=batch_threads) as server:
            warm_up(server.grpc_url, paths[0], model)
            naive_s["batch_server"] = naive(paths, model, server.grpc_url)
            options = replace(options, out_dir=Path(scratch) / "out", triton_urls=(server.grpc_url,))
            started = time.perf_counter()
            summary = run_batch([queue], options)
            batch_s = time.perf_counter() - started
        load_after = os.getloadavg()
    assert summary.counts["done"] == args.fields, summary.counts
    best_naive = min(naive_s.values())
    result = {
        "fields": args.fields,
        "slides": args.slides,
        "cpu_cores": default_workers(),
        "parallel_efficiency": round(efficiency, 2),
        "naive_sequential": {
            name: {"seconds": round(seconds, 2), "fields_per_s": round(args.fields / seconds, 2)}
            for name, seconds in naive_s.items()
        } | {"how": "read, prepare_bytes, one TritonClient.infer per field, interpret; on the embedded server as "
                    "`hybridcn serve` starts it (serve_server) and as `hybridcn batch` starts it (batch_server)"},
        "hybridcn_batch": {
            "seconds": round(batch_s, 2), "fields_per_s": round(args.fields / batch_s, 2),
            "queue_seconds": round(summary.queue_s, 2), "queue_fields_per_s": round(summary.fields_per_s, 2),
            "how": f"run_batch end to end (discovery, ledger, pool of {args.workers or default_workers()} "
                   f"workers, {args.batch_size} fields/request, {args.inflight} in flight, reports with gallery) "
                   f"on the embedded server as `hybridcn batch` starts it (ort_threads={batch_threads})",
        },
        "speedup_vs_best_naive": round(best_naive / batch_s, 2),
        "speedup_queue_only": round(best_naive / summary.queue_s, 2) if summary.queue_s else None,
        "loadavg_1m": [round(load_before[0], 2), round(load_after[0], 2)],
        "model_version": model.model_version,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
