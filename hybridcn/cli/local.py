"""``hybridcn classify FILE...`` and ``hybridcn demo`` (the README's main job): the CLI's served-model commands."""

from __future__ import annotations

import csv
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import uvicorn
from tenacity import RetryError
from tqdm import tqdm

from batch.inputs import FIELD_SUFFIXES
from engine.client import TritonClient, TritonUnavailableError
from engine.field import interpret, prepare_bytes
from engine.model import ServedModel
from engine.triton_server import free_port, triton_endpoint, wait_until
from gateway.app import create_app
from gateway.settings import GatewaySettings
from hybridcn.cli.errors import CliError
from hybridcn.contracts import FieldResult
from hybridcn.synth import write_dataset
from preprocessing import InvalidImageError


def _format(name: str, result: FieldResult) -> str:
    probabilities = " ".join(f"{k}={v:.3f}" for k, v in result.probabilities.items())
    review = "REVIEW" if result.needs_review else "ok"
    return f"{name}: {result.label:<6} conf={result.confidence:.3f} cells={result.cell_count} {review}  " \
           f"[{probabilities}]"


def collect_files(paths: list[Path]) -> list[Path]:
    """Image files named directly, and those under named folders (recursively, sorted); raises :class:`CliError`."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FIELD_SUFFIXES)
            if not found:
                raise CliError(f"{path}: no image files ({', '.join(FIELD_SUFFIXES)}) in this folder")
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise CliError(f"{path}: no such file or folder")
    return files


def _connect(url: str, *, timeout_s: float = 10.0) -> TritonClient:
    client = TritonClient(url)
    try:
        wait_until(client.ready, timeout_s=timeout_s, interval_s=0.5)
    except RetryError:
        client.close()
        raise CliError(f"Triton at {url} is not reachable or the hybridcn_nas model is not loaded (waited "
                       f"{timeout_s:.0f}s)") from None
    return client


def _csv_header(classes: tuple[str, ...]) -> list[str]:
    return ["file", "label", *(f"p_{c}" for c in classes), "confidence", "needs_review", "review_reasons",
            "review_threshold", "cell_count", "ood_score", "red_cell_px", "pixel_size_um", "rescaled_by", "qc_flags",
            "model_version", "error"]


def _csv_row(name: str, result: FieldResult | None, classes: tuple[str, ...], error: str = "") -> list:
    if result is None:
        return [name, "", *([""] * len(classes)), *([""] * 11), error]
    return [name, result.label, *(f"{result.probabilities[c]:.6f}" for c in classes), f"{result.confidence:.6f}",
            int(result.needs_review), "; ".join(result.review_reasons), result.review_threshold, result.cell_count,
            *("" if v is None else v
              for v in (result.ood_score, result.scale, result.pixel_size_um, result.rescaled_by)),
            ";".join(result.qc.flags), result.model_version, ""]


def classify_files(paths: list[Path], *, repository: Path, triton: str | None = None, as_json: bool = False,
                   csv_path: Path | None = None, progress: bool | None = None,
                   pixel_size_um: float | None = None) -> int:
    """Classify files and folders of fields; a bad file is reported and the rest go on.

    ``pixel_size_um`` (um per pixel of every file) fits them at the training scale without measuring
    their red cells.

    Output: one line per field on stdout (JSON Lines with ``as_json``: each line a ``FieldResult`` plus
    ``filename``), or a CSV file. Exit status 0, or 1 when any file failed.
    """
    files = collect_files(paths)
    model = ServedModel.from_repository(repository)
    failures = 0
    show_progress = sys.stderr.isatty() if progress is None else progress
    table = open(csv_path, "w", newline="") if csv_path else None  # noqa: SIM115 - closed below
    writer = csv.writer(table) if table else None
    if writer:
        writer.writerow(_csv_header(model.classes))
    try:
        with triton_endpoint(repository, triton) as url:
            client = _connect(url)
            try:
                for path in tqdm(files, desc="classify", unit="field", disable=not show_progress, file=sys.stderr):
                    try:
                        prepared = prepare_bytes(path.read_bytes(), model, pixel_size_um=pixel_size_um)
                        started = time.perf_counter()
                        output = client.infer(prepared.preprocessed[None])
                    except (InvalidImageError, OSError) as error:
                        failures += 1
                        if writer:
                            writer.writerow(_csv_row(str(path), None, model.classes, str(error)))
                        message = json.dumps({"filename": str(path), "error": str(error)}) if as_json \
                            else f"{path}: ERROR {error}"
                        tqdm.write(message, file=sys.stderr)
                        continue
                    except TritonUnavailableError as error:
                        raise CliError(str(error)) from None
                    result = interpret(prepared, output, model, {"triton": (time.perf_counter() - started) * 1000})
                    result.filename = str(path)
                    if writer:
                        writer.writerow(_csv_row(str(path), result, model.classes))
                    elif as_json:
                        tqdm.write(result.model_dump_json(exclude_none=True), file=sys.stdout)
                    else:
                        tqdm.write(_format(str(path), result), file=sys.stdout)
            finally:
                client.close()
    finally:
        if table:
            table.close()
    if csv_path:
        print(f"{len(files) - failures} of {len(files)} fields classified -> {csv_path}", file=sys.stderr)
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
