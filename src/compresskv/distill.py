"""The distillation loop shared by Matryoshka training and EliteKV uptraining.

Both train a few parameters so that a model with a compressed cache (the student) predicts like
the model without it (the teacher), on calibration windows:

* :func:`distill_loss` — ``kl_weight · KL(teacher ‖ student) · T² + ce_weight · CE`` over
  next-token positions, in fp32.
* :func:`trainable_only` — the model's own weights frozen except the trainable ones (flags
  restored on exit).
* :class:`Distiller` — AdamW and a per-step learning-rate factor over the trainable parameters;
  :meth:`Distiller.run` is the loop: batch, teacher logits (no grad), student logits, loss,
  backward, gradient clipping, optimizer and schedule step, progress bar, a callback per step.

What differs stays with the caller: which parameters train, how a batch is drawn (and seeded), how
the student and the teacher are run (a cache tap with sampled ranks for Matryoshka; a converted
model and the original for EliteKV), the learning-rate schedule, checkpoints and what is recorded.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

Batch = dict[str, Any]


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    input_ids: torch.Tensor,
    kl_weight: float,
    ce_weight: float,
    temperature: float = 1.0,
    kl_last_token: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """``ce_weight · CE + kl_weight · KL(teacher ‖ student) · T²``, in fp32; returns ``(loss, kl, ce)``
    with ``kl`` and ``ce`` detached (``kl`` is ``None`` without teacher logits, and then not in the loss).

    CE is the mean next-token cross-entropy (positions ``0..T-2`` predict ``input_ids[:, 1:]``).
    KL is ``Σ_v p_t (log p_t − log p_s)`` of the temperature-``T`` softmaxes, averaged over the
    positions: all of them (``kl_last_token``: the last one has a teacher distribution but no CE
    target) or those of the CE.
    """
    logits = student_logits.float()
    log_s = F.log_softmax(logits, dim=-1)
    ce = F.nll_loss(log_s[:, :-1].reshape(-1, log_s.shape[-1]), input_ids[:, 1:].reshape(-1))
    loss = ce_weight * ce
    if teacher_logits is None:
        return loss, None, ce.detach()
    t = temperature
    keep = slice(None) if kl_last_token else slice(None, -1)
    log_s_t = log_s if t == 1 else F.log_softmax(logits / t, dim=-1)
    log_t = F.log_softmax(teacher_logits[:, keep].float() / t, dim=-1)
    kl = (log_t.exp() * (log_t - log_s_t[:, keep])).sum(-1).mean() * t * t
    return loss + kl_weight * kl, kl.detach(), ce.detach()


@contextlib.contextmanager
def trainable_only(model: torch.nn.Module, params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, of ``model``'s parameters exactly those in ``params`` require grad (the
    base model is frozen); every flag is restored on exit. ``params`` may also hold tensors that
    are not the model's (left as they are)."""
    train = {id(p) for p in params}
    own = list(model.parameters())
    saved = [p.requires_grad for p in own]
    try:
        for p in own:
            p.requires_grad_(id(p) in train)
        yield
    finally:
        for p, flag in zip(own, saved):
            p.requires_grad_(flag)


@dataclass
class Step:
    """What one optimizer step of :meth:`Distiller.run` did (handed to its ``on_step``)."""

    step: int  # 0-based index of the step
    loss: float
    kl: float  # 0.0 without teacher logits
    ce: float
    tokens: int  # tokens in the batch
    seconds: float  # wall time of the step


class Distiller:
    """AdamW over ``params`` with the learning rate ``lr · schedule(step)`` (a ``LambdaLR``), the
    loss of :func:`distill_loss` with these weights, and gradient-norm clipping at
    ``max_grad_norm`` (0: none). ``optimizer`` and ``scheduler`` are exposed for checkpoints."""

    def __init__(
        self,
        params: Iterable[torch.Tensor],
        *,
        lr: float,
        schedule: Callable[[int], float],
        kl_weight: float,
        ce_weight: float,
        temperature: float = 1.0,
        kl_last_token: bool = True,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        max_grad_norm: float = 1.0,
    ):
        self.params = list(params)
        self.kl_weight, self.ce_weight = kl_weight, ce_weight
        self.temperature, self.kl_last_token = temperature, kl_last_token
        self.max_grad_norm = max_grad_norm
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=weight_decay, betas=betas)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)

    def step(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor | None, input_ids: torch.Tensor):
        """One optimizer step on the loss of these logits; returns ``(loss, kl, ce)`` as floats."""
        loss, kl, ce = distill_loss(student_logits, teacher_logits, input_ids, self.kl_weight, self.ce_weight,
                                    self.temperature, self.kl_last_token)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        return loss.item(), (0.0 if kl is None else kl.item()), ce.item()

    def run(
        self,
        model: torch.nn.Module,
        steps: int,
        batch: Callable[[int], Batch],
        student: Callable[[Batch], torch.Tensor],
        teacher: Callable[[Batch], torch.Tensor | None],
        *,
        start: int = 0,
        end: int | None = None,
        desc: str = "distillation",
        progress: bool = True,
        on_step: Callable[[Step], None] | None = None,
    ) -> None:
        """Steps ``start..end-1`` (default all ``steps``) with ``model``'s own weights frozen except
        the trainable ones. Per step: ``batch(step)`` (a dict with ``input_ids`` on the model's
        device, and whatever the forwards need), ``teacher(batch)`` under ``no_grad`` (logits, or
        ``None`` for CE only), ``student(batch)`` (logits), one :meth:`step`, then ``on_step``.
        A progress bar named ``desc`` shows the running loss. A run from ``start > 0`` (a resumed
        one) expects the optimizer and scheduler states of that step to have been loaded."""
        from tqdm.auto import tqdm

        end = steps if end is None else end
        bar = tqdm(total=steps, initial=start, desc=desc, unit="step", disable=not progress)
        try:
            with trainable_only(model, self.params):
                for step in range(start, end):
                    t0 = time.perf_counter()
                    b = batch(step)
                    with torch.no_grad():
                        teacher_logits = teacher(b)
                    loss, kl, ce = self.step(student(b), teacher_logits, b["input_ids"])
                    done = Step(step, loss, kl, ce, int(b["input_ids"].numel()), time.perf_counter() - t0)
                    bar.set_postfix(loss=f"{loss:.4f}", kl=f"{kl:.4f}", ce=f"{ce:.3f}")
                    bar.update()
                    if on_step is not None:
                        on_step(done)
        finally:
            bar.close()
