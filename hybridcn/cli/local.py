"""``hybridcn classify FILE...`` and ``hybridcn demo`` (the README's main job): the CLI's served-model commands."""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn

from engine.client import TritonClient
from engine.field import interpret, prepare_bytes
from engine.model import ServedModel
from engine.triton_server import free_port, triton_endpoint, wait_until
from gateway.app import create_app
from gateway.settings import GatewaySettings
from hybridcn.contracts import FieldResult
from hybridcn.synth import write_dataset
from preprocessing import InvalidImageError


def _format(name: str, result: FieldResult) -> str:
    probabilities = " ".join(f"{k}={v:.3f}" for k, v in result.probabilities.items())
    review = "REVIEW" if result.needs_review else "ok"
    return f"{name}: {result.label:<6} conf={result.confidence:.3f} cells={result.cell_count} {review}  " \
           f"[{probabilities}]"


def classify_files(files: list[Path], *, repository: Path, triton: str | None = None, as_json: bool = False) -> int:
    """Classify each file; a bad file is reported and skipped. Exit code 1 if any file failed."""
    model = ServedModel.from_repository(repository)
    failures = 0
    with triton_endpoint(repository, triton) as url:
        client = TritonClient(url)
        for path in files:
            try:
                prepared = prepare_bytes(Path(path).read_bytes(), model)
                started = time.perf_counter()
                output = client.infer(prepared.preprocessed[None])
                result = interpret(prepared, output, model, {"triton": (time.perf_counter() - started) * 1000})
                result.filename = str(path)
                line = result.model_dump_json(exclude_none=True) if as_json else _format(str(path), result)
                print(line, flush=True)
            except (InvalidImageError, OSError) as error:
                failures += 1
                message = {"file": str(path), "error": str(error)}
                print(json.dumps(message) if as_json else f"{path}: ERROR {error}", file=sys.stderr, flush=True)
        client.close()
    return 1 if failures else 0


def demo(*, repository: Path, count: int = 16, clients: int = 4) -> int:
    """Serve the shipped model (embedded Triton + gateway over real HTTP) and classify a queue of fields.

    The queue is synthetic fields the project generates (real smears are not shipped), plus one
    corrupt file to show that a bad field is reported and the queue goes on.
    """
    with tempfile.TemporaryDirectory() as scratch:
        per_class = max(1, count // 4)
        dataset = write_dataset(Path(scratch) / "queue", per_class=per_class)
        queue = sorted((dataset / "Original").rglob("*.png"))
        broken = Path(scratch) / "broken.jpg"
        broken.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
        queue.append(broken)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(create_app(GatewaySettings(repository=repository)),
                                               host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        print(f"starting embedded Triton + gateway on http://127.0.0.1:{port} ...", flush=True)
        thread.start()
        base = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=60) as http:

            def ready() -> bool:
                if not thread.is_alive():
                    raise RuntimeError("gateway failed to start")
                try:
                    return http.get(f"{base}/readyz").status_code == 200
                except httpx.HTTPError:
                    return False

            try:
                wait_until(ready, timeout_s=180, interval_s=0.5)
            except Exception as error:
                print(f"gateway not ready: {error}", file=sys.stderr)
                return 1
            version = http.get(f"{base}/healthz").json()["model_version"]
            print(f"ready: model {version}; classifying {len(queue)} fields with {clients} concurrent clients",
                  flush=True)

            def send(path: Path) -> tuple[Path, int, dict]:
                response = http.post(f"{base}/v1/classify", content=path.read_bytes(),
                                     headers={"content-type": "application/octet-stream", "x-filename": path.name})
                return path, response.status_code, response.json()

            started = time.perf_counter()
            ok = 0
            with ThreadPoolExecutor(clients) as pool:
                for path, status, body in pool.map(send, queue):
                    truth = path.parent.name if path.parent.name != Path(scratch).name else "-"
                    if status == 200:
                        ok += 1
                        print(f"  {_format(path.name, FieldResult.model_validate(body))}  (synthetic {truth})",
                              flush=True)
                    else:
                        print(f"  {path.name}: HTTP {status} {body.get('code')}: {body.get('detail')}", flush=True)
            elapsed = time.perf_counter() - started
        server.should_exit = True
        thread.join(timeout=30)
    print(f"done: {ok}/{len(queue)} fields classified in {elapsed:.1f}s ({ok / elapsed:.1f} fields/s); "
          "synthetic fields are for demonstration - the model was trained on real smears.", flush=True)
    return 0
