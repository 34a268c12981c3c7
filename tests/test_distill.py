"""The distillation loss and loop shared by Matryoshka training and EliteKV uptraining."""

from __future__ import annotations

import math

import pytest
import torch

from compresskv.distill import Distiller, distill_loss


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_z = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_z for x in row]


def _by_hand(student, teacher, ids, kl_weight, ce_weight, t, kl_last_token):
    batch, length, _ = student.shape
    ce = [-_log_softmax(student[b, i].tolist())[int(ids[b, i + 1])] for b in range(batch) for i in range(length - 1)]
    ce = sum(ce) / len(ce)
    if teacher is None:
        return ce_weight * ce, None, ce
    kls = []
    for b in range(batch):
        for i in range(length if kl_last_token else length - 1):
            ls = _log_softmax((student[b, i] / t).tolist())
            lt = _log_softmax((teacher[b, i] / t).tolist())
            kls.append(sum(math.exp(a) * (a - c) for a, c in zip(lt, ls)))
    kl = sum(kls) / len(kls) * t * t
    return ce_weight * ce + kl_weight * kl, kl, ce


@pytest.mark.parametrize("kl_last_token", [True, False])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_loss_is_the_hand_computation(kl_last_token, temperature):
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(torch.bfloat16)
    teacher = torch.randn(2, 3, 5, generator=g, dtype=torch.float64).to(torch.bfloat16)
    ids = torch.randint(0, 5, (2, 3), generator=g)
    loss, kl, ce = distill_loss(student, teacher, ids, 0.25, 0.75, temperature, kl_last_token)
    assert loss.dtype == kl.dtype == ce.dtype == torch.float32 and not kl.requires_grad
    want = _by_hand(student.double(), teacher.double(), ids, 0.25, 0.75, temperature, kl_last_token)
    assert [loss.item(), kl.item(), ce.item()] == pytest.approx(want, rel=1e-5)
    # Without teacher logits: the cross-entropy alone.
    loss, kl, ce = distill_loss(student, None, ids, 0.25, 0.75, temperature, kl_last_token)
    assert kl is None and loss.item() == pytest.approx(0.75 * want[2], rel=1e-5)


class _Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.head = torch.nn.Linear(4, 7)

    def forward(self, ids, delta=None):
        h = self.emb(ids)
        return self.head(h if delta is None else h + delta)


def test_loop_updates_only_the_trainable_parameters():
    torch.manual_seed(0)
    model = _Toy()
    model.head.weight.requires_grad_(False)  # flags as they were are restored, whatever they were
    before = {k: v.clone() for k, v in model.state_dict().items()}
    delta = torch.zeros(4, requires_grad=True)  # a trainable tensor outside the model
    distiller = Distiller([delta, model.head.bias], lr=1e-1, schedule=lambda step: 1.0 / (step + 1),
                          kl_weight=0.5, ce_weight=0.5)
    ids = torch.randint(0, 7, (3, 2, 5), generator=torch.Generator().manual_seed(1))
    seen, lrs = [], []

    def student(b):
        assert not model.emb.weight.requires_grad and not model.head.weight.requires_grad
        assert model.head.bias.requires_grad
        return model(b["input_ids"], delta)

    def teacher(b):
        assert not torch.is_grad_enabled()
        return model(b["input_ids"])

    def on_step(s):
        seen.append(s)
        lrs.append(distiller.optimizer.param_groups[0]["lr"])

    distiller.run(model, 3, lambda step: {"input_ids": ids[step]}, student, teacher, start=1, progress=False,
                  on_step=on_step)
    assert [s.step for s in seen] == [1, 2] and all(s.tokens == 10 for s in seen)
    assert all(math.isfinite(s.loss) and s.kl >= 0 for s in seen)
    assert lrs == pytest.approx([0.1 / 2, 0.1 / 3])  # the rate after each step is the next step's
    after = model.state_dict()
    assert torch.equal(after["emb.weight"], before["emb.weight"]) and model.emb.weight.grad is None
    assert torch.equal(after["head.weight"], before["head.weight"]) and model.head.weight.grad is None
    assert not torch.equal(after["head.bias"], before["head.bias"]) and delta.abs().max() > 0
    assert model.emb.weight.requires_grad and not model.head.weight.requires_grad and model.head.bias.requires_grad
