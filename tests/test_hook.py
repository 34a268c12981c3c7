"""compresskv's attention hook finds a compressed layer by the attention module's ``layer_idx``,
not by the identity of the key tensor the cache returned (issue #13)."""

import ast
from pathlib import Path

import pytest
import torch

import compresskv
from conftest import batch_inputs, greedy, tiny_model

SRC = Path(compresskv.__file__).resolve().parent


def _copying_update(cache):
    """Make ``cache.update`` hand the attention copies of what it returns, as a model whose
    attention casts, makes contiguous or expands the cached tensors does: the attention function
    then never sees the very tensors the cache layer returned."""
    update = cache.update

    def copying(*args, **kwargs):
        keys, values = update(*args, **kwargs)
        return keys.clone(), values.clone()

    cache.update = copying
    return cache


METHODS = {
    "snapkv": lambda m: compresskv.SnapKVCache(m, budget=16, window_size=4),
    "pyramidkv": lambda m: compresskv.PyramidKVCache(m, budget=16, window_size=4),
    "xkv": lambda m: compresskv.XKVCache(m, group_size=2, rank_k=6, rank_v=10),
}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("method", sorted(METHODS))
def test_attention_that_copies_the_keys_still_compresses(method, attn):
    model = tiny_model("llama", attn)
    ids, mask = batch_inputs(3)
    plain = METHODS[method](model)
    want = greedy(model, ids, mask, plain)
    copying = _copying_update(METHODS[method](model))
    got = greedy(model, ids, mask, copying)
    assert torch.equal(want[0], got[0])
    assert torch.equal(want[1], got[1])
    assert copying.stats().tokens_stored == plain.stats().tokens_stored
    assert copying.nbytes() == plain.nbytes() < copying.uncompressed_nbytes()  # compressed, not run uncompressed


def test_pending_layer_is_taken_by_its_layer_idx_only():
    hook = compresskv.core.attention
    layer, module = compresskv.core.cache.KVLayer(), torch.nn.Module()
    try:
        hook.mark_pending(1, layer)
        module.layer_idx = 2
        assert hook._take_pending(module) is None  # another layer's attention
        module.layer_idx = 1
        assert hook._take_pending(module) is layer
        assert hook._take_pending(module) is None  # taken once
        hook.mark_pending(1, layer)
        module.layer_idx = 2
        hook._take_pending(module)
        # Layer 1 was updated but its attention never ran through the hook: the next update says so.
        with pytest.raises(RuntimeError, match="attention never ran through compresskv"):
            hook.mark_pending(2, layer)
        hook.mark_pending(2, layer)  # the error forgot it
    finally:
        hook.clear_pending()


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_hook_does_not_import_the_caches():
    """The cache modules import the hook; the hook knows a layer only by a Protocol."""
    hook = _imports(SRC / "core" / "attention.py")
    assert not [name for name in hook if "cache" in name], hook
    assert any(name.endswith("attention") for name in _imports(SRC / "core" / "cache.py"))
