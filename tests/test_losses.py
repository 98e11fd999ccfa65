"""The three training losses on hand-made cases."""

import math

import pytest
import torch

from ftp_vllm.training.losses import distillation_loss, guide_loss, guide_weight, sparsity_loss


def test_guide_loss_is_cross_entropy_toward_static_decisions():
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    keep = torch.tensor([True, False])
    expected = (math.log(2) + -math.log(math.exp(2) / (math.exp(2) + 1))) / 2
    assert guide_loss(logits, keep).item() == pytest.approx(expected, rel=1e-6)
    assert guide_loss(torch.tensor([[-50.0, 50.0]]), torch.tensor([True])).item() < 1e-6


def test_sparsity_loss_is_one_sided_sum_over_blocks():
    p = [torch.tensor([0.1, 0.3]), torch.tensor([0.9, 0.5]), torch.tensor([0.0, 0.0])]
    t = [torch.full((2,), 0.4), torch.full((2,), 0.3), torch.full((2,), 0.1)]
    # block 0: 0.4 - 0.2 = 0.2; block 1: over target -> 0; block 2: 0.1
    assert sparsity_loss(p, t).item() == pytest.approx(0.3)
    p[0] = torch.tensor([0.5, 0.5], requires_grad=True)
    assert sparsity_loss(p, t).item() == pytest.approx(0.1)


def test_distillation_loss_is_kl_teacher_to_student():
    teacher = torch.log(torch.tensor([[0.5, 0.5], [0.9, 0.1]]))
    student = torch.log(torch.tensor([[0.25, 0.75], [0.9, 0.1]]))
    kl0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert distillation_loss(student, teacher).item() == pytest.approx(kl0 / 2, rel=1e-5)
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-7)


def test_guide_weight_decays_to_zero():
    assert guide_weight(0, 100) == 1.0
    assert guide_weight(25, 100) == pytest.approx(0.5)
    assert guide_weight(50, 100) == 0.0 and guide_weight(90, 100) == 0.0
