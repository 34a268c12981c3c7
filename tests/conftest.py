"""Tiny random-weight models built from configs (fp32, CPU), shared by the tests."""

from __future__ import annotations

import os

# Idle OpenMP threads sleep rather than spin (as the compresskv command sets it; see
# benchmarks/threads.py): on a shared 2-core CI machine spinning threads stall each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (
    AutoModelForCausalLM,
    DynamicCache,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
    Qwen3Config,
)

from compresskv import compat

FAMILIES = ("llama", "qwen2", "qwen3", "mistral")
ATTENTIONS = ("eager", "sdpa")
VOCAB = 96


def tiny_config(family: str = "llama", layers: int = 4, kv_heads: int = 2, heads: int = 4, **extra):
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    common.update(extra)
    if family == "llama":
        return LlamaConfig(**common)
    if family == "qwen2":
        return Qwen2Config(**{"use_sliding_window": False, **common})
    if family == "qwen3":
        return Qwen3Config(**{"head_dim": 16, "use_sliding_window": False, **common})
    if family == "mistral":
        return MistralConfig(**{"sliding_window": None, **common})
    raise ValueError(family)


def kv(cache):
    """``{"cache": cache}`` on transformers >= 5.24, ``{"past_key_values": cache}`` before: pass as
    ``model.generate(..., **kv(cache))`` or ``model(..., **kv(cache))``."""
    return compat.cache_kwargs(cache)


def tiny_model(family: str = "llama", attn: str = "sdpa", seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    config = tiny_config(family, **kwargs)
    config._attn_implementation = attn
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    # Random init gives near-uniform attention; sharpen it so that eviction choices matter.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(4.0)
    return model


def batch_inputs(batch: int, length: int = 48, seed: int = 1):
    """Token ids with left padding (row i padded by 7·i tokens) and their attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(batch):
        mask[row, : 7 * row] = 0
    ids[mask == 0] = 0
    return ids, mask


def greedy(model, ids, mask, cache, new_tokens: int = 6, chunk: int | None = None, **extra):
    """Greedy tokens and logits; the prompt fed ``chunk`` tokens at a time (``None``: at once)."""
    out = generate_output(model, ids, mask, cache, new_tokens, chunk, **extra)
    return out.sequences, torch.stack(out.logits, dim=1)


def generate_output(model, ids, mask, cache, new_tokens: int = 6, chunk: int | None = None, **extra):
    """``generate``'s whole output (greedy, exactly ``new_tokens``, logits kept)."""
    return model.generate(
        input_ids=ids,
        attention_mask=mask,
        **kv(cache),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        prefill_chunk_size=chunk,
        **extra,
    )


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (the scripts are not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"benchmarks_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses in the script look their module up here
    spec.loader.exec_module(module)
    return module


def dynamic(model):
    return DynamicCache(config=model.config)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    # COMPRESSKV_GPU_TESTS_ON=cpu dry-runs test_gpu.py's logic (its device is a parameter there);
    # the other gpu tests exercise CUDA-only kernels.
    dry_run = bool(os.environ.get("COMPRESSKV_GPU_TESTS_ON"))
    skip = pytest.mark.skip(reason="needs a CUDA device (run on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not (dry_run and item.module.__name__ == "test_gpu"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def tok():
    """The tiny byte-level BPE tokenizer with a chat template (``tests/tiny_tokenizer.py``), for the
    evaluation tests (a module that defines its own ``tok`` uses that)."""
    from tiny_tokenizer import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    """A 2-layer random llama with the tiny tokenizer's vocabulary (a module that defines its own
    ``model`` fixture uses that)."""
    return tiny_model("llama", vocab_size=len(tok), layers=2)
