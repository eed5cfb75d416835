"""``hybridcn batch INPUT... --out DIR``: the command line over :func:`batch.runner.run_batch`.

With ``--ledger postgresql://...`` (or ``HYBRIDCN_LEDGER``) the queue is shared: start the same command
on as many machines as you like (INPUTs may be left out to join a queue others filled), each with its own
``--out`` for the reports it writes when the queue is finished. ``hybridcn batch-reports --ledger URL
--out DIR`` writes the reports of the whole queue at any time.

Exit status: 0 when every field is done, 3 when the queue finished but some fields failed (see
results.csv; ``--retry-failed`` retries them), 1 on an error that stopped the run (nothing is lost:
rerun the same command), 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from batch.inputs import InputError
from batch.ledger import DEFAULT_LEASE_S, FAILED, PENDING, SKIPPED, LedgerError, is_database_url
from batch.progress import make_progress
from batch.reports import ReportWriteError
from batch.runner import BatchError, BatchOptions, BatchSummary, open_queue, run_batch, write_queue_reports
from engine.triton_server import TritonStartError
from preprocessing.scale import check_pixel_size

EXIT_OK, EXIT_ERROR, EXIT_FIELDS_FAILED, EXIT_INTERRUPTED = 0, 1, 3, 130
#: The environment variable that gives ``--ledger`` its default (a shared queue for every worker of a deployment).
LEDGER_ENV = "HYBRIDCN_LEDGER"


def pixel_size_arg(text: str) -> float:
    """argparse type of ``--pixel-size``: a plausible um-per-pixel value (``classify`` uses it too)."""
    try:
        return check_pixel_size(float(text))
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_ledger_argument(parser: argparse.ArgumentParser, *, required: bool = False) -> None:
    default = os.environ.get(LEDGER_ENV) or None
    parser.add_argument("--ledger", default=default, required=required and default is None, metavar="URL",
                        help="a shared queue: postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or "
                             f"~/.pgpass); every worker given it works on the same fields (default: ${LEDGER_ENV}, "
                             "else OUT/ledger.sqlite for this run alone)")


def add_batch_arguments(parser: argparse.ArgumentParser, *, default_repository: Path) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="a folder per slide of field images, a folder of slide folders, a slide_id,path CSV "
                             "manifest, or a large slide image (TIFF/BigTIFF, PNG, JPEG; .svs, .ndpi, .mrxs... "
                             "through OpenSlide) to tile; may be left out with --ledger, to join a shared queue")
    parser.add_argument("--out", required=True, help="output folder: ledger, results.csv, slides.csv/json, HTML")
    add_ledger_argument(parser)
    parser.add_argument("--lease-seconds", type=float, default=DEFAULT_LEASE_S, metavar="S",
                        help="a worker that stops renewing its claims (killed, cut off) loses them after this long "
                             f"and other workers take its fields (default {DEFAULT_LEASE_S:.0f})")
    parser.add_argument("--worker-id", default=None, help="this worker's name in the shared queue "
                        "(default: host:pid:random)")
    parser.add_argument("--repository", default=str(default_repository), help="Triton model repository")
    parser.add_argument("--triton", action="append", default=[], metavar="HOST:PORT",
                        help="Triton gRPC endpoint; repeat for several (round robin). Default: start the embedded one")
    parser.add_argument("--retry-failed", action="store_true", help="process the fields that failed before again")
    parser.add_argument("--batch-size", type=int, default=8, help="fields per Triton request (default 8)")
    parser.add_argument("--inflight", type=int, default=4, help="Triton requests in flight (default 4)")
    parser.add_argument("--workers", type=int, default=0, help="preprocessing processes (default: one per core)")
    parser.add_argument("--ort-threads", type=int, default=1,
                        help="ONNX Runtime threads per stage of the embedded Triton this run starts (default 1: "
                             "stages side by side, best throughput; 0: ORT's default)")
    parser.add_argument("--attempts", type=int, default=3, help="tries per Triton request before a field fails")
    parser.add_argument("--tile", choices=["auto", "always", "never"], default="auto",
                        help="auto: tile slide images given as INPUT and images too large for a field")
    parser.add_argument("--tile-size", type=int, default=0, help="tile side in slide pixels (default: model size)")
    parser.add_argument("--pixel-size", type=pixel_size_arg, metavar="UM",
                        help="um per pixel of the inputs (a manifest's pixel_size_um column wins; default: measured "
                             "from each field's red cells)")
    parser.add_argument("--max-slide-pixels", type=int, default=None, metavar="PIXELS",
                        help="refuse slides over this many pixels (width x height) before reading them (default: "
                             "$HYBRIDCN_MAX_SLIDE_PIXELS, else 4000000000)")
    parser.add_argument("--gallery", type=int, default=6, help="fields per gallery section of a slide report")
    parser.add_argument("--progress", choices=["auto", "bar", "log", "none"], default="auto",
                        help="bars per slide on a terminal, log lines elsewhere (auto), or force one")
    parser.add_argument("--log-every", type=float, default=10.0, help="seconds between progress log lines")


def _fail(message: str, code: int = EXIT_ERROR) -> int:
    print(f"hybridcn batch: error: {message}", file=sys.stderr, flush=True)
    return code


def _check_ledger(url: str | None) -> None:
    if url is not None and not is_database_url(url):
        raise ValueError(f"--ledger must be a postgresql:// URL, got {url!r} (leave it out for OUT/ledger.sqlite)")


def run_batch_cli(args: argparse.Namespace) -> int:
    try:
        _check_ledger(args.ledger)
        if not args.inputs and not args.ledger:
            raise ValueError("give at least one INPUT (or --ledger URL, to join a shared queue)")
        options = BatchOptions(
            out_dir=Path(args.out), repository=Path(args.repository), triton_urls=tuple(args.triton),
            batch_size=args.batch_size, inflight=args.inflight, workers=args.workers, ort_threads=args.ort_threads,
            retry_failed=args.retry_failed, attempts=args.attempts, tile=args.tile, tile_size=args.tile_size,
            pixel_size_um=args.pixel_size,
            gallery_size=args.gallery, ledger=args.ledger, lease_s=args.lease_seconds, worker_id=args.worker_id,
            **({} if args.max_slide_pixels is None else {"max_slide_pixels": args.max_slide_pixels}),
        )
    except ValueError as error:
        return _fail(str(error), 2)
    progress = make_progress(args.progress, every_s=args.log_every)
    try:
        summary = run_batch(args.inputs, options, progress=progress)
    except (InputError, LedgerError, BatchError, ReportWriteError, TritonStartError) as error:
        return _fail(str(error))
    except KeyboardInterrupt:
        return _fail("interrupted; rerun the same command to finish the pending fields", EXIT_INTERRUPTED)
    counts = summary.counts
    print(f"done: {counts['done']} fields classified, {counts[FAILED]} failed, {counts[SKIPPED]} background "
          f"tiles skipped, {counts[PENDING]} pending; this run processed {summary.processed} "
          f"({summary.fields_per_s:.1f} fields/s) -> {summary.reports.index if summary.reports else args.out}",
          flush=True)
    return _failed_fields_exit(options, summary)


def _failed_fields_exit(options: BatchOptions, summary: BatchSummary) -> int:
    """Exit 3 with advice when fields failed (what a retry can fix, and what it cannot), else 0."""
    if not summary.counts[FAILED]:
        return EXIT_OK
    with open_queue(options, readonly=True) as ledger:
        errors = [row.error or "" for row in ledger.iter_rows(FAILED)]
    retryable = sum(1 for error in errors if retry_may_help(error))
    if len(errors) > retryable:
        print(f"{len(errors) - retryable} fields are not readable images (corrupt, truncated, unsupported); fix "
              "or remove those files - the reasons are in results.csv", file=sys.stderr, flush=True)
    if retryable:
        print(f"{retryable} fields failed in reading or inference, which a retry can fix; rerun with "
              "--retry-failed to try them again", file=sys.stderr, flush=True)
    return EXIT_FIELDS_FAILED


def add_reports_arguments(parser: argparse.ArgumentParser, *, default_repository: Path) -> None:
    parser.add_argument("--out", required=True, help="folder for results.csv, slides.csv/json and the HTML reports")
    add_ledger_argument(parser)
    parser.add_argument("--repository", default=str(default_repository),
                        help="the model repository the queue was classified with (class names, version)")


def run_reports_cli(args: argparse.Namespace) -> int:
    """``hybridcn batch-reports``: the reports of the whole queue now (no Triton; exit codes as ``batch``)."""
    try:
        _check_ledger(args.ledger)
        options = BatchOptions(out_dir=Path(args.out), repository=Path(args.repository), ledger=args.ledger)
    except ValueError as error:
        return _fail(str(error), 2)
    try:
        summary = write_queue_reports(options)
    except (LedgerError, BatchError, ReportWriteError) as error:
        return _fail(str(error))
    counts = summary.counts
    print(f"reports: {counts['done']} fields classified, {counts[FAILED]} failed, {counts[SKIPPED]} background "
          f"tiles skipped, {counts[PENDING]} pending -> {summary.reports.index}", flush=True)
    if counts[PENDING]:
        return EXIT_OK
    return _failed_fields_exit(options, summary)


def retry_may_help(error: str) -> bool:
    """Whether a failed field's recorded error is transient (Triton, I/O) rather than the file itself."""
    return error.startswith(("inference failed", "unreadable"))
