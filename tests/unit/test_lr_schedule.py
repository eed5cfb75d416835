"""The learning-rate schedule of every training phase: timm's cosine scheduler, stepped per update."""

from __future__ import annotations

import math

import pytest
import torch

from training.pipeline import cosine_schedule

BASE_LR = 2e-3


def _optimizer(lr: float = BASE_LR) -> torch.optim.Optimizer:
    return torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=lr, weight_decay=0.05)


def _lrs(warmup: int, total: int) -> list[float]:
    """The lr each update runs at, set as the training loops set it: ``step_update(step)`` before the step."""
    optimizer = _optimizer()
    schedule = cosine_schedule(optimizer, warmup, total)
    lrs = []
    for step in range(total):
        schedule.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
    return lrs


def test_warmup_then_cosine_to_zero_at_known_points() -> None:
    lrs = _lrs(warmup=5, total=20)  # one epoch of 5 updates warms up; 16 updates decay from the peak

    assert lrs[0] == pytest.approx(BASE_LR / 5)  # the first update already learns
    assert lrs[2] == pytest.approx(3 * BASE_LR / 5)
    assert lrs[4] == pytest.approx(BASE_LR)  # the peak closes the first epoch
    assert lrs[12] == pytest.approx(BASE_LR / 2)  # half-way down the cosine
    assert lrs[19] == pytest.approx(0.5 * BASE_LR * (1 + math.cos(math.pi * 15 / 16)))
    assert 0 < lrs[19] < 0.01 * BASE_LR  # near 0 at the end, not 0: the last update is not wasted
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:], strict=False))
    assert max(lrs) == pytest.approx(BASE_LR)


def test_warmup_matches_the_linear_ramp_the_recipes_were_trained_with() -> None:
    warmup = 7
    lrs = _lrs(warmup=warmup, total=70)
    assert lrs[:warmup] == pytest.approx([BASE_LR * (step + 1) / warmup for step in range(warmup)])


def test_one_update_per_epoch_starts_at_the_peak() -> None:
    lrs = _lrs(warmup=1, total=4)
    assert lrs == pytest.approx([BASE_LR * 0.5 * (1 + math.cos(math.pi * t / 4)) for t in range(4)])


def test_a_resumed_optimizer_keeps_the_schedule_of_the_fresh_run() -> None:
    interrupted = _optimizer()
    schedule = cosine_schedule(interrupted, 5, 20)
    for step in range(11):
        schedule.step_update(step)
        interrupted.step()
    state = interrupted.state_dict()  # holds the decayed lr of update 10

    resumed = _optimizer()
    schedule = cosine_schedule(resumed, 5, 20)  # built before loading, as train_backbones does
    resumed.load_state_dict(state)
    schedule.step_update(12)
    assert resumed.param_groups[0]["lr"] == pytest.approx(_lrs(5, 20)[12])
