"""The self-distillation objective: Sinkhorn-Knopp targets, KoLeo, schedules, layer-wise lr decay, and a
few dozen real optimisation steps on a fixed batch of real slices (the loss drops, the teacher only
follows by EMA and never gets gradients)."""
from __future__ import annotations

import copy

import pytest
import torch
from training_helpers import MICRO_CONFIG, micro_shards, single_thread  # noqa: F401

from BrainDINOLib.training import SliceShards, load_config
from BrainDINOLib.training.batches import StepBatches
from BrainDINOLib.training.losses import koleo_loss, sinkhorn_knopp
from BrainDINOLib.training.model import build_network
from BrainDINOLib.training.optim import Schedules, StepValues, apply_step_values, build_optimizer
from BrainDINOLib.training.trainer import Losses, training_step


def test_sinkhorn_knopp_gives_distributions_that_use_all_prototypes_equally():
    torch.manual_seed(0)
    scores = torch.randn(64, 16) + torch.linspace(0, 2, 16)  # biased towards the last prototypes
    targets = sinkhorn_knopp(scores, temperature=1.0, iterations=20)
    torch.testing.assert_close(targets.sum(dim=1), torch.ones(64))
    torch.testing.assert_close(targets.sum(dim=0), torch.full((16,), 4.0), rtol=0.02, atol=0.02)
    plain = torch.softmax(scores, dim=1).sum(dim=0)
    assert plain.max() / plain.min() > 3  # what the equipartition corrects


def test_koleo_rewards_spread_embeddings():
    clustered = torch.randn(1, 8) + 0.01 * torch.randn(32, 8)
    spread = torch.randn(32, 8)
    assert koleo_loss(spread) < koleo_loss(clustered) - 2
    assert koleo_loss(torch.randn(1, 8)) == 0


def test_schedules_warm_up_then_decay_and_layers_get_decayed_lrs():
    config = load_config(MICRO_CONFIG, ["optim.steps=100", "optim.warmup_fraction=0.1", "optim.batch_size=256"])
    schedules = Schedules(config.optim, config.loss, total_batch=1024)
    assert schedules.peak_lr == pytest.approx(config.optim.base_lr)  # sqrt(1024 / 1024)
    lrs = [schedules.at(s).lr for s in range(100)]
    assert lrs[0] < lrs[5] < lrs[9] == pytest.approx(schedules.peak_lr) and lrs[99] < 0.01 * lrs[9]
    assert schedules.at(0).momentum == pytest.approx(config.optim.momentum[0])
    assert schedules.at(99).momentum == pytest.approx(1.0) and schedules.at(99).weight_decay == pytest.approx(0.2)
    assert schedules.at(0).teacher_temperature == pytest.approx(0.04)
    assert schedules.at(50).teacher_temperature == pytest.approx(0.07)
    network = build_network(config.model, config.loss)
    optimizer = build_optimizer(network, network.architecture.depth, config.optim)
    apply_step_values(optimizer, schedules.at(10))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    wd_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    blocks = network.backbone.blocks
    assert lr_of[id(network.backbone.patch_embed.proj.weight)] < lr_of[id(blocks[0].attn.qkv.weight)] \
        < lr_of[id(blocks[1].attn.qkv.weight)] < lr_of[id(network.dino_head.mlp[0].weight)]
    assert wd_of[id(blocks[0].attn.qkv.weight)] > 0
    assert wd_of[id(blocks[0].norm1.bias)] == 0 and wd_of[id(network.backbone.cls_token)] == 0


def test_a_few_dozen_steps_on_a_fixed_batch_lower_the_loss_and_the_teacher_only_follows(tmp_path_factory):
    torch.manual_seed(0)
    config = load_config(MICRO_CONFIG)
    shards = SliceShards(micro_shards(tmp_path_factory))
    batch = StepBatches(shards, config.crops, config.loss, 8, 16, 1, seed=0)[0]
    student = build_network(config.model, config.loss)
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    losses = Losses(config)
    optimizer = build_optimizer(student, student.architecture.depth, config.optim)
    values = StepValues(lr=1e-3, weight_decay=0.04, momentum=0.9, teacher_temperature=0.05, freeze_prototypes=False)
    apply_step_values(optimizer, values)
    history = []
    for step in range(30):
        teacher_before = [p.clone() for p in teacher.parameters()]
        history.append(float(training_step(student, teacher, losses, optimizer, batch, values, 3.0)["loss"]))
        assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    # The last step's teacher update is exactly the EMA of the updated student.
    for before, after, current in zip(teacher_before, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(after, 0.9 * before + 0.1 * current.detach())
    assert sum(history[-5:]) / 5 < 0.9 * sum(history[:5]) / 5, history
    assert history[-1] < history[0] - 1.5, history
