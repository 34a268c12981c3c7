"""Uptraining a converted model: distillation from the original (KL) plus the LM loss.

The paper uptrains on 0.6% of the pretraining tokens; here the same loop runs short (CPU) or long
(GPU) on the user's texts. By default only the converted attention layers are trained (the rest of
the network is the original's and stays frozen); ``trainable="all"`` trains everything. A checkpoint
(trained weights, optimizer, scheduler, step, loss history) is written every ``save_every`` steps
and at the end; calling again with the same ``checkpoint`` resumes where it stopped. The data order
is a function of ``seed`` and the step, so a resumed run sees the same batches it would have seen.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..calibration import Texts, calibration_windows
from .cache import elitekv_spec
from ..distill import Distiller, Step


@dataclass
class UptrainConfig:
    """The options of :func:`uptrain` (recorded in its checkpoint)."""

    steps: int = 100
    seq_len: int = 512
    batch_size: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup: float = 0.05
    kl_weight: float = 1.0
    lm_weight: float = 0.25
    temperature: float = 1.0
    trainable: str = "attention"
    max_grad_norm: float = 1.0
    seed: int = 0


def _trainable_names(model: torch.nn.Module, trainable: str) -> list[str]:
    from .attention import EliteKVAttention

    if trainable == "all":
        return [n for n, _ in model.named_parameters()]
    if trainable != "attention":
        raise ValueError(f"compresskv.elitekv: trainable must be 'attention' or 'all', got {trainable!r}")
    names = []
    for mname, module in model.named_modules():
        if isinstance(module, EliteKVAttention):
            names += [f"{mname}.{n}" for n, _ in module.named_parameters()]
    return names


def _batch(windows: torch.Tensor, step: int, batch_size: int, seed: int) -> torch.Tensor:
    n = windows.shape[0]
    rows = []
    for slot in range(batch_size):
        i = step * batch_size + slot
        epoch, pos = divmod(i, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        rows.append(windows[perm[pos]])
    return torch.stack(rows)


def uptrain(
    model: torch.nn.Module,
    texts: Texts,
    teacher: torch.nn.Module | None = None,
    tokenizer: Any = None,
    *,
    steps: int = 100,
    seq_len: int = 512,
    batch_size: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.0,
    warmup: float = 0.05,
    kl_weight: float = 1.0,
    lm_weight: float = 0.25,
    temperature: float = 1.0,
    trainable: str = "attention",
    max_grad_norm: float = 1.0,
    seed: int = 0,
    checkpoint: str | Path | None = None,
    save_every: int = 25,
    resume: bool = True,
    stop_at: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Fine-tune the EliteKV-converted ``model`` on ``texts`` (strings with ``tokenizer=``, or token
    ids; cut into windows of ``seq_len``) for ``steps`` optimizer steps of ``batch_size`` windows.

    Loss: ``kl_weight`` · KL(teacher ‖ student) (``teacher``: the original model, on its own device)
    + ``lm_weight`` · next-token cross-entropy. AdamW, linear warm-up over ``warmup`` of the steps then
    cosine decay to 10%, gradient clipping at ``max_grad_norm``. Runs on the model's device.
    ``checkpoint``: a directory; resumed from when it holds a checkpoint of the same setting (and
    ``resume``). ``stop_at``: stop (and checkpoint) after that step, to continue later with the
    same call without it (runs in time-limited pieces). Returns ``{"steps", "tokens", "seconds", "device", "history", "config"}``; the model
    is left in eval mode with the trained weights.
    """
    spec = elitekv_spec(model)
    cfg = UptrainConfig(steps, seq_len, batch_size, lr, weight_decay, warmup, kl_weight, lm_weight, temperature,
                        trainable, max_grad_norm, seed)
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"compresskv.elitekv: steps must be a positive int, got {steps!r}")
    if kl_weight and teacher is None:
        raise ValueError("compresskv.elitekv: distillation needs teacher= (the original model), or kl_weight=0")
    if teacher is not None and getattr(getattr(teacher, "config", None), "elitekv", None):
        raise ValueError("compresskv.elitekv: the teacher is itself EliteKV-converted; pass the original model")
    windows = calibration_windows(texts, tokenizer, seq_len=seq_len, min_windows=1)
    device = next(model.parameters()).device
    names = set(_trainable_names(model, trainable))
    warm = max(1, int(round(warmup * steps)))

    def schedule(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = (step - warm) / max(1, steps - warm)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress_)))

    distiller = Distiller([p for n, p in model.named_parameters() if n in names], lr=lr, schedule=schedule,
                          kl_weight=kl_weight, ce_weight=lm_weight, temperature=temperature, kl_last_token=False,
                          weight_decay=weight_decay, betas=(0.9, 0.95), max_grad_norm=max_grad_norm)
    optimizer, scheduler = distiller.optimizer, distiller.scheduler
    meta = {
        "rope_pairs": spec["rope_pairs"], "kv_dim": spec["kv_dim"], "selection": spec["selection"],
        "svd": spec["svd"], **{k: v for k, v in asdict(cfg).items() if k != "steps"},
    }
    start, history, seconds = 0, [], 0.0
    ckpt_file = Path(checkpoint) / "uptrain.pt" if checkpoint is not None else None
    if ckpt_file is not None and resume and ckpt_file.exists():
        state = torch.load(ckpt_file, map_location=device, weights_only=True)
        if state["meta"] != meta:
            raise ValueError(
                f"compresskv.elitekv: {ckpt_file} is a checkpoint of another setting ({state['meta']}); use another "
                "checkpoint directory or resume=False"
            )
        with torch.no_grad():
            own = dict(model.named_parameters())
            for n, t in state["params"].items():
                own[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start, history, seconds = int(state["step"]), list(state["history"]), float(state["seconds"])

    def save(step: int) -> None:
        if ckpt_file is None:
            return
        ckpt_file.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "meta": meta, "step": step, "seconds": seconds, "history": history,
            "params": {n: p.detach().cpu() for n, p in model.named_parameters() if n in names},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        }
        tmp = ckpt_file.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, ckpt_file)

    if teacher is not None:
        teacher.eval()
        t_device = next(teacher.parameters()).device

    def batch(step: int) -> dict[str, torch.Tensor]:
        return {"input_ids": _batch(windows, step, batch_size, seed).to(device)}

    def teacher_logits(b: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if teacher is None or not kl_weight:
            return None
        return teacher(input_ids=b["input_ids"].to(t_device), use_cache=False).logits.to(device)

    def record(s: Step) -> None:
        nonlocal seconds
        seconds += s.seconds
        history.append({"step": s.step + 1, "loss": s.loss, "kl": s.kl, "ce": s.ce, "lr": scheduler.get_last_lr()[0]})
        if save_every and (s.step + 1) % save_every == 0 and s.step + 1 < end:
            save(s.step + 1)

    end = steps if stop_at is None else max(start, min(steps, int(stop_at)))
    model.train()
    try:
        distiller.run(model, steps, batch, lambda b: model(input_ids=b["input_ids"], use_cache=False).logits,
                      teacher_logits, start=start, end=end, desc="EliteKV uptraining", progress=progress, on_step=record)
        save(end)
    finally:
        model.eval()
    return {
        "steps": end,
        "tokens": end * batch_size * windows.shape[1],
        "seconds": seconds,
        "device": str(device) if device.type != "cuda" else torch.cuda.get_device_name(device),
        "history": history,
        "config": asdict(cfg),
    }
