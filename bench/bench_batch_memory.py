"""Peak memory of ``hybridcn batch`` (and of ``hybridcn batch-reports``) against queue size: flat, or not?

    .venv/bin/python bench/bench_batch_memory.py --small 1000 --large 100000 > bench-memory.json

Makes two queues of ``--per-slide`` fields per slide folder from 16 synthetic PNGs, hard-linked under
distinct names (every field is read, decoded and inferred as usual; only the disk is spared), starts one
embedded Triton, and runs ``hybridcn batch QUEUE --out DIR --triton URL`` on each as a subprocess. The
batch process records its own peak RSS (``ru_maxrss``) as it exits, so the figure is exact, pool workers
and Triton excluded (they do not grow with the queue: workers hold one chunk, Triton one batch). Then
``hybridcn batch-reports`` rewrites the large queue's reports from its ledger, measured the same way.
Prints one JSON object: peaks in MB, their ratio (goal: large/small <= 1.3), and each run's queue
throughput (fields/s from the first claim to the last record, as ``hybridcn batch`` reports it).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.triton_server import EmbeddedTriton  # noqa: E402
from tests.support import link_queue, write_originals  # noqa: E402

#: Runs a hybridcn command in this process and writes its peak RSS (kB) to the file named by argv[1].
_MEASURED = """
import atexit, resource, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write(str(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)))
from hybridcn.cli import main
sys.exit(main(sys.argv[1:]))
"""


def measured(args: list[str], work: Path) -> tuple[int, float, float, list[str]]:
    """(exit status, peak RSS in MB, seconds, last line printed) of ``hybridcn ARGS`` in a fresh process."""
    peak_file = work / f"peak-{time.monotonic_ns()}"
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", _MEASURED, str(peak_file), *args], cwd=ROOT,
                            capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        sys.stderr.write(result.stderr[-3000:])
    return result.returncode, int(peak_file.read_text()) / 1024, elapsed, result.stdout.strip().splitlines()[-1:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--per-slide", type=int, default=100)
    parser.add_argument("--repository", default=str(ROOT / "model_repository"))
    args = parser.parse_args()
    result: dict = {"small_fields": args.small, "large_fields": args.large, "per_slide": args.per_slide,
                    "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        originals = write_originals(work / "originals", 16, seed=31_000)
        with EmbeddedTriton(Path(args.repository), ready_timeout=300) as server:
            for name, fields in (("small", args.small), ("large", args.large)):
                queue = work / f"queue-{name}"
                link_queue(queue, originals, fields, args.per_slide)
                code, peak, seconds, tail = measured(
                    ["batch", str(queue), "--out", str(work / f"out-{name}"), "--triton", server.grpc_url,
                     "--progress", "log", "--log-every", "60"], work)
                rate = re.search(r"\(([\d.]+) fields/s\)", tail[0] if tail else "")
                result[name] = {"exit": code, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1),
                                "queue_fields_per_s": float(rate.group(1)) if rate else None, "summary": tail}
                print(json.dumps({name: result[name]}), file=sys.stderr, flush=True)
        for name in ("small", "large"):
            code, peak, seconds, _ = measured(["batch-reports", "--out", str(work / f"out-{name}")], work)
            result[f"reports_{name}"] = {"exit": code, "peak_rss_mb": round(peak, 1), "seconds": round(seconds, 1)}
    result["batch_peak_ratio"] = round(result["large"]["peak_rss_mb"] / result["small"]["peak_rss_mb"], 3)
    result["reports_peak_ratio"] = round(result["reports_large"]["peak_rss_mb"]
                                         / result["reports_small"]["peak_rss_mb"], 3)
    result["throughput_ratio"] = round(result["large"]["queue_fields_per_s"] / result["small"]["queue_fields_per_s"], 3)
    result["goal"] = "batch_peak_ratio and reports_peak_ratio <= 1.3, throughput_ratio ~ 1"
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
