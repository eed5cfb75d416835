"""Fields/s of one shared PostgreSQL queue worked by 1, 2 and 3 ``hybridcn batch`` workers.

    .venv/bin/python bench/bench_queue_scaling.py --fields 600 > bench-scaling.json

Starts a throwaway PostgreSQL (Debian's package, as the tests do) and ``--tritons`` embedded Tritons,
makes one synthetic queue (16 PNGs hard-linked under distinct names), then for each worker count
registers the queue in a fresh database (through the ledger API) and starts that many workers at once
(``hybridcn batch --ledger URL --triton ...``, endpoints dealt round robin, default options otherwise).
Reported per count: wall seconds from the start of the workers to the last one's exit, and the queue's processing rate
from its first recorded field to its last (start-up excluded), with the speedup over one worker. On a
machine with few cores the workers share them with Triton, so expect little gain there: the numbers
say how much.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from batch.inputs import DiscoveryOptions, iter_discover  # noqa: E402
from batch.ledger import open_ledger  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from engine.triton_server import EmbeddedTriton  # noqa: E402
from tests.postgres_server import ThrowawayPostgres  # noqa: E402
from tests.support import link_queue, write_originals  # noqa: E402


def run_workers(count: int, url: str, queue: Path, tritons: list[str], work: Path, model: ServedModel) -> dict:
    with open_ledger(url) as ledger:  # the queue is registered first, as a lab's first worker would
        ledger.bind_model(model.model_version)
        ledger.register(iter_discover([queue], DiscoveryOptions(tile_size=model.field_size)))
    started = time.perf_counter()
    processes = [subprocess.Popen([sys.executable, "-m", "hybridcn.cli", "batch", "--ledger", url, "--out",
                                   str(work / f"w{count}-{i}"), "--triton", tritons[i % len(tritons)],
                                   "--progress", "none", "--gallery", "0"], cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True) for i in range(count)]
    codes = [process.wait(timeout=3600) for process in processes]
    wall = time.perf_counter() - started
    with psycopg.connect(url) as connection:
        done, first, last = connection.execute(
            "SELECT count(*), min(updated), max(updated) FROM fields WHERE status = 'done'").fetchone()
        per_worker = dict(connection.execute("SELECT done_by, count(*) FROM fields GROUP BY done_by").fetchall())
    window = (last - first) if done > 1 else 0.0
    return {"workers": count, "exit": codes, "done": done, "wall_s": round(wall, 2),
            "fields_per_s_wall": round(done / wall, 2),
            "fields_per_s_processing": round((done - 1) / window, 2) if window > 0 else None,
            "per_worker": sorted(per_worker.values(), reverse=True)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fields", type=int, default=600)
    parser.add_argument("--per-slide", type=int, default=50)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--tritons", type=int, default=1, help="embedded Triton servers the workers share")
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    args = parser.parse_args()
    result: dict = {"fields": args.fields, "tritons": args.tritons, "cpus": os.cpu_count(), "runs": []}
    with tempfile.TemporaryDirectory(prefix="bench-scaling-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        model = ServedModel.from_repository(Path(args.repository))
        link_queue(work / "queue", write_originals(work / "originals", 16, seed=32_000), args.fields, args.per_slide)
        postgres = stack.enter_context(ThrowawayPostgres())
        tritons = [stack.enter_context(EmbeddedTriton(Path(args.repository), ready_timeout=300)).grpc_url
                   for _ in range(args.tritons)]
        for count in args.workers:
            run = run_workers(count, postgres.create_database(), work / "queue", tritons, work, model)
            result["runs"].append(run)
            print(json.dumps(run), file=sys.stderr, flush=True)
    base = result["runs"][0]
    for run in result["runs"]:
        for key in ("fields_per_s_wall", "fields_per_s_processing"):
            if run[key] and base[key]:
                run[f"speedup_{key.removeprefix('fields_per_s_')}"] = round(run[key] / base[key], 3)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
