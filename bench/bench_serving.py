"""Serving throughput on the same synthetic fields, all paths in one run; prints JSON.

Paths (images/s, end to end from encoded PNG bytes to probabilities unless noted):
- ``naive_eager_pytorch``: what a user would write first: decode, preprocess, eager PyTorch stages, one
  image at a time;
- ``in_process_onnxruntime``: decode + preprocess, then the three ONNX graphs in-process at batch B;
- ``triton_grpc``: preprocessed uint8 fields straight to the embedded Triton, single-field requests with
  several in flight (Triton's dynamic batcher forms the batches); inference only, no decode/preprocess;
- ``gateway_http``: PNG uploads to the gateway (a separate process) with several concurrent clients.
Ratios are taken within this run. Usage:
``python bench/bench_serving.py [--images 64] [--clients 8] [--checkpoint runs/RUN/final/model.pt]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.client import TritonClient  # noqa: E402
from engine.field import prepare_bytes  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from engine.triton_server import EmbeddedTriton, free_port  # noqa: E402
from export.runtime import OnnxEnsemble  # noqa: E402
from hybridcn.synth import synth_field  # noqa: E402

REPOSITORY = ROOT / "model_repository"


def encoded_fields(count: int) -> list[bytes]:
    out = []
    for i in range(count):
        ok, data = cv2.imencode(".png", cv2.cvtColor(synth_field(i % 4, seed=1000 + i).image, cv2.COLOR_RGB2BGR))
        out.append(data.tobytes())
    return out


def rate(count: int, seconds: float) -> float:
    return round(count / seconds, 2)


def bench_naive_eager(payloads: list[bytes], model: ServedModel, checkpoint: Path | None) -> dict:
    """``checkpoint``: the shipped model's ``model.pt`` (its profile must match the repository's); without
    one, fresh weights of the same architecture and sizes."""
    import torch

    from hybridcn.profiles import Profile
    from models import FeatureStage, HeadStage, create_model, segmentation_stage

    torch.set_num_threads(os.cpu_count() or 1)
    profile = Profile.from_dict(model.manifest.profile)
    if checkpoint is not None:
        from training.pipeline import load_trained

        trained = load_trained(checkpoint)
        if trained.profile != profile:
            raise SystemExit(f"{checkpoint} is not the shipped model's profile; pass that run's model.pt")
        stages = (trained.segmentation, trained.features, trained.head)
        weights = f"trained checkpoint {checkpoint}"
    else:
        features = create_model("hybrid_features", profile)
        stages = (segmentation_stage(profile), FeatureStage(features),
                  HeadStage(create_model("mhsa_head", profile, num_features=features.num_features)))
        weights = "fresh weights, same architecture (no --checkpoint)"
    segmentation, feature_stage, head = (s.eval() for s in stages)
    with torch.inference_mode():
        def one(data: bytes) -> None:
            field = prepare_bytes(data, model).preprocessed
            _, _, segmented = segmentation(torch.from_numpy(field[None]))
            head(feature_stage(segmented))

        one(payloads[0])
        started = time.perf_counter()
        for data in payloads:
            one(data)
        elapsed = time.perf_counter() - started
    return {"images_per_s": rate(len(payloads), elapsed), "weights": weights}


def bench_in_process(payloads: list[bytes], model: ServedModel, batch: int) -> dict:
    ensemble = OnnxEnsemble(REPOSITORY)
    ensemble.infer(prepare_bytes(payloads[0], model).preprocessed[None])
    started = time.perf_counter()
    for start in range(0, len(payloads), batch):
        fields = np.stack([prepare_bytes(d, model).preprocessed for d in payloads[start : start + batch]])
        ensemble.infer(fields)
    return {"images_per_s": rate(len(payloads), time.perf_counter() - started), "batch": batch}


def bench_triton(url: str, fields: np.ndarray, inflight: int) -> dict:
    client = TritonClient(url)
    client.infer(fields[:1])
    started = time.perf_counter()
    pending = []
    for i in range(len(fields)):
        pending.append(client.submit(fields[i : i + 1]))
        if len(pending) >= inflight:
            pending.pop(0).result()
    for future in pending:
        future.result()
    elapsed = time.perf_counter() - started
    client.close()
    return {"images_per_s": rate(len(fields), elapsed), "inflight": inflight, "what": "inference only"}


def bench_gateway(base: str, payloads: list[bytes], clients: int) -> dict:
    with httpx.Client(timeout=120) as http:
        http.post(f"{base}/v1/classify", content=payloads[0])

        def send(data: bytes) -> int:
            return http.post(f"{base}/v1/classify", content=data).status_code

        started = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            statuses = list(pool.map(send, payloads))
        elapsed = time.perf_counter() - started
    assert all(s == 200 for s in statuses), statuses
    return {"images_per_s": rate(len(payloads), elapsed), "clients": clients}


def start_gateway(triton_url: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "HYBRIDCN_TRITON_URL": triton_url, "HYBRIDCN_REPOSITORY": str(REPOSITORY)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "gateway.app:create_app", "--factory", "--host", "127.0.0.1",
         "--port", str(port), "--log-level", "warning"], env=env, cwd=ROOT,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return process, base
        except httpx.HTTPError:
            time.sleep(0.3)
    process.terminate()
    raise RuntimeError("gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--checkpoint", type=Path, help="the shipped model's model.pt, for the eager PyTorch loop")
    args = parser.parse_args()
    model = ServedModel.from_repository(REPOSITORY)
    payloads = encoded_fields(args.images)
    fields = np.stack([prepare_bytes(d, model).preprocessed for d in payloads])
    results: dict = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "processor": platform.machine()},
        "model_version": model.model_version, "images": args.images,
    }
    results["naive_eager_pytorch"] = bench_naive_eager(payloads, model, args.checkpoint)
    results["in_process_onnxruntime"] = bench_in_process(payloads, model, args.batch)
    with EmbeddedTriton(REPOSITORY) as triton:
        results["triton_grpc"] = bench_triton(triton.grpc_url, fields, inflight=args.clients)
        gateway, base = start_gateway(triton.grpc_url)
        try:
            results["gateway_http"] = bench_gateway(base, payloads, args.clients)
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    naive = results["naive_eager_pytorch"]["images_per_s"]
    in_process = results["in_process_onnxruntime"]["images_per_s"]
    gateway_rate = results["gateway_http"]["images_per_s"]
    results["ratios"] = {
        "gateway_vs_naive": round(gateway_rate / naive, 2),
        "in_process_vs_naive": round(in_process / naive, 2),
        "gateway_overhead_vs_in_process": round(1 - gateway_rate / in_process, 3),
    }
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
