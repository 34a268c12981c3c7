"""What a measurement ran on: one helper that benchmarks record next to their numbers."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from typing import Any

import torch


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """The machine, software versions and (for a CUDA ``device``) the GPU, as a JSON-ready dict.

    ``device`` defaults to the first CUDA device when there is one, else the CPU. Keys: ``platform``,
    ``processor``, ``python``, ``cpus``, ``threads``, ``loadavg_1_5_15`` (other work skews CPU
    timings), ``torch``, ``transformers``, ``compresskv``, ``accelerate``, ``triton``,
    ``flash_attn`` (versions, ``None`` when not installed), ``device`` (the GPU's name, or
    ``"cpu"``) and, on CUDA, ``gpu`` (name, compute capability, total memory, count, CUDA and
    driver-side versions).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "compresskv": _version("compresskv"),
        "accelerate": _version("accelerate"),
        "triton": _version("triton"),
        "flash_attn": _version("flash-attn") or _version("flash_attn"),
        "device": "cpu",
    }
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        info["device"] = props.name
        info["gpu"] = {
            "name": props.name,
            "index": index,
            "capability": f"{props.major}.{props.minor}",
            "total_memory_bytes": int(props.total_memory),
            "multiprocessors": int(props.multi_processor_count),
            "count": torch.cuda.device_count(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(),
        }
    return info


__all__ = ["machine_info"]
