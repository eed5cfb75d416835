"""Training code on a tiny profile and synthetic fields, then export: ONNX parity and Triton configs."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from export.build import build_repository, export_graphs
from export.repository import ENSEMBLE, RAW_ENSEMBLE, parse_config, read_manifest
from export.runtime import OnnxEnsemble
from hybridcn.profiles import get_profile
from hybridcn.synth import synth_field, write_dataset
from training.data import block_folds, canonical_class, clean_mask, find_samples, random_folds
from training.metrics import (
    classification_metrics,
    error_detection_auroc,
    fit_temperature,
    review_threshold,
    softmax,
)
from training.mrmr import mrmr_select
from training.pipeline import TrainOptions, fit_pipeline, load_trained, predict


@pytest.fixture(scope="module")
def tiny_data():
    fields = [synth_field(i % 4, seed=i, size=64) for i in range(48)]
    images = np.stack([f.image for f in fields])
    masks = np.stack([f.mask > 0 for f in fields])
    labels = np.array([f.label for f in fields])
    return images, masks, labels


@pytest.fixture(scope="module")
def trained(tiny_data, tmp_path_factory):
    images, masks, labels = tiny_data
    options = TrainOptions(seg_epochs=2, backbone_epochs=2, head_epochs=5, batch_size=16, workers=1,
                           feature_views=1, device="cpu", progress=False)
    model = fit_pipeline(images, masks, np.ones(len(labels), bool), labels, get_profile("tiny"), options,
                         lambda message: None)
    path = tmp_path_factory.mktemp("run") / "model.pt"
    torch.save(model.state_dicts(), path)
    return model, path, options


def test_pipeline_trains_all_four_phases(trained, tiny_data):
    model, _, options = trained
    images, _, labels = tiny_data
    out = predict(model, images[:8], options)
    assert out["probabilities"].shape == (8, 4)
    np.testing.assert_allclose(out["probabilities"].sum(1), 1, atol=1e-5)
    assert out["masks"].dtype == np.uint8 and out["preprocessed"].dtype == np.uint8
    index = model.head.head.selection.index.numpy()
    assert len(set(index.tolist())) == len(index) == get_profile("tiny").head.mrmr_k


def test_background_repaint_keeps_the_cells_and_costs_nothing_when_off(tiny_data):
    from preprocessing.stain import corner_box
    from training.augment import replace_background
    from training.pipeline import background_keep

    config = get_profile("tiny").preprocess
    images = torch.as_tensor(tiny_data[0][:8])
    keep = torch.as_tensor(background_keep(images.numpy(), config))
    rows, cols = corner_box(images.shape[1:], corner_fraction=config.corner_fraction)
    assert not keep[:, rows, cols].any() and 0.05 < keep.float().mean() < 0.9  # the box is background
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert replace_background(images, keep, probability=0.0, generator=generator) is images
    assert torch.equal(generator.get_state(), state)  # off: the recipe's random stream is unchanged
    flat = replace_background(images, keep, probability=1.0, generator=generator, max_noise=0.0)
    assert torch.equal(flat[keep], images[keep])
    colours = []
    for i in range(len(images)):
        background = flat[i][~keep[i]]
        assert (background == background[0]).all() and 183 <= int(background.min()) <= int(background.max()) <= 255
        colours.append(tuple(background[0].tolist()))
    assert len(set(colours)) > 1
    grainy = replace_background(images, keep, probability=1.0, generator=generator, max_noise=8.0)
    assert torch.equal(grainy[keep], images[keep]) and grainy[~keep].float().std() > flat[~keep].float().std()
    half = replace_background(images, keep, probability=0.5, generator=torch.Generator().manual_seed(1))
    repainted = [not torch.equal(half[i], images[i]) for i in range(len(images))]
    assert 0 < sum(repainted) < len(images)


def test_look_augmentation_blurs_or_sharpens_and_is_off_by_default(tiny_data):
    from training.augment import augment_batch, gaussian_blur, vary_look

    images = torch.as_tensor(tiny_data[0][:8])
    plain, _ = augment_batch(images, generator=torch.Generator().manual_seed(0))
    off, _ = augment_batch(images, generator=torch.Generator().manual_seed(0), look=0.0)
    assert torch.equal(plain, off)  # off: the recipe's random stream and output are unchanged
    varied, _ = augment_batch(images, generator=torch.Generator().manual_seed(0), look=1.0)
    assert varied.dtype == torch.uint8 and varied.shape == images.shape and not torch.equal(varied, plain)
    x = images.permute(0, 3, 1, 2).float()
    blurred = gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape and blurred.mean().item() == pytest.approx(x.mean().item(), rel=1e-3)
    edges = lambda t: (t[..., 1:] - t[..., :-1]).abs().mean().item()  # noqa: E731
    assert edges(blurred) < 0.8 * edges(x)
    chosen = torch.tensor([True, False] * 4)
    fixed = iter([torch.full((8, 1, 1, 1), 0.0), torch.full((8, 1, 1, 1), 0.5)])  # a = -1 (blur), saturation kept
    out = vary_look(x, chosen, lambda *shape: next(fixed), sigma=1.0)
    torch.testing.assert_close(out[chosen], blurred[chosen])
    assert torch.equal(out[~chosen], x[~chosen])


def test_pipeline_trains_with_background_repaint(tiny_data):
    images, masks, labels = tiny_data
    options = TrainOptions(seg_epochs=1, backbone_epochs=1, head_epochs=2, batch_size=16, workers=1, feature_views=1,
                           device="cpu", progress=False, background_augment=0.5)
    ok = np.arange(len(labels)) % 3 > 0  # the U-Net's subset of usable masks must line up with its keep masks
    model = fit_pipeline(images, masks, ok, labels, get_profile("tiny"), options, lambda message: None)
    assert model.history["options"]["background_augment"] == 0.5
    assert predict(model, images[:4], options)["probabilities"].shape == (4, 4)


def test_acquisition_shift_is_seeded_and_moves_colour_camera_and_background(tiny_data):
    from preprocessing.stain import foreground_mask
    from training.augment import acquisition_shift, acquisition_views

    field = tiny_data[0][0]
    first = acquisition_shift(field, np.random.default_rng([0, 0, 1]))
    assert first.dtype == np.uint8 and first.shape == field.shape
    assert np.array_equal(first, acquisition_shift(field, np.random.default_rng([0, 0, 1])))
    others = [acquisition_shift(field, np.random.default_rng([0, 0, i])) for i in range(2, 12)]
    changes = [np.abs(o.astype(float) - field).mean() for o in others]
    assert min(changes) > 1.0 and max(changes) < 60.0  # every copy changed, none destroyed
    background = ~foreground_mask(field)
    means = np.array([o[background].mean(axis=0) for o in others])
    assert means.std(axis=0).min() > 1.0  # the white balance moves the background too, channel by channel
    views = acquisition_views(tiny_data[0][:3], views=2, seed=5)
    assert len(views) == 2 and views[0].shape == (3, *field.shape) and not np.array_equal(views[0], views[1])
    assert np.array_equal(views[1][2], acquisition_shift(tiny_data[0][2], np.random.default_rng([5, 1, 2])))


def test_pipeline_trains_on_stain_views(tiny_data):
    images, masks, labels = tiny_data
    options = TrainOptions(seg_epochs=1, backbone_epochs=1, head_epochs=2, batch_size=16, workers=1, feature_views=1,
                           device="cpu", progress=False, stain_views=2)
    messages = []
    model = fit_pipeline(images, masks, np.ones(len(labels), bool), labels, get_profile("tiny"), options,
                         messages.append)
    assert any("2 stain- and camera-shifted copies" in m for m in messages)
    assert predict(model, images[:4], options)["probabilities"].shape == (4, 4)


def test_white_balance_groups_follow_the_background_tint(tiny_data):
    from preprocessing.stain import background_tint, foreground_mask
    from training.data import white_balance_groups

    field = tiny_data[0][0]
    yellowish, bluish = field.copy(), field.copy()
    background = ~foreground_mask(field)
    yellowish[background] = (245, 240, 215)
    bluish[background] = (225, 235, 250)
    assert background_tint(yellowish) > 5 > -5 > background_tint(bluish)
    assert white_balance_groups(np.stack([yellowish, bluish, yellowish])).tolist() == [1, 0, 1]


def test_group_balanced_weights_keep_class_mass_and_even_out_groups():
    from training.data import group_balanced_weights

    labels = np.array([0, 0, 0, 0, 1, 1, 1, 2])
    groups = np.array([0, 0, 0, 1, 0, 1, 1, 1])
    weights = group_balanced_weights(labels, groups)
    for label in (0, 1, 2):
        assert weights[labels == label].sum() == pytest.approx((labels == label).sum())
    assert weights[(labels == 0) & (groups == 0)].sum() == pytest.approx(weights[(labels == 0) & (groups == 1)].sum())
    assert weights[3] == pytest.approx(3 * weights[0])  # the rare look of class 0 is drawn three times as often
    assert weights[7] == pytest.approx(1.0)  # a class with one look is drawn as without balancing


def test_pipeline_trains_with_acquisition_balancing(tiny_data):
    images, masks, labels = tiny_data
    options = TrainOptions(seg_epochs=1, backbone_epochs=1, head_epochs=2, batch_size=16, workers=1, feature_views=1,
                           device="cpu", progress=False, balance_acquisition=True)
    model = fit_pipeline(images, masks, np.ones(len(labels), bool), labels, get_profile("tiny"), options,
                         lambda message: None)
    counts = model.history["white_balance_groups"]
    assert sum(sum(pair) for pair in counts.values()) == len(labels)
    assert predict(model, images[:4], options)["probabilities"].shape == (4, 4)


def test_checkpoint_round_trip(trained, tiny_data):
    model, path, options = trained
    reloaded = load_trained(path)
    a = predict(model, tiny_data[0][:4], options)["probabilities"]
    b = predict(reloaded, tiny_data[0][:4], options)["probabilities"]
    # the trained copy is channels_last, the reloaded one contiguous: kernels differ in rounding only
    np.testing.assert_allclose(a, b, atol=1e-3)


def test_onnx_export_parity(trained, tmp_path):
    model, _, _ = trained
    paths, parity = export_graphs(model, tmp_path)
    assert set(paths) == {"segmentation", "features", "head"}
    assert parity["head"]["probabilities"] <= 1e-5
    assert parity["segmentation"]["mask"] <= 1  # uint8 maps: at most one rounding step
    import onnx

    from export.graph_patches import add_mask_filter

    assert not add_mask_filter(onnx.load(paths["segmentation"]))  # exported with the mask filter already


@pytest.mark.parametrize("target", ["embedded", "gpu"])
def test_repository_configs_parse_and_wire_up(trained, tmp_path, target):
    _, path, _ = trained
    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps({"temperature": 1.5, "review_threshold": 0.8}))
    repository = tmp_path / "repo"
    manifest = build_repository(path, repository, target=target, calibration=calibration)
    configs = {p.parent.name: parse_config(p.read_text()) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"segmentation", "features", "head", "preprocess", "interpret", ENSEMBLE, RAW_ENSEMBLE}
    for config in configs.values():
        assert config.max_batch_size == 16
        if config.platform != "ensemble":
            assert config.dynamic_batching.max_queue_delay_microseconds > 0
    for name in ("segmentation", "features", "head"):
        config = configs[name]
        if target == "gpu":
            assert config.platform == "onnxruntime_onnx"
            assert config.instance_group[0].kind == config.instance_group[0].KIND_GPU
            accelerator = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
            assert accelerator.name == "tensorrt" and accelerator.parameters["precision_mode"] == "FP16"
        else:
            assert config.backend == "python"
            assert (repository / name / "1" / "model.py").is_file()
        assert len(config.model_warmup) == 1
        assert (repository / name / "1" / "model.onnx").is_file()
    assert configs["preprocess"].backend == configs["interpret"].backend == "python"
    assert configs["head"].output[0].label_filename == "labels.txt"
    # every ensemble step names a model in the repository and maps tensors some step produces
    for ensemble in (ENSEMBLE, RAW_ENSEMBLE):
        produced = {t.name for t in configs[ensemble].input}
        for step in configs[ensemble].ensemble_scheduling.step:
            assert step.model_name in configs
            model_inputs = {t.name for t in configs[step.model_name].input}
            assert set(step.input_map) == model_inputs
            assert set(step.input_map.values()) <= produced
            produced |= set(step.output_map.values())
        assert {t.name for t in configs[ensemble].output} <= produced
    assert read_manifest(repository).temperature == manifest.temperature == 1.5


def test_onnx_ensemble_matches_pytorch_with_temperature(trained, tiny_data, tmp_path):
    model, path, options = trained
    build_repository(path, tmp_path / "repo", check_parity=False)
    pre = predict(model, tiny_data[0][:4], options)
    ours = OnnxEnsemble(tmp_path / "repo").infer(pre["preprocessed"])
    # three graphs in a row, each at float32 parity (test_onnx_export_parity): their rounding compounds,
    # and by how much depends on the CPU's kernels (1.5e-4 on an AMD EPYC runner, under 1e-4 elsewhere);
    # a wrong input, order or temperature moves probabilities by far more than 5e-4
    np.testing.assert_allclose(ours.probabilities, pre["probabilities"], atol=5e-4)


def test_dataset_layouts_and_block_folds(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=6, size=64)
    samples = find_samples(root)
    assert len(samples) == 24 and samples[0].segmented is not None
    flat = tmp_path / "flat" / "[Malignant] Pro-B"
    flat.mkdir(parents=True)
    (flat / "x-001.png").write_bytes((root / "Original" / "Pro" / "SYN-Pro-001.png").read_bytes())
    assert [s.class_name for s in find_samples(tmp_path / "flat")] == ["Pro"]
    assert canonical_class("[Malignant] early Pre-B") == "Early" and canonical_class("misc") is None
    with pytest.raises(ValueError, match="no class folders"):
        find_samples(tmp_path / "data" / "Original" / "Pro")
    folds = block_folds(samples, folds=2, block=2)
    for label in range(4):
        per_class = folds[[i for i, s in enumerate(samples) if s.label == label]]
        assert set(per_class.tolist()) == {0, 1}
        assert (per_class[0::2] == per_class[1::2]).all()  # numbers 1-2, 3-4, 5-6 stay together
    assert sorted(np.bincount(random_folds(samples, folds=3))) == [8, 8, 8]


def test_byte_identical_twins_stay_on_one_side(tmp_path):
    root = write_dataset(tmp_path / "data", per_class=4, size=64)
    pro = root / "Original" / "Pro"
    (pro / "SYN-Pro-003.png").write_bytes((pro / "SYN-Pro-002.png").read_bytes())  # twins across blocks
    samples = find_samples(root)
    folds = block_folds(samples, folds=2, block=2)
    names = {s.path.name: f for s, f in zip(samples, folds, strict=True)}
    assert names["SYN-Pro-002.png"] == names["SYN-Pro-003.png"]


def test_clean_mask_drops_specks_and_flags_empty():
    segmented = np.zeros((64, 64, 3), np.uint8)
    segmented[10:30, 10:30] = 180
    segmented[50, 50] = 200  # speck
    mask, ok = clean_mask(segmented)
    assert ok and mask[20, 20] and not mask[50, 50]
    assert clean_mask(np.zeros((64, 64, 3), np.uint8))[1] is False


def test_mrmr_prefers_relevant_non_redundant_features():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 400)
    x = rng.normal(size=(400, 30))
    x[:, 3] += 2 * y
    x[:, 4] = x[:, 3] + 0.01 * rng.normal(size=400)  # redundant copy
    x[:, 9] += 3 * (y == 2)
    chosen = mrmr_select(x, y, 3, device="cpu")
    assert chosen[0] in (3, 4) and 9 in chosen[:2]
    with pytest.raises(ValueError, match="k must be"):
        mrmr_select(x, y, 31, device="cpu")


def test_metrics_calibration_and_review_threshold():
    labels = np.array([0, 1, 2, 3] * 25)
    logits = np.eye(4)[labels] * 3.0 + np.random.default_rng(0).normal(0, 1, (100, 4))
    metrics = classification_metrics(labels, softmax(logits))
    assert set(metrics) >= {"n", "accuracy", "balanced_accuracy", "macro_auc", "mcc", "per_class", "confusion"}
    assert metrics["n"] == 100 and 0.5 < metrics["accuracy"] <= 1
    assert fit_temperature(labels, logits * 10) > 1  # overconfident logits get a temperature above 1
    decision = review_threshold(labels, softmax(logits), target_precision=0.99)
    assert decision["accepted_precision"] >= 0.99 and 0 <= decision["review_fraction"] <= 1


def test_error_detection_auroc_ranks_errors_by_confidence():
    labels = np.array([0, 0, 0, 0])
    # two right answers at 0.9 and 0.8, two wrong ones at 0.7 and 0.6: every error ranks below
    probabilities = np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.4, 0.6]])
    assert error_detection_auroc(labels, probabilities) == 1.0
    # a right answer at 0.65 ranks below the error at 0.7: 3 of the 4 (right, wrong) pairs in order
    probabilities[0] = [0.65, 0.35]
    assert error_detection_auroc(labels, probabilities) == 0.75
    # nothing to rank without both kinds
    assert np.isnan(error_detection_auroc(labels, np.array([[0.9, 0.1]] * 4)))


def test_shipped_repository_is_complete_and_parses():
    from pathlib import Path

    repository = Path(__file__).resolve().parents[2] / "model_repository"
    configs = {p.parent.name: parse_config(p.read_text()) for p in repository.glob("*/config.pbtxt")}
    assert set(configs) == {"segmentation", "features", "head", "ood", "preprocess", "interpret", ENSEMBLE,
                            RAW_ENSEMBLE}
    manifest = read_manifest(repository)
    report = manifest.ood.report  # the shipped out-of-distribution check and what it measured when fitted
    assert report["held_out_in_distribution_flagged"] <= 0.03 and report["probes_flagged"] > 0.85
    assert manifest.profile["name"] == "compact" and manifest.training["n_train"] == 2519
    assert 0 < manifest.review_threshold < 1 and manifest.temperature > 0
    # the Python steps read the manifest itself, not a copy of it in their parameters
    assert not configs["preprocess"].parameters and not configs["interpret"].parameters
    for name in ("preprocess", "interpret"):
        assert "engine.triton_models" in (repository / name / "1" / "model.py").read_text()
    total = sum(p.stat().st_size for p in repository.rglob("*") if p.is_file())
    assert total < 40 * 1024 * 1024  # shipped artifacts stay small


@pytest.mark.slow
def test_crossvalidation_records_variants_and_resumes(tmp_path):
    from training.experiments import crossvalidate, load_dataset, shortcut_probe

    root = write_dataset(tmp_path / "data", per_class=80, size=64)  # two blocks of 40 per class
    data = load_dataset(root, 64, log=lambda message: None)
    assert data.mask_ok.mean() > 0.8 and data.images.shape == (320, 64, 64, 3)
    options = TrainOptions(seg_epochs=1, backbone_epochs=1, head_epochs=2, batch_size=32, workers=1,
                           feature_views=0, device="cpu", progress=False)
    out = tmp_path / "cv"
    results = crossvalidate(data, get_profile("tiny"), options, out, variants=["full", "mlp_head"], folds=2,
                            max_folds=1, log=lambda message: None)
    fold = results["folds"]["0"]
    assert set(fold) == {"full", "mlp_head"}
    assert fold["full"]["metrics"]["n"] == len(fold["full"]["index"]) == 160
    assert set(fold["full"]["shortcut_robustness"]) == {"as_is", "corner_blanked", "background_replaced",
                                                        "background_recoloured", "recoloured_predicted_as_donor_class"}
    assert 0 <= fold["full"]["segmentation"]["dice"] <= 1
    from preprocessing.shifts import SHIFTS

    shifted = fold["full"]["shifted_logits"]  # every shift kind, one logit row per held-out field
    assert set(shifted) == {"seed", *SHIFTS} and all(np.asarray(shifted[k]).shape == (160, 4) for k in SHIFTS)
    assert "shifted_logits" not in fold["mlp_head"]
    again = crossvalidate(data, get_profile("tiny"), options, out, variants=["full", "mlp_head"], folds=2,
                          max_folds=1, log=lambda message: pytest.fail(f"should not retrain: {message}"))
    assert again["folds"]["0"]["full"]["logits"] == fold["full"]["logits"]
    # a head-only ablation added later starts from the fold's stored full model ...
    messages: list[str] = []
    crossvalidate(data, get_profile("tiny"), options, out, variants=["full", "no_mrmr"], folds=2, max_folds=1,
                  log=messages.append)
    assert any("full model from" in m for m in messages) and not any("phase 2" in m for m in messages)
    # ... or, without one, from the full model retrained with the same seed, which reproduces the stored one
    from training.experiments import full_checkpoint
    full_checkpoint(out, "block", 0).unlink()
    redone = crossvalidate(data, get_profile("tiny"), options, out, variants=["full", "nasnet_only"], folds=2,
                           max_folds=1, log=lambda message: None)
    assert redone["folds"]["0"]["full"]["retrained_accuracy"] == fold["full"]["metrics"]["accuracy"]
    assert set(redone["folds"]["0"]) == {"full", "mlp_head", "no_mrmr", "nasnet_only"}
    with pytest.raises(ValueError, match="another profile or options"):
        crossvalidate(data, get_profile("tiny"), replace(options, backbone_epochs=2), out, variants=["full"],
                      folds=2, max_folds=1, log=lambda message: None)
    # a fold stored before an option existed resumes: it was trained with that option's default
    stored = json.loads((out / "cv_block.json").read_text())
    del stored["setup"]["options"]["background_augment"]
    del stored["setup"]["profile"]["preprocess"]["stain_lightness_threshold"]  # so does a profile field
    (out / "cv_block.json").write_text(json.dumps(stored))
    crossvalidate(data, get_profile("tiny"), options, out, variants=["full"], folds=2, max_folds=1,
                  log=lambda message: pytest.fail(f"should not retrain: {message}"))
    with pytest.raises(ValueError, match="another profile or options"):
        crossvalidate(data, get_profile("tiny"), replace(options, background_augment=0.5), out, variants=["full"],
                      folds=2, max_folds=1, log=lambda message: None)
    with pytest.raises(ValueError, match="another profile or options"):
        crossvalidate(data, get_profile("tiny").with_overrides(["preprocess.stain_lightness_threshold=200"]), options,
                      out, variants=["full"], folds=2, max_folds=1, log=lambda message: None)
    # a recipe trial can start on another fold; only that one is trained
    second = crossvalidate(data, get_profile("tiny"), options, out, variants=["full"], folds=2, fold_order=[1],
                           log=lambda message: None)
    assert second["folds"]["1"]["full"]["metrics"]["n"] == 160 and "mlp_head" not in second["folds"]["1"]
    with pytest.raises(ValueError, match="distinct folds"):
        crossvalidate(data, get_profile("tiny"), options, out, variants=["full"], folds=2, fold_order=[1, 1, 2],
                      log=lambda message: None)
    assert not list((out / "models").glob("*_training"))  # finished folds leave no training checkpoint
    # a fold interrupted mid-training (an ended session) resumes from its last backbone epoch
    class SessionEndedError(Exception):
        pass

    def stop_at_second_epoch(message: str) -> None:
        if "backbone epoch 2/2" in message:
            raise SessionEndedError

    longer, resumed_out = replace(options, backbone_epochs=2), tmp_path / "cv_interrupted"
    with pytest.raises(SessionEndedError):
        crossvalidate(data, get_profile("tiny"), longer, resumed_out, variants=["full"], folds=2, max_folds=1,
                      log=stop_at_second_epoch)
    training_dir = resumed_out / "models" / "block_fold0_full_training"
    spent_before = torch.load(training_dir / "backbones.ckpt", weights_only=False)["seconds"]
    assert (training_dir / "segmentation.ckpt").exists() and spent_before > 0
    messages = []
    resumed = crossvalidate(data, get_profile("tiny"), longer, resumed_out, variants=["full"], folds=2, max_folds=1,
                            log=messages.append)
    assert any("backbones resumed" in m and "at epoch 1" in m for m in messages)
    # the U-Net is not trained again, and the time reported includes what was spent before the interruption
    assert any("phase 2 resumed" in m for m in messages) and not any("segmentation epoch" in m for m in messages)
    assert resumed["folds"]["0"]["full"]["train_seconds"] > spent_before
    assert not training_dir.exists()
    probe = shortcut_probe(data, folds=2)
    assert set(probe) == {"background_colour", "scale_bar_corner", "chance_accuracy"}


def test_a_study_plan_keeps_the_priority_order_and_only_the_chosen_variants(tmp_path):
    from training.study import plan_study

    options = TrainOptions(device="cpu")
    compact, paper = get_profile("compact"), get_profile("paper")
    plan = [(step.variants, step.split, step.max_folds) for step in plan_study(compact, options, tmp_path)]
    assert plan[0] == (["full", "convnext_only", "nasnet_only", "no_mrmr", "mlp_head", "head_no_label_smoothing",
                        "head_label_smoothing"], "block", 5)
    # the preprocessing ablation switches CLAHE/multiscale away from what the profile does
    assert plan[1] == (["with_clahe_multiscale"], "block", 5) and not compact.preprocess.enhance
    assert plan_study(paper, options, tmp_path)[1].variants == ["no_clahe_multiscale"]
    assert plan[-1] == (["full"], "random", 5)
    assert plan_study(compact, options, tmp_path, paper_fold=True)[3].profile == paper
    only_full = plan_study(compact, options, tmp_path, paper_fold=False, variants=["full"])
    assert [(step.variants, step.split) for step in only_full] == [(["full"], "block"), (["full"], "random")]
    with pytest.raises(ValueError, match="unknown variants"):
        plan_study(compact, options, tmp_path, variants=["fulll"])


def test_head_label_smoothing_is_the_heads_own_and_bounds_its_logits() -> None:
    """Smoothing caps the head's top-logit gap (the review threshold's ranking saturates); the head's own
    setting overrides the backbones' for phase 4 only."""
    from training.pipeline import train_head

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 256)
    features = rng.normal(size=(len(labels), 48)).astype(np.float32)
    features[np.arange(len(labels)), labels] += 4.0  # well separated: any head gets them all right
    profile = get_profile("tiny")

    def top_gap(**settings) -> float:
        options = TrainOptions(head_epochs=60, device="cpu", progress=False, **settings)
        torch.manual_seed(0)  # the head's dropout and feature noise draw from the global generator
        head = train_head(features, labels, profile, options, lambda _: None, torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, _ = head.head(torch.as_tensor(features))
        top2 = torch.topk(logits, 2, dim=1).values
        return float((top2[:, 0] - top2[:, 1]).median())

    smoothed = top_gap(label_smoothing=0.3)
    assert top_gap(label_smoothing=0.3, head_label_smoothing=0.3) == smoothed  # same setting, same head
    assert top_gap(label_smoothing=0.3, head_label_smoothing=0.0) > 2 * smoothed  # measured 2.2 against 4.6


def test_train_final_resumes_a_run_written_before_a_profile_field_existed(tmp_path):
    from training.study import train_final

    tiny = get_profile("tiny")
    old_profile = tiny.to_dict()
    del old_profile["segmentation"]["hard_gate"]  # config.json of a run from before the field
    (tmp_path / "config.json").write_text(json.dumps({"profile": old_profile}))
    (tmp_path / "model.pt").write_bytes(b"trained")
    assert train_final("unused", tmp_path, tiny, TrainOptions(), log=lambda _: None) == tmp_path / "model.pt"
    # a field that differs is still another profile
    with pytest.raises(ValueError, match="another profile"):
        train_final("unused", tmp_path, tiny.with_overrides(["segmentation.hard_gate=true"]), TrainOptions(),
                    log=lambda _: None)


def test_hard_gated_segmentation_exports_with_parity(tmp_path):
    from export.build import SEGMENTATION_INPUTS, SEGMENTATION_OUTPUTS, TOLERANCES
    from export.onnx_export import check_parity, export_onnx
    from models import segmentation_stage

    stage = segmentation_stage(get_profile("tiny").with_overrides(["segmentation.hard_gate=true"])).eval()
    images = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    path = export_onnx(stage, images, tmp_path / "segmentation.onnx", input_names=SEGMENTATION_INPUTS,
                       output_names=SEGMENTATION_OUTPUTS)
    report = check_parity(stage, path, images, output_names=SEGMENTATION_OUTPUTS,
                          tolerance=TOLERANCES["segmentation"])
    assert report.ok, report.max_abs_diff
