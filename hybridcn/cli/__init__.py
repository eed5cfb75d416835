"""``hybridcn`` command line: thin commands over every layer below it.

Subcommands import their layer when they run, so ``hybridcn classify`` never loads torch and
``hybridcn train`` never loads the gateway; all of those imports point down the layers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hybridcn.cli.errors import CliError
from hybridcn.config import EXPORT_BUILD_DIR, default_repository, shipped_repository
from hybridcn.profiles import PROFILES

DEFAULT_REPOSITORY = default_repository()


def _cmd_synth(args: argparse.Namespace) -> int:
    from hybridcn.synth import write_dataset

    out = write_dataset(args.out, per_class=args.per_class, size=args.size, seed=args.seed)
    print(f"wrote {args.per_class * 4} synthetic fields to {out}")
    return 0


def _options(args: argparse.Namespace):
    from training.pipeline import TrainOptions

    options = TrainOptions(seed=args.seed, progress=sys.stderr.isatty())
    for name in ("seg_epochs", "backbone_epochs", "head_epochs", "batch_size", "feature_views", "device", "workers",
                 "background_augment", "balance_acquisition", "look_augment", "stain_views",
                 "head_label_smoothing"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(options, name, value)
    return options


def _profile(args: argparse.Namespace):
    return PROFILES[args.profile].with_overrides(args.set)


def _cmd_train(args: argparse.Namespace) -> int:
    from training.study import make_logger, train_final

    out = Path(args.out)
    path = train_final(args.data, out, _profile(args), _options(args), masks_file=args.masks,
                       log=make_logger(out / "log.txt"))
    print(f"model: {path}")
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from training.study import run_study

    run_study(args.data, Path(args.out), profile=_profile(args), options=_options(args), minutes=args.minutes,
              masks_file=args.masks, folds=args.folds, paper_fold=args.paper_fold,
              cv_backbone_epochs=args.cv_backbone_epochs, variants=args.variants)
    return 0


def _cmd_masks(args: argparse.Namespace) -> int:
    from training.experiments import write_mask_cache

    print(json.dumps(write_mask_cache(args.data, args.out)))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from export.repository import read_manifest
    from training.report import write_report

    baseline = Path(args.baseline) if args.baseline else None
    check = read_manifest(Path(args.repository)).ood if args.repository else None
    print(write_report(Path(args.study), Path(args.docs), baseline=baseline,
                       ood=None if check is None else check.report))
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from export.build import build_repository, rebuild_repository

    if bool(args.model) == bool(args.from_repository):
        print("hybridcn export: error: give --model (a trained checkpoint) or --from-repository (an exported "
              "repository), not both", file=sys.stderr)
        return 2
    if args.ship and args.out:
        print("hybridcn export: error: --ship replaces the shipped model_repository/; do not also give --out",
              file=sys.stderr)
        return 2
    out = shipped_repository() if args.ship else Path(args.out or EXPORT_BUILD_DIR)
    if args.from_repository:
        manifest = rebuild_repository(Path(args.from_repository), out, target=args.target)
    else:
        manifest = build_repository(Path(args.model), out, target=args.target,
                                    calibration=Path(args.calibration) if args.calibration else None,
                                    check_parity=not args.skip_parity)
    print(manifest.model_dump_json(indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_ood(args: argparse.Namespace) -> int:
    import tempfile

    from export.build import rebuild_repository
    from export.ood import fit_out_of_distribution, write_ood_graph
    from export.repository import read_manifest

    if args.ship and args.out:
        raise CliError("--ship replaces the shipped model_repository/; do not also give --out")
    source = Path(args.repository)
    out = shipped_repository() if args.ship else Path(args.out or EXPORT_BUILD_DIR)
    entry, density = fit_out_of_distribution(Path(args.data), source, probe_fields=args.probe_fields,
                                             log=lambda line: print(line, file=sys.stderr, flush=True))
    manifest = read_manifest(source).model_copy(update={"ood": entry})
    with tempfile.TemporaryDirectory() as scratch:
        graph = write_ood_graph(density, Path(scratch) / "ood.onnx")
        rebuild_repository(source, out, manifest=manifest, extra_graphs={"ood": graph})
    print(json.dumps(entry.report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.evaluate import evaluate_binary_folder, evaluate_folder
    from training.data import DataLayoutError

    if args.binary and args.shift is not None:
        print("hybridcn evaluate: error: --shift scores the four classes; leave it out with --binary", file=sys.stderr)
        return 2
    try:
        if args.binary:
            result = evaluate_binary_folder(Path(args.data), Path(args.repository), triton=args.triton)
        else:
            result = evaluate_folder(Path(args.data), Path(args.repository), triton=args.triton, shift_seed=args.shift)
    except (DataLayoutError, FileNotFoundError) as error:  # the folder, not the model: one line, no traceback
        print(f"hybridcn evaluate: error: {error}", file=sys.stderr)
        return 2
    Path(args.out).write_text(json.dumps(result, indent=2))

    def value(key: str) -> str:
        return "n/a" if result[key] is None else f"{result[key]:.4f}"

    auc = "auc" if args.binary else "macro_auc"
    print(f"n={result['n']} accuracy={value('accuracy')} balanced_accuracy={value('balanced_accuracy')} "
          f"{auc}={value(auc)} mcc={value('mcc')} -> {args.out}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from gateway.server import serve

    return serve(host=args.host, port=args.port, repository=Path(args.repository), grpc_port=args.grpc_port,
                 triton_http_port=args.triton_http_port)


def _cmd_classify(args: argparse.Namespace) -> int:
    from hybridcn.cli.local import classify_files

    return classify_files([Path(p) for p in args.files], repository=Path(args.repository), triton=args.triton,
                          as_json=args.json, csv_path=Path(args.csv) if args.csv else None, progress=args.progress,
                          pixel_size_um=args.pixel_size)


def _cmd_batch(args: argparse.Namespace) -> int:
    from batch.cli import run_batch_cli

    return run_batch_cli(args)


def _cmd_batch_reports(args: argparse.Namespace) -> int:
    from batch.cli import run_reports_cli

    return run_reports_cli(args)


def _cmd_demo(args: argparse.Namespace) -> int:
    from hybridcn.cli.local import demo

    return demo(repository=Path(args.repository), count=args.count)


def build_parser() -> argparse.ArgumentParser:
    from batch.cli import add_batch_arguments, add_reports_arguments, pixel_size_arg

    parser = argparse.ArgumentParser(prog="hybridcn", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    profiles = sorted(PROFILES)

    p = sub.add_parser("synth", help="write a deterministic synthetic smear dataset")
    p.add_argument("--out", required=True, help="folder to write (in the Original/<class>/ layout)")
    p.add_argument("--per-class", type=int, default=8, help="fields per class (default 8)")
    p.add_argument("--size", type=int, default=224, help="field side in pixels (default 224)")
    p.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same fields")
    p.set_defaults(func=_cmd_synth)

    def training_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", required=True, help="labelled folder in a public release layout")
        p.add_argument("--profile", choices=profiles, default="compact", help="network sizes (default compact)")
        p.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                       help="override one profile value (JSON), e.g. segmentation.input_scale=2; repeatable")
        p.add_argument("--out", required=True, help="run folder (resumable: rerun the same command to go on)")
        p.add_argument("--masks", help="mask cache from `hybridcn masks` (instead of reading Segmented/)")
        p.add_argument("--seed", type=int, default=0, help="random seed of splits, initialisation and augmentation")
        p.add_argument("--seg-epochs", type=int, help="Attention U-Net epochs (phase 2)")
        p.add_argument("--backbone-epochs", type=int, help="ConvNeXt + NASNet epochs (phase 3)")
        p.add_argument("--head-epochs", type=int, help="MHSA head epochs (phase 4)")
        p.add_argument("--batch-size", type=int, help="training batch size")
        p.add_argument("--feature-views", type=int, help="augmented feature passes per field for the head (default 2)")
        p.add_argument("--background-augment", type=float, metavar="SHARE",
                       help="repaint the background of this share of training fields (default 0: off)")
        p.add_argument("--balance-acquisition", action="store_true", default=None,
                       help="draw each class's yellowish- and bluish-background fields equally often")
        p.add_argument("--look-augment", type=float, metavar="SHARE",
                       help="vary focus and saturation of this share of training fields (default 0: off)")
        p.add_argument("--stain-views", type=int, metavar="N",
                       help="train phases 3-4 also on N stain- and camera-shifted copies of each field (default 0)")
        p.add_argument("--head-label-smoothing", type=float, metavar="EPSILON",
                       help="label smoothing of the phase-4 head alone (default: the backbones' 0.1)")
        p.add_argument("--device", help="torch device, e.g. cpu or cuda (default: cuda when available)")
        p.add_argument("--workers", type=int, help="data loader worker processes")

    p = sub.add_parser("train", help="train all four phases on a labelled folder (resumable)")
    training_flags(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("study", help="final model + block cross-validation, ablations, shortcut audit")
    training_flags(p)
    p.add_argument("--minutes", type=float, default=60.0, help="time budget; later steps are skipped past it")
    p.add_argument("--folds", type=int, default=5, help="block cross-validation folds (default 5)")
    p.add_argument("--paper-fold", action="store_true", help="also cross-validate the paper profile if time allows")
    p.add_argument("--cv-backbone-epochs", type=int, help="backbone epochs inside cross-validation")
    p.add_argument("--variants", nargs="+", metavar="VARIANT",
                   help="cross-validate only these variants, e.g. `full` (default: all ablations, in priority order)")
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("masks", help="clean the Segmented/ masks once into a compact cache")
    p.add_argument("--data", required=True, help="labelled folder with the Segmented/ masks")
    p.add_argument("--out", required=True, help="the mask cache to write (.npz)")
    p.set_defaults(func=_cmd_masks)

    p = sub.add_parser("report", help="statistics, calibration, plots and tables of a study")
    p.add_argument("study", help="the study's run folder (from `hybridcn study`)")
    p.add_argument("--docs", default="docs", help="folder for results.md and the plots (default docs)")
    p.add_argument("--baseline", metavar="STUDY",
                   help="another study of the same folds (an earlier recipe): adds a paired comparison of full models")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY),
                   help="model repository whose out-of-distribution check to tabulate (section 10; '' for none)")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("export", help="export a trained model to ONNX and write a Triton model repository")
    p.add_argument("--model", help="model.pt from `hybridcn train`")
    p.add_argument("--from-repository", metavar="DIR",
                   help="rewrite an exported repository (its ONNX graphs and manifest) for --target, no checkpoint "
                        "needed; e.g. the GPU repository of the shipped model")
    p.add_argument("--out", help=f"repository folder to write (default: {EXPORT_BUILD_DIR})")
    p.add_argument("--ship", action="store_true",
                   help="replace the shipped model_repository/ of this checkout (a deliberate step: every copy "
                        "stays in git history)")
    p.add_argument("--target", choices=["embedded", "gpu"], default="embedded",
                   help="embedded: the CPU tritonserver of nvidia-pytriton; gpu: NVIDIA's Triton with TensorRT")
    p.add_argument("--calibration", help="calibration.json from `hybridcn report`")
    p.add_argument("--skip-parity", action="store_true", help="skip the ONNX-against-PyTorch parity check")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("ood", help="fit the out-of-distribution check of a repository on its training fields")
    p.add_argument("--data", required=True, help="the labelled folder the model was trained on")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="the exported repository to add it to")
    p.add_argument("--out", help=f"repository folder to write (default: {EXPORT_BUILD_DIR})")
    p.add_argument("--ship", action="store_true", help="replace the shipped model_repository/ (deliberate)")
    p.add_argument("--probe-fields", type=int, default=150, help="fields per probe kind in the report (default 150)")
    p.set_defaults(func=_cmd_ood)

    p = sub.add_parser("evaluate", help="score the shipped model on a labelled folder")
    p.add_argument("--data", required=True, help="labelled folder in a public release layout (or Benign/ + "
                   "Malignant/ with --binary)")
    p.add_argument("--out", required=True, help="the JSON report to write")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository to score")
    p.add_argument("--triton", help="HOST:PORT of a running Triton gRPC endpoint (default: in-process ONNX Runtime)")
    p.add_argument("--shift", type=int, metavar="SEED",
                   help="also score every field under seeded stain and camera shifts (contrast, hue toward blue and "
                        "red, saturation, brightness/gamma, blur, JPEG) and report accuracy per kind")
    p.add_argument("--binary", action="store_true",
                   help="score benign vs malignant (P(malignant) = 1 - P(Benign)) on Benign/ and Malignant/ "
                        "folders, or on the four class folders read as two")
    p.set_defaults(func=_cmd_evaluate)

    p = sub.add_parser("serve", help="start embedded Triton and the gateway")
    p.add_argument("--host", default="127.0.0.1",
                   help="address the gateway and the embedded Triton bind to (default: loopback only)")
    p.add_argument("--port", type=int, default=8000, help="gateway HTTP port (default 8000)")
    p.add_argument("--grpc-port", type=int, default=0,
                   help="embedded Triton's gRPC port for integrators (default 0: a free port, shown by /readyz)")
    p.add_argument("--triton-http-port", type=int, default=0,
                   help="embedded Triton's HTTP port (default 0: a free port, shown by /readyz)")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository to serve")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("classify", help="classify image files (starts embedded Triton unless --triton is given)")
    p.add_argument("files", nargs="+", metavar="PATH", help="field images, or folders of them (searched recursively)")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository")
    p.add_argument("--triton", help="HOST:PORT of a running Triton gRPC endpoint")
    p.add_argument("--pixel-size", type=pixel_size_arg, metavar="UM",
                   help="um per pixel of the images (default: measured from their red cells)")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="JSON Lines on stdout: one FieldResult per line (the API's fields plus filename); "
                             "errors as {filename, error} lines on stderr")
    output.add_argument("--csv", metavar="FILE", help="write one CSV row per field (failures with their error)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only on a terminal)")
    p.set_defaults(func=_cmd_classify)

    p = sub.add_parser("batch", help="classify whole slide queues (resumable; results.csv, slides.csv/json, HTML)",
                       description="Classify every field of the INPUTs into DIR. Resumable: after a crash, rerun "
                       "the same command and it finishes the rest; each field appears once in DIR/results.csv.")
    add_batch_arguments(p, default_repository=DEFAULT_REPOSITORY)
    p.set_defaults(func=_cmd_batch)

    p = sub.add_parser("batch-reports", help="write the reports of a batch queue now (a shared --ledger, or OUT's)",
                       description="Write results.csv, slides.csv/json and the HTML reports of the whole queue into "
                       "DIR from its ledger, whatever its state (pending fields are listed as pending).")
    add_reports_arguments(p, default_repository=DEFAULT_REPOSITORY)
    p.set_defaults(func=_cmd_batch_reports)

    p = sub.add_parser("demo", help="the main job on a fresh machine: serve the shipped model, classify a queue")
    p.add_argument("--repository", default=str(DEFAULT_REPOSITORY), help="Triton model repository")
    p.add_argument("--count", type=int, default=16, help="synthetic fields to classify (default 16)")
    p.set_defaults(func=_cmd_demo)
    return parser


def _user_error(error: BaseException) -> bool:
    """Errors that come from what the user gave (paths, servers, files), not from a bug."""
    from engine.client import TritonUnavailableError
    from engine.triton_server import TritonStartError

    return isinstance(error, (CliError, OSError, ValueError, TritonUnavailableError, TritonStartError))


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error is one line on stderr and exit status 1 (``HYBRIDCN_DEBUG=1``: traceback)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print(f"hybridcn {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        if os.environ.get("HYBRIDCN_DEBUG") or not _user_error(error):
            raise
        print(f"hybridcn {args.command}: error: {error}", file=sys.stderr)
        return 1

