"""Unfreezing schedule, parameter groups, early stopping: the fine-tuning step's rules."""
import pytest
import torch

from training.model.backbones import get_backbone_spec
from training.loop.steps import EarlyStopping, make_optimizer, open_stages_at
from training.model.classifier import build_classifier
from tests.training_data import fast_config


@pytest.fixture(scope="module")
def lite0():
    model, _ = build_classifier(get_backbone_spec("efficientnet_lite0"), num_classes=3)
    return model


def test_gradual_schedule_opens_one_block_per_period_from_the_top_after_head_epochs():
    cfg = fast_config(strategy="gradual", head_epochs=2, unfreeze_every=2, unfreeze_blocks=3, epochs=12)
    assert [open_stages_at(e, cfg, 9) for e in range(10)] == [0, 0, 1, 1, 2, 2, 3, 3, 3, 3]


def test_freeze_strategy_never_opens_and_finetune_opens_everything():
    assert {open_stages_at(e, fast_config(strategy="freeze"), 9) for e in range(5)} == {0}
    assert {open_stages_at(e, fast_config(strategy="finetune"), 9) for e in range(5)} == {9}


def test_set_trainable_opens_exactly_the_top_stages(lite0):
    lite0.set_trainable(2)
    flags = [all(p.requires_grad for p in s.parameters()) for s in lite0.stages]
    closed = [not any(p.requires_grad for p in s.parameters()) for s in lite0.stages]
    n = len(lite0.stages)
    assert flags[n - 2:] == [True, True] and all(closed[: n - 2])
    assert all(p.requires_grad for p in lite0.head.parameters())
    assert lite0.frozen_stages == n - 2


def test_param_groups_give_backbone_the_head_lr_times_ratio(lite0):
    opt = make_optimizer(lite0, fast_config(lr=0.01, backbone_lr_ratio=0.25, weight_decay=0.05))
    lrs = {g["name"]: (g["lr"], g["weight_decay"]) for g in opt.param_groups}
    assert lrs["head"] == (0.01, 0.05)
    assert lrs["backbone"] == (0.0025, 0.05)
    assert lrs["backbone_no_decay"] == (0.0025, 0.0)
    head_ids = {id(p) for g in opt.param_groups if g["name"].startswith("head") for p in g["params"]}
    assert head_ids == {id(p) for p in lite0.head.parameters()}


def test_sgd_optimizer_is_built_with_momentum(lite0):
    opt = make_optimizer(lite0, fast_config(optimizer="sgd", momentum=0.8))
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["momentum"] == 0.8


def test_early_stopping_stops_after_patience_epochs_without_improvement():
    stop = EarlyStopping(mode="min", patience=2, min_delta=0.01)
    seen = []
    for epoch, v in enumerate([1.0, 0.6, 0.595, 0.7, 0.5]):
        stop.step(v, epoch)
        seen.append(stop.should_stop)
        if stop.should_stop:
            break
    assert seen == [False, False, False, True]
    assert stop.best_epoch == 1 and stop.best == 0.6


def test_early_stopping_in_max_mode_tracks_the_highest_value():
    stop = EarlyStopping(mode="max", patience=3)
    for epoch, v in enumerate([0.5, 0.9, 0.8]):
        stop.step(v, epoch)
    assert stop.best_epoch == 1 and not stop.should_stop
