"""Networks: shapes and contracts of the Attention U-Net, the dual backbone, the MHSA head, the stages."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from hybridcn.profiles import CLASS_NAMES, PROFILES, Profile, get_profile
from models import FeatureStage, HeadStage, create_model, list_models, segmentation_stage
from models.stages import segmented_input, uint8_to_normalized
from preprocessing.normalize import zscore


@pytest.fixture(scope="module")
def tiny():
    return get_profile("tiny")


def test_registry_and_profiles():
    assert {"attention_unet", "hybrid_features", "mhsa_head", "mlp_head"} <= set(list_models())
    assert set(PROFILES) >= {"compact", "paper"}
    assert PROFILES["paper"].head.mrmr_k == 2000 and PROFILES["paper"].features.input_size == 331
    assert PROFILES["paper"].features.convnext == "convnext_base"
    assert PROFILES["compact"].classes == CLASS_NAMES == ("Benign", "Early", "Pre", "Pro")
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet", PROFILES["tiny"])
    with pytest.raises(ValueError, match="unknown profile"):
        get_profile("huge")


def test_profile_round_trips_through_dict():
    for profile in PROFILES.values():
        assert type(profile).from_dict(profile.to_dict()) == profile


def test_attention_unet_returns_mask_logits_and_gate_maps(tiny):
    unet = create_model("attention_unet", tiny).eval()
    logits, gates = unet(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, 1, 64, 64)
    assert len(gates) == tiny.segmentation.depth - 1
    assert gates[-1].shape == (2, 1, 64, 64) and gates[0].shape == (2, 1, 32, 32)
    assert all(((g >= 0) & (g <= 1)).all() for g in gates)


def test_hybrid_features_concatenate_both_backbones(tiny):
    features = create_model("hybrid_features", tiny).eval()
    out = features(torch.randn(2, 3, 64, 64))
    assert out.shape == (2, features.convnext_dim + features.nasnet_dim)
    assert features.nasnet_dim == tiny.features.nasnet_num_features
    only = create_model("hybrid_features", tiny, use_nasnet=False)
    assert only.num_features == features.convnext_dim
    with pytest.raises(ValueError, match="at least one backbone"):
        create_model("hybrid_features", tiny, use_convnext=False, use_nasnet=False)


def test_mhsa_head_selection_buffers_and_attention(tiny):
    head = create_model("mhsa_head", tiny, num_features=100).eval()
    mean, std = np.linspace(0, 1, 100), np.linspace(1, 2, 100)
    index = np.arange(99, 99 - tiny.head.mrmr_k, -1)
    head.selection.set_statistics(mean, std, index)
    x = torch.randn(3, 100)
    selected = head.selection(x)
    expected = ((x.numpy() - mean) / std)[:, index]
    np.testing.assert_allclose(selected.detach().numpy(), expected, atol=1e-5)
    logits, attention = head(x)
    assert logits.shape == (3, len(CLASS_NAMES))
    assert attention.shape == (3, tiny.head.tokens)
    np.testing.assert_allclose(attention.sum(1).detach().numpy(), 1.0, atol=1e-5)
    assert set(head.state_dict()) >= {"selection.mean", "selection.std", "selection.index", "temperature"}
    with pytest.raises(ValueError, match="multiple of token_dim"):
        create_model("mhsa_head", tiny, num_features=100, k=30)


def test_in_graph_zscore_matches_numpy_reference():
    image = torch.randint(0, 255, (2, 16, 16, 3), dtype=torch.uint8)
    ours = uint8_to_normalized(image).permute(0, 2, 3, 1).numpy()
    for i in range(2):
        np.testing.assert_allclose(ours[i], zscore(image[i].numpy(), axis=(0, 1)), atol=1e-4)


def test_stages_take_uint8_and_name_their_outputs(tiny):
    segmentation = segmentation_stage(tiny).eval()
    features = FeatureStage(create_model("hybrid_features", tiny)).eval()
    head = HeadStage(create_model("mhsa_head", tiny, num_features=features.features.num_features)).eval()
    image = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        mask, attention, segmented = segmentation(image)
        probabilities, feature_attention = head(features(segmented))
    assert mask.dtype == torch.uint8 and mask.shape == (2, 64, 64)
    assert attention.dtype == torch.uint8 and segmented.shape == (2, 3, 64, 64)
    np.testing.assert_allclose(probabilities.sum(1).numpy(), 1.0, atol=1e-5)
    assert feature_attention.shape == (2, tiny.head.tokens)


def test_hard_gate_zeroes_the_background_and_keeps_the_cells(tiny):
    normalized = torch.randn(1, 3, 4, 4)
    probability = torch.full((1, 1, 4, 4), 0.2)
    probability[..., :2, :] = 0.7  # the top half is "cell"
    soft = segmented_input(normalized, probability)
    hard = segmented_input(normalized, probability, hard=True)
    assert torch.equal(hard[..., :2, :], normalized[..., :2, :]) and torch.all(hard[..., 2:, :] == 0)
    assert torch.allclose(soft, normalized * probability)
    # the profile switch reaches the served stage: nothing but the cells gets through
    gated = segmentation_stage(tiny.with_overrides(["segmentation.hard_gate=true"])).eval()
    assert gated.hard_gate and not segmentation_stage(tiny).hard_gate
    image = torch.randint(0, 255, (2, 64, 64, 3), dtype=torch.uint8)
    with torch.no_grad():
        mask, _, segmented = gated(image)
    background = (mask < 128).unsqueeze(1).expand_as(segmented)  # mask is the probability as uint8
    assert torch.all(segmented[background] == 0)


def test_profile_overrides_change_one_field_and_refuse_unknown_ones():
    compact = get_profile("compact")
    changed = compact.with_overrides(["segmentation.input_scale=2", "preprocess.flatten_background=true",
                                      "preprocess.multiscale_sigmas=[1, 3]"])
    assert changed.segmentation.input_scale == 2 and changed.preprocess.flatten_background is True
    assert changed.preprocess.multiscale_sigmas == (1, 3)
    assert changed.with_overrides([]) == changed and changed.features == compact.features
    for bad in ("segmentation.no_such_field=1", "segmentation=3", "input_scale", "segmentation.input_scale=0"):
        with pytest.raises(ValueError):
            compact.with_overrides([bad])


def test_a_profile_separates_the_field_in_scanner_pixels_from_the_network_input():
    compact = get_profile("compact")
    assert (compact.field_size, compact.image_size, compact.features.input_size) == (224, 112, 112)
    assert Profile.from_dict(compact.to_dict()) == compact
    older = compact.to_dict()
    del older["field_size"]  # manifests exported before the field existed were all 224 px fields
    assert Profile.from_dict(older).field_size == 224


def test_the_mask_filter_removes_the_period_two_pattern_and_keeps_a_flat_mask():
    from models.stages import smooth_mask

    stripes = torch.zeros(1, 1, 8, 8)
    stripes[..., 1::2] = 1.0  # every other column, as the shipped U-Net's background had it
    smoothed = smooth_mask(stripes)
    assert smoothed.shape == stripes.shape
    assert torch.allclose(smoothed[..., 1:-1, 1:-1], torch.full((1, 1, 6, 6), 0.5))
    flat = torch.full((1, 1, 5, 7), 0.3)
    assert torch.allclose(smooth_mask(flat), flat)


def test_the_shipped_segmentation_graph_serves_the_filtered_mask(tmp_path):
    import onnx
    import onnxruntime as ort

    from export.graph_patches import add_mask_filter, patch_repository
    from models.stages import smooth_mask, to_uint8_map

    repository = Path(__file__).resolve().parents[2] / "model_repository"
    model = onnx.load(repository / "segmentation" / "1" / "model.onnx")
    assert not add_mask_filter(model)  # the shipped graph has it, once
    pad = next(node for node in model.graph.node if node.op_type == "Pad" and "mask" in node.name)
    model.graph.output.append(onnx.helper.make_tensor_value_info(pad.input[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    field = np.random.default_rng(0).integers(0, 255, (2, 112, 112, 3), dtype=np.uint8)
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, {"image": field}), strict=True))
    expected = to_uint8_map(smooth_mask(torch.from_numpy(outputs[pad.input[0]]))[:, 0]).numpy()
    assert np.abs(outputs["mask"].astype(int) - expected).max() <= 1
    assert not patch_repository(repository)  # idempotent: the file is left alone
