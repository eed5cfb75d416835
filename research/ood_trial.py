"""Trial of the out-of-distribution score on the development data: held-out in-distribution flag rate and
the share of each probe kind flagged. Usage: research/ood_trial.py --data DATA [--probe-fields 200]."""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.field import prepare_array  # noqa: E402
from engine.model import ServedModel  # noqa: E402
from export.ood import feature_extractor, fit_density, held_out_scores, threshold_from  # noqa: E402
from hybridcn.synth import synth_field  # noqa: E402
from preprocessing import decode_image, fit_field  # noqa: E402
from preprocessing.fieldstats import field_statistics  # noqa: E402
from preprocessing.probes import PROBES, probe_field  # noqa: E402
from training.data import block_folds, find_samples  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True)
    parser.add_argument("--repository", default="model_repository")
    parser.add_argument("--probe-fields", type=int, default=200)
    args = parser.parse_args()
    started = time.time()
    model = ServedModel.from_repository(Path(args.repository))
    samples = find_samples(args.data)
    with ThreadPoolExecutor() as pool:
        raw = list(pool.map(lambda s: decode_image(s.path.read_bytes()), samples))
        fields = np.stack(list(pool.map(lambda rgb: prepare_array(rgb, model).preprocessed, raw)))
    extract = feature_extractor(Path(args.repository))
    size = model.image_size

    def stats_of(images):
        return np.stack([field_statistics(fit_field(im, size)) for im in images])

    features = extract(fields)
    stats = stats_of(raw)
    folds = block_folds(samples)
    held_f = held_out_scores(features, folds)
    held_s = held_out_scores(stats, folds)
    t_f, t_s = threshold_from(held_f, 0.99), threshold_from(held_s, 0.99)
    held = np.maximum(held_f / t_f, held_s / t_s)
    threshold = 1.0
    density_f, density_s = fit_density(features), fit_density(stats)
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(raw), size=min(args.probe_fields, len(raw)), replace=False)
    report = {"n": len(samples), "thresholds": [t_f, t_s], "held_out_flagged": float((held > threshold).mean()),
              "held_out_flagged_features": float((held_f > t_f).mean()),
              "held_out_flagged_stats": float((held_s > t_s).mean()),
              "held_out_quantiles": np.quantile(held, [0.5, 0.9, 0.98, 0.999]).round(3).tolist(), "probes": {}}
    for kind in PROBES:
        probes = [probe_field(raw[i], kind, seed=0, field=int(i)) for i in chosen]
        prepared = np.stack([prepare_array(p, model).preprocessed for p in probes])
        sf, ss = density_f.score(extract(prepared)) / t_f, density_s.score(stats_of(probes)) / t_s
        report["probes"][kind] = {"flagged": float((np.maximum(sf, ss) > 1).mean()),
                                  "by_features": float((sf > 1).mean()), "by_stats": float((ss > 1).mean())}
    synth = [synth_field(i % 4, seed=500 + i).image for i in range(100)]
    synthetic = np.stack([prepare_array(im, model).preprocessed for im in synth])
    sf, ss = density_f.score(extract(synthetic)) / t_f, density_s.score(stats_of(synth)) / t_s
    report["probes"]["synthetic_fields"] = {"flagged": float((np.maximum(sf, ss) > 1).mean()),
                                            "by_features": float((sf > 1).mean()), "by_stats": float((ss > 1).mean())}
    report["probes_flagged_overall"] = float(np.mean([p["flagged"] for p in report["probes"].values()]))
    report["seconds"] = round(time.time() - started)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
