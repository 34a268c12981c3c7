"""On a CUDA device (every test is marked ``gpu``; conftest skips them without one).

For every registered method at a setting that compresses nothing, in bf16 and fp16, under eager
and sdpa (and flash_attention_2 where flash-attn is installed), on a tiny random Llama with MHA
and one with GQA, batch 1 and batch 3 with left padding:

* teacher-forced logits (generate() made to emit DynamicCache's greedy tokens) match DynamicCache's
  within a tolerance derived from the dtype: the larger of a floor relative to the logits' scale
  and 4× the error the half-precision model itself makes against fp32 on the same tokens;
* free greedy generate() with the method picks DynamicCache's argmax (DynamicCache forced along the
  method's tokens, so that both see the same prefixes) wherever DynamicCache's top-2 margin
  exceeds twice that tolerance (a step whose margin is smaller may legitimately flip), with the
  logits within the tolerance at every step.

And a model split across devices with accelerate (decoder layers 0..s-1 on cuda:0, the rest on
the CPU, each executing where its weights are; and, separately, accelerate's usual CPU offload):
generate() works with every cache, is exact at no compression, and every tensor a cache layer
holds lives on the device its layer runs on.
"""

from __future__ import annotations

import copy
import functools
import os
from typing import Any, Callable

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList

import compresskv
from compresskv import elitekv
from conftest import VOCAB, batch_inputs, tiny_model, kv

pytestmark = pytest.mark.gpu

# COMPRESSKV_GPU_TESTS_ON=cpu dry-runs this module's logic without a GPU (conftest then runs it).
DEVICE = os.environ.get("COMPRESSKV_GPU_TESTS_ON", "cuda")
HALF = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Floor of the logit tolerance, relative to the largest |logit| of the reference: about 4 ulps of
# the dtype at the logits' scale (bf16 has 8 mantissa bits, fp16 11).
FLOOR = {"bf16": 1.5e-2, "fp16": 2e-3}
NOISE_FACTOR = 4.0
CONFIGS = {"llama-mha": dict(kv_heads=4), "llama-gqa": dict(kv_heads=2)}  # 4 query heads, head_dim 16
ATTENTIONS = ("eager", "sdpa")
NEW_TOKENS = 8
PROMPT = 48
HEAD_DIM = 16
SPLIT_PROMPT = 96
EVERYTHING = 512  # an eviction budget above every prompt here: nothing is evicted


# -- building the caches -----------------------------------------------------------------------------
def calibration_ids(n: int = 4, length: int = PROMPT, seed: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def _kv_heads(model: torch.nn.Module) -> int:
    return int(model.config.num_key_value_heads)


def _projections(model: torch.nn.Module) -> compresskv.Projections:
    """PCA projections of the fp32 CPU model (the caches cast them to the layer's device and dtype)."""
    return compresskv.calibrate(model, calibration_ids(), seq_len=PROMPT, progress=False)


def _full_width(model: torch.nn.Module, group_size: int) -> int:
    return group_size * _kv_heads(model) * HEAD_DIM


# Per method variant: (registered method, options at no compression). The options are computed from
# the fp32 CPU model (projections need it).
NO_COMPRESSION: dict[str, tuple[str, Callable[[torch.nn.Module], dict[str, Any]]]] = {
    "snapkv": ("snapkv", lambda m: dict(budget=EVERYTHING, window_size=8)),
    "pyramidkv": ("pyramidkv", lambda m: dict(budget=EVERYTHING, window_size=8)),
    "streamingllm": ("streamingllm", lambda m: dict(window=EVERYTHING)),
    "snapkv-bounded": ("snapkv", lambda m: dict(budget=EVERYTHING, window_size=8, decode_budget=EVERYTHING)),
    "streamingllm-bounded": ("streamingllm", lambda m: dict(window=EVERYTHING, decode_budget=EVERYTHING)),
    "knorm": ("knorm", lambda m: dict(budget=EVERYTHING)),
    "expected_attention": ("expected_attention", lambda m: dict(budget=EVERYTHING)),
    "matryoshka": ("matryoshka", lambda m: dict(projections=_projections(m), rank=HEAD_DIM)),
    "pca": ("pca", lambda m: dict(projections=_projections(m), rank=HEAD_DIM)),
    "xkv": ("xkv", lambda m: dict(group_size=2, rank_k=_full_width(m, 2), rank_v=_full_width(m, 2))),
    "xkv-post_rope": ("xkv", lambda m: dict(group_size=2, keys="post_rope", rank_k=_full_width(m, 2),
                                            rank_v=_full_width(m, 2))),
    "svd": ("svd", lambda m: dict(rank_k=_full_width(m, 1), rank_v=_full_width(m, 1))),
    "minicache": ("minicache", lambda m: dict(start_layer=0, gamma=1.0)),
    "elitekv": ("elitekv", lambda m: {}),  # the model is converted with every pair and the full joint rank
    # quantization: every token within the full-precision residual
    "int2": ("int2", lambda m: dict(residual=EVERYTHING)),
    "int4": ("int4", lambda m: dict(residual=EVERYTHING)),
    "int8": ("int8", lambda m: dict(residual=EVERYTHING)),
    "snapkv-int4": ("snapkv+int4", lambda m: dict(budget=EVERYTHING, window_size=8, residual=EVERYTHING)),
}
# Settings that do compress (used on the split model: generate must work and place tensors right).
COMPRESSING: dict[str, tuple[str, Callable[[torch.nn.Module], dict[str, Any]]]] = {
    "snapkv": ("snapkv", lambda m: dict(compression_ratio=0.5, window_size=8)),
    "pyramidkv": ("pyramidkv", lambda m: dict(compression_ratio=0.5, window_size=8)),
    "streamingllm": ("streamingllm", lambda m: dict(compression_ratio=0.5)),
    # 24 prompt tokens kept, then evicting every 4 decode steps (at most 28 a layer)
    "snapkv-bounded": ("snapkv", lambda m: dict(compression_ratio=0.5, window_size=8, decode_budget=28, decode_interval=4)),
    "streamingllm-bounded": ("streamingllm", lambda m: dict(compression_ratio=0.5, decode_budget=28, decode_interval=4)),
    "knorm": ("knorm", lambda m: dict(compression_ratio=0.5)),
    "expected_attention": ("expected_attention", lambda m: dict(compression_ratio=0.5)),
    "matryoshka": ("matryoshka", lambda m: dict(projections=_projections(m), compression_ratio=0.5)),
    "pca": ("pca", lambda m: dict(projections=_projections(m), compression_ratio=0.5)),
    "xkv": ("xkv", lambda m: dict(compression_ratio=0.5)),  # groups of 4: one group spans both devices
    "xkv-post_rope": ("xkv", lambda m: dict(compression_ratio=0.5, keys="post_rope")),
    "svd": ("svd", lambda m: dict(compression_ratio=0.5)),
    "minicache": ("minicache", lambda m: dict(start_layer=0)),
    "elitekv": ("elitekv", lambda m: {}),
    "int2": ("int2", lambda m: dict(residual=8, group_size=8)),
    "int4": ("int4", lambda m: dict(residual=8, group_size=8)),
    "int8": ("int8", lambda m: dict(residual=8, group_size=8)),
    "snapkv-int4": ("snapkv+int4", lambda m: dict(compression_ratio=0.75, window_size=8, residual=8, group_size=8)),
}
VARIANTS = sorted(NO_COMPRESSION)


def test_every_registered_method_is_covered():
    missing = set(compresskv.available_methods()) - {method for method, _ in NO_COMPRESSION.values()}
    assert not missing, f"add a no-compression setting to tests/test_gpu.py for {sorted(missing)}"
    assert {method for method, _ in COMPRESSING.values()} == {method for method, _ in NO_COMPRESSION.values()}


def convert_elitekv(model: torch.nn.Module, full: bool) -> torch.nn.Module:
    """EliteKV conversion in place: every RoPE pair and the full joint rank when ``full`` (exact),
    half the cache otherwise. Uniform pair selection needs no calibration."""
    dims = elitekv.model_dims(model)
    half = dims["head_dim"] // 2
    if full:
        elitekv.convert(model, rope_pairs=half, kv_dim=elitekv.joint_rank(dims, half), selection="uniform",
                        progress=False)
    else:
        elitekv.convert(model, cache_ratio=0.5, selection="uniform", progress=False)
    return model


MakeCache = Callable[[torch.nn.Module], Any]


def method_model(variant: str, base: torch.nn.Module, table: dict, full: bool = True) -> tuple[torch.nn.Module, MakeCache]:
    """``(model to run, make_cache)`` for a variant, from the fp32 CPU ``base``. EliteKV runs on a
    converted copy (``base`` is left as it is); every other method on ``base`` itself."""
    method, options = table[variant]
    if method == "elitekv":
        model = convert_elitekv(copy.deepcopy(base), full)
        return model, lambda m: compresskv.make_cache(m, "elitekv")
    opts = options(base)
    return base, lambda m: compresskv.make_cache(m, method, **opts)


# -- running generate -----------------------------------------------------------------------------
class ForceTokens(LogitsProcessor):
    """Make generate() emit ``tokens`` (``[batch, n]``) whatever the model predicts; the raw logits
    (``output_logits``) are still the model's own, so this is teacher forcing through generate."""

    def __init__(self, tokens: torch.Tensor, prompt_len: int) -> None:
        self.tokens, self.prompt_len = tokens, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        step = input_ids.shape[1] - self.prompt_len
        forced = torch.full_like(scores, float("-inf"))
        return forced.scatter_(1, self.tokens[:, step : step + 1].to(scores.device), 0.0)


@torch.no_grad()
def run(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor, cache: Any,
        force: torch.Tensor | None = None, new_tokens: int = NEW_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy (or forced) generate: ``(new tokens [batch, n], logits [batch, n, vocab] in fp32)``."""
    processors = LogitsProcessorList([ForceTokens(force, ids.shape[1])]) if force is not None else None
    out = model.generate(
        input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=new_tokens,
        min_new_tokens=new_tokens, do_sample=False, output_logits=True, return_dict_in_generate=True,
        pad_token_id=0, logits_processor=processors,
    )
    return out.sequences[:, ids.shape[1]:].cpu(), torch.stack(out.logits, dim=1).float().cpu()


@functools.lru_cache(maxsize=None)
def reference(config: str, attn: str, dtype: str, batch: int, device: str) -> dict[str, Any]:
    """DynamicCache's greedy tokens and logits in ``dtype`` (and the model that made them), and the
    half-precision noise: how far the same model in fp32 is from them on the same (forced) tokens."""
    # flash-attn runs in half precision only: the fp32 noise reference uses sdpa then.
    base = tiny_model("llama", "sdpa" if attn == "flash_attention_2" else attn, **CONFIGS[config])
    ids, mask = batch_inputs(batch, length=PROMPT)
    half = copy.deepcopy(base).to(device, HALF[dtype])
    if attn == "flash_attention_2":
        half.set_attn_implementation("flash_attention_2")
    tokens, logits = run(half, ids.to(device), mask.to(device), DynamicCache(config=half.config))
    full = copy.deepcopy(base).to(device)
    _, logits32 = run(full, ids.to(device), mask.to(device), DynamicCache(config=full.config), force=tokens)
    noise = (logits - logits32).abs().max().item()
    return dict(model=half, ids=ids, mask=mask, tokens=tokens, logits=logits, noise=noise,
                scale=logits.abs().max().item())


def margins(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 logit, ``[batch, steps]``."""
    top2 = logits.topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def check_against_reference(model: torch.nn.Module, make_cache: Callable[[torch.nn.Module], Any],
                            ref: dict[str, Any], dtype: str, device: str) -> dict[str, float]:
    """The checks of the module docstring; returns the measured errors (for reports).

    1. Forced along DynamicCache's greedy tokens, the method's logits are within ``tol``.
    2. Free greedy with the method; DynamicCache forced along the method's tokens (so both see the
       same prefixes even after a legitimate low-margin flip): logits within ``tol`` at every
       step, and each of the method's tokens is DynamicCache's argmax wherever DynamicCache's
       top-2 margin exceeds ``2·tol`` (then no error within ``tol`` can flip it). At least a
       quarter of the steps must be that clear, or the check would say little.
    """
    tol = max(FLOOR[dtype] * ref["scale"], NOISE_FACTOR * ref["noise"])
    ids, mask = ref["ids"].to(device), ref["mask"].to(device)

    _, forced = run(model, ids, mask, make_cache(model), force=ref["tokens"])
    assert torch.isfinite(forced).all()
    err = (forced - ref["logits"]).abs().max().item()
    assert err <= tol, f"teacher-forced logits differ by {err:.3g} > tolerance {tol:.3g} (noise {ref['noise']:.3g})"

    tokens, logits = run(model, ids, mask, make_cache(model))
    _, dyn = run(ref["model"], ids, mask, DynamicCache(config=ref["model"].config), force=tokens)
    free_err = (logits - dyn).abs().max().item()
    assert free_err <= tol, f"greedy logits differ by {free_err:.3g} > tolerance {tol:.3g}"
    clear = margins(dyn) > 2 * tol
    argmax = dyn.argmax(dim=-1)
    bad = (tokens != argmax) & clear
    assert not bad.any(), f"greedy tokens differ from DynamicCache's at clear (row, step) {bad.nonzero().tolist()}"
    checked = clear.float().mean().item()
    assert checked >= 0.25, f"only {checked:.0%} of greedy steps had a top-2 margin above 2x tolerance {tol:.3g}"
    return {"err": err, "free_err": free_err, "tol": tol, "noise": ref["noise"], "checked": checked}


# -- exactness in half precision ---------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("attn", ATTENTIONS)
@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_no_compression_matches_dynamic_cache(variant, config, attn, dtype, batch):
    ref = reference(config, attn, dtype, batch, DEVICE)
    base = tiny_model("llama", attn, **CONFIGS[config])
    model, make_cache = method_model(variant, base, NO_COMPRESSION)
    model = model.to(DEVICE, HALF[dtype])
    check_against_reference(model, make_cache, ref, dtype, DEVICE)


def _has_flash_attn() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(
    not _has_flash_attn(),
    reason="flash-attn is not installed (pip install "
    "'compresskv[flash]' where it builds): the flash_attention_2 exactness tests need it",
)
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("dtype", list(HALF))
@pytest.mark.parametrize("variant", VARIANTS)
def test_flash_attention_2_no_compression_matches_dynamic_cache(variant, dtype, batch):
    config = "llama-gqa"
    ref = reference(config, "flash_attention_2", dtype, batch, DEVICE)
    base = tiny_model("llama", "sdpa", **CONFIGS[config])
    model, make_cache = method_model(variant, base, NO_COMPRESSION)
    model = model.to(DEVICE, HALF[dtype])
    model.set_attn_implementation("flash_attention_2")
    check_against_reference(model, make_cache, ref, dtype, DEVICE)


# -- a model split across devices --------------------------------------------------------------------
def dispatch_split(model: torch.nn.Module, split: int, first: str = "cuda:0", second: str = "cpu",
                   run_second_there: bool = True, force_hooks: bool = False) -> torch.nn.Module:
    """Put the embeddings and decoder layers ``0..split-1`` on ``first`` and the rest (and the head)
    on ``second``, with accelerate's hooks moving activations between them.

    ``run_second_there``: modules mapped to ``second`` also *run* there (``main_device=second``);
    otherwise accelerate's default for a CPU entry applies: its weights are offloaded to the CPU
    and brought to ``first`` to run (what ``from_pretrained(device_map=...)`` does)."""
    from accelerate import dispatch_model

    n = model.config.num_hidden_layers
    device_map: dict[str, Any] = {"model.embed_tokens": first, "model.rotary_emb": first}
    device_map.update({f"model.layers.{i}": first if i < split else second for i in range(n)})
    device_map.update({"model.norm": second, "lm_head": second})
    model = dispatch_model(model, device_map=device_map, main_device=second if run_second_there else first,
                           force_hooks=force_hooks, skip_keys=model._skip_keys_device_placement)
    model.hf_device_map = device_map
    return model


_NOT_OWNED = {"cache", "cache_ref", "policy", "group", "layers"}  # back-references, not held tensors


def held_tensors(obj: Any, depth: int = 0) -> list[tuple[str, torch.Tensor]]:
    """Every tensor an object of compresskv holds (in attributes, lists, dicts and nested compresskv
    objects), with its attribute path."""
    found: list[tuple[str, torch.Tensor]] = []

    def walk(value: Any, path: str, level: int) -> None:
        if isinstance(value, torch.Tensor):
            found.append((path, value))
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, f"{path}[{i}]", level)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, f"{path}[{key!r}]", level)
        elif level < 4 and type(value).__module__.startswith("compresskv") and hasattr(value, "__dict__"):
            for name, item in vars(value).items():
                if name not in _NOT_OWNED:
                    walk(item, f"{path}.{name}", level + 1)

    for name, value in vars(obj).items():
        if name not in _NOT_OWNED:
            walk(value, name, depth)
    return found


def layer_device(model: torch.nn.Module, idx: int) -> torch.device:
    """Where decoder layer ``idx`` runs: its accelerate hook's execution device, else its weights'."""
    layer = model.model.layers[idx]
    hooked = getattr(getattr(layer, "_hf_hook", None), "execution_device", None)
    return torch.device(hooked) if hooked is not None else next(layer.self_attn.parameters()).device


def check_placement(model: torch.nn.Module, cache: Any) -> int:
    """Each cache layer's tensors on its model layer's device; tensors shared by a group of layers
    (xKV latents, MiniCache directions) on the device of one of the group's layers. Returns the
    number of tensors checked."""
    checked = 0
    for idx, layer in enumerate(cache.layers):
        device = layer_device(model, idx)
        for path, tensor in held_tensors(layer):
            assert tensor.device == device, f"layer {idx} ({device}): {path} is on {tensor.device}"
            checked += 1
        group = getattr(layer, "group", None)
        if group is not None:
            allowed = {layer_device(model, i) for i in group.layer_ids}
            for path, tensor in held_tensors(group):
                assert tensor.device in allowed, f"group {group.layer_ids}: {path} is on {tensor.device}, not {allowed}"
                checked += 1
    return checked


def run_split(variant: str, split: int, first: str, second: str, run_second_there: bool = True,
              force_hooks: bool = False) -> None:
    base = tiny_model("llama", "sdpa", kv_heads=2)
    ids, mask = batch_inputs(3, length=SPLIT_PROMPT)
    for table, exact in ((NO_COMPRESSION, True), (COMPRESSING, False)):
        model, make_cache = method_model(variant, copy.deepcopy(base), table, full=exact)
        ref_model = dispatch_split(copy.deepcopy(base), split, first, second, run_second_there, force_hooks)
        model = dispatch_split(model, split, first, second, run_second_there, force_hooks)
        devices = {layer_device(model, i).type for i in range(4)}
        expected = {torch.device(first).type, torch.device(second).type} if run_second_there else {torch.device(first).type}
        assert devices == expected
        inputs = (ids.to(first), mask.to(first))
        ref_tokens, ref_logits = run(ref_model, *inputs, DynamicCache(config=ref_model.config))
        cache = make_cache(model)
        tokens, logits = run(model, *inputs, cache)
        assert torch.isfinite(logits).all()
        assert check_placement(model, cache) > 0
        stats = cache.stats()
        assert stats.tokens_seen == SPLIT_PROMPT + NEW_TOKENS - 1
        if exact:
            assert torch.equal(tokens, ref_tokens), variant
            assert (logits - ref_logits).abs().max().item() <= 1e-3, variant
        else:
            assert stats.ratio < 0.9, f"{variant}: nothing was compressed (ratio {stats.ratio:.3f})"


@pytest.mark.parametrize("split", [2, 1], ids=["layers-0-1-on-gpu", "layer-0-on-gpu"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_model_split_across_gpu_and_cpu(variant, split):
    """fp32, 4 layers, layers ``split..3`` running on the CPU. Split 2 keeps the no-compression
    xKV/MiniCache groups of 2 on one device; split 1 makes a group of 2 span both devices; xKV's
    default group of 4 (the compressing setting) spans both in either case."""
    run_split(variant, split, DEVICE, "cpu")


@pytest.mark.parametrize("variant", VARIANTS)
def test_model_with_cpu_offloaded_layers(variant):
    """accelerate's usual CPU offload (``from_pretrained(device_map=...)`` with CPU entries):
    layers 2..3 keep their weights on the CPU but run on the GPU, so their caches are on the GPU."""
    run_split(variant, 2, DEVICE, "cpu", run_second_there=False)


# -- static, compileable decoding on the device --------------------------------------------------------
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])  # reduce-overhead: CUDA graphs on a GPU
@pytest.mark.parametrize("method", ["snapkv", "pyramidkv"])
def test_compiled_static_decoding_gives_the_eager_tokens(method, mode):
    from transformers import CompileConfig

    model = tiny_model("llama", "sdpa", kv_heads=2).to(DEVICE, torch.bfloat16)
    ids, mask = batch_inputs(3, length=PROMPT)
    ids, mask = ids.to(DEVICE), mask.to(DEVICE)

    def run(decode_tokens, **extra):
        cache = compresskv.make_cache(model, method, compression_ratio=0.5, window_size=8, decode_tokens=decode_tokens)
        return model.generate(input_ids=ids, attention_mask=mask, **kv(cache), max_new_tokens=NEW_TOKENS,
                              min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0, **extra)

    eager = run(None)
    torch._dynamo.reset()
    config = CompileConfig(fullgraph=True, mode=mode)
    config._compile_all_devices = True  # transformers compiles on GPUs by itself; the CPU dry run needs it
    for _ in range(2):  # the second generate replays the compiled step with a new cache
        assert torch.equal(run(NEW_TOKENS, compile_config=config), eager)
