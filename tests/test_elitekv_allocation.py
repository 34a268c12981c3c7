"""EliteKV dimension allocation: the sweep of rope_pairs by held-out perplexity, its artifact, and
patch() choosing the sizes with it."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import compresskv
from compresskv import elitekv
from compresskv.elitekv import allocation as alloc_mod
from compresskv.elitekv.allocation import Allocation, allocation_markdown, split_windows, sweep_range
from conftest import VOCAB, batch_inputs, tiny_model

SEQ = 32


def token_ids(n: int = 6, length: int = SEQ, seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def run(model, **kwargs) -> Allocation:
    kwargs = {"cache_ratio": 0.5, "seq_len": SEQ, "grid": 3, "progress": False, **kwargs}
    return elitekv.allocate(model, token_ids(), **kwargs)


@pytest.fixture(scope="module")
def swept():
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1)
    before = logits(model, ids)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    allocation = run(model)
    return model, ids, before, state, allocation


def test_sweep_has_one_finite_row_per_r_and_chooses_the_argmin(swept):
    model, _, _, _, a = swept
    dims = elitekv.model_dims(model)
    lo, hi = sweep_range(dims, 0.5)
    budget = round(0.5 * 2 * dims["kv_heads"] * dims["head_dim"])
    rs = [row["rope_pairs"] for row in a.table]
    assert rs == sorted(set(rs)) and len(rs) == a.options["conversions"] >= 4
    assert lo in rs and hi in rs and all(lo <= r <= hi for r in rs)
    for row in a.table:
        assert math.isfinite(row["ppl"]) and row["ppl"] > 1
        assert row["kv_dim"] == budget - 2 * row["rope_pairs"] * dims["kv_heads"]
        assert row["ppl"] == pytest.approx(math.exp(row["nll"]))
    best = min(a.table, key=lambda row: row["ppl"])
    assert (a.rope_pairs, a.kv_dim, a.ppl) == (best["rope_pairs"], best["kv_dim"], best["ppl"])
    rule, _ = elitekv.resolve_sizes(dims, cache_ratio=0.5)
    assert a.rule_rope_pairs == rule and rule in rs
    assert math.isfinite(a.reference_ppl)
    # the refinement left the best r's tried neighbours adjacent (or it sits at an end of the range)
    i = rs.index(a.rope_pairs)
    assert i == 0 or rs[i] - rs[i - 1] == 1
    assert i == len(rs) - 1 or rs[i + 1] - rs[i] == 1


def test_the_users_model_is_unchanged(swept):
    model, ids, before, state, _ = swept
    assert not elitekv.is_converted(model) and type(model).__name__ == "LlamaForCausalLM"
    assert "_elitekv_original" not in model.__dict__
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), before)


def test_the_model_is_reverted_when_scoring_fails(monkeypatch):
    model = tiny_model("llama", "sdpa")
    ids, _ = batch_inputs(1)
    before = logits(model, ids)
    calls = []

    def fail(m, windows, dynamic=False):
        calls.append(elitekv.is_converted(m))
        if not dynamic:
            raise RuntimeError("boom")
        return 1.0

    monkeypatch.setattr(alloc_mod, "_heldout_nll", fail)
    with pytest.raises(RuntimeError, match="boom"):
        run(model)
    assert calls == [False, True]  # the reference on the original, then one converted model
    assert not elitekv.is_converted(model) and torch.equal(logits(model, ids), before)


def test_calibration_and_evaluation_windows_are_apart():
    ids = torch.arange(10 * SEQ).view(1, -1) % VOCAB
    calib, held = split_windows(ids, seq_len=SEQ, num_windows=3, eval_windows=2)
    assert calib.shape == (3, SEQ) and held.shape == (2, SEQ)
    assert torch.equal(held, ids.view(-1, SEQ)[-2:]) and torch.equal(calib, ids.view(-1, SEQ)[:3])
    calib, held = split_windows(ids[:, : 2 * SEQ], seq_len=SEQ, num_windows=8, eval_windows=4)
    assert calib.shape[0] == 1 and held.shape[0] == 1  # at most all but one held out
    other = token_ids(3, seed=9)
    calib, held = split_windows(ids, eval_texts=other, seq_len=SEQ, num_windows=2, eval_windows=5)
    assert torch.equal(held, other) and calib.shape[0] == 2


def test_save_and_load_round_trip(swept, tmp_path):
    model, _, _, _, a = swept
    file = a.save_pretrained(tmp_path / "alloc")
    assert file.name == "allocation.json" and json.loads(file.read_text())["kind"] == "elitekv_allocation"
    assert Allocation.from_pretrained(tmp_path / "alloc", model) == a
    assert Allocation.from_pretrained(file) == a
    with pytest.raises(ValueError, match="config hash"):
        Allocation.from_pretrained(tmp_path / "alloc", tiny_model("llama", "sdpa", layers=2))
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(ValueError, match="does not hold an EliteKV allocation"):
        Allocation.from_pretrained(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError, match="no saved allocation"):
        Allocation.from_pretrained(tmp_path / "missing")
    text = allocation_markdown([a])
    assert f"chosen r = {a.rope_pairs}" in text and text.count("\n| ") == len(a.table) + 1


def test_patch_allocates_when_calibration_text_is_given(monkeypatch):
    texts = token_ids(6)
    model = tiny_model("llama", "sdpa")
    # the same allocation, computed by hand on the windows patch splits off
    twin = copy.deepcopy(model)
    calib, held = split_windows(texts, seq_len=SEQ, num_windows=8)
    ranking = elitekv.rank_frequencies(twin, calib, seq_len=SEQ, num_windows=8, progress=False)
    expected = elitekv.allocate(twin, calib, eval_texts=held, cache_ratio=0.5, ranking=ranking, seq_len=SEQ,
                                num_windows=8, progress=False)
    compresskv.patch(model, "elitekv", cache_ratio=0.5, calibration_texts=texts, seq_len=SEQ, progress=False)
    spec = model.config.elitekv
    assert (spec["rope_pairs"], spec["kv_dim"]) == (expected.rope_pairs, expected.kv_dim)
    assert spec["allocation"]["rope_pairs"] == expected.rope_pairs
    assert spec["allocation"]["ppl"] == pytest.approx(expected.ppl)
    # every generate() rebuilds the cache with the same options: the recorded allocation, no new sweep
    monkeypatch.setattr(alloc_mod, "allocate", lambda *a, **k: pytest.fail("allocated again"))
    ids, mask = batch_inputs(2)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    assert isinstance(compresskv.last_cache(model), compresskv.EliteKVCache)
    assert compresskv.last_cache(model).stats().token_ratio == pytest.approx(0.5)
    compresskv.unpatch(model)


def test_patch_reuses_a_given_allocation_and_keeps_the_fixed_rule_on_request(tmp_path, monkeypatch):
    dims = elitekv.model_dims(tiny_model("llama", "sdpa"))
    rule, _ = elitekv.resolve_sizes(dims, cache_ratio=0.5)
    r = rule + 2  # not what the fixed rule gives, so the test tells them apart
    budget = round(0.5 * 2 * dims["kv_heads"] * dims["head_dim"])
    given = Allocation(cache_ratio=0.5, rope_pairs=r, kv_dim=budget - 2 * r * dims["kv_heads"],
                       table=[{"rope_pairs": r, "kv_dim": budget - 2 * r * dims["kv_heads"], "ppl": 9.0, "nll": 2.2}],
                       rule_rope_pairs=rule)
    given.save_pretrained(tmp_path / "a")
    monkeypatch.setattr(alloc_mod, "allocate", lambda *a, **k: pytest.fail("allocated although one was given"))
    texts = token_ids(6)
    for allocation in (given, tmp_path / "a", str(tmp_path / "a")):
        model = tiny_model("llama", "sdpa")
        compresskv.patch(model, "elitekv", allocation=allocation, calibration_texts=texts, seq_len=SEQ, progress=False)
        assert (model.config.elitekv["rope_pairs"], model.config.elitekv["kv_dim"]) == (given.rope_pairs, given.kv_dim)
        assert model.config.elitekv["cache_ratio"] == pytest.approx(0.5)
    model = tiny_model("llama", "sdpa")
    compresskv.patch(model, "elitekv", cache_ratio=0.5, allocation=False, calibration_texts=texts, seq_len=SEQ,
                     progress=False)
    assert model.config.elitekv["rope_pairs"] == rule and "allocation" not in model.config.elitekv
    # without calibration text there is nothing to measure on: the fixed rule, as before
    model = tiny_model("llama", "sdpa")
    compresskv.patch(model, "elitekv", cache_ratio=0.5, selection="uniform", progress=False)
    assert model.config.elitekv["rope_pairs"] == rule
    fresh = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="allocation= was measured at cache_ratio=0.5"):
        compresskv.patch(fresh, "elitekv", cache_ratio=0.25, allocation=given, selection="uniform")
    with pytest.raises(ValueError, match="allocation= or rope_pairs="):
        compresskv.patch(fresh, "elitekv", rope_pairs=2, allocation=given, selection="uniform")
    with pytest.raises(ValueError, match="allocation must be"):
        compresskv.patch(fresh, "elitekv", cache_ratio=0.5, allocation=3, selection="uniform")
    assert not elitekv.is_converted(fresh)


def test_patch_says_how_to_skip_allocation_when_the_text_is_too_short():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="allocation=False"):
        compresskv.patch(model, "elitekv", cache_ratio=0.5, calibration_texts=token_ids(1), seq_len=SEQ, progress=False)
    assert not elitekv.is_converted(model)
    compresskv.patch(model, "elitekv", cache_ratio=0.5, calibration_texts=token_ids(1), seq_len=SEQ, allocation=False,
                     progress=False)
    assert elitekv.is_converted(model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"cache_ratio": 0}, "cache_ratio must be a number in \\(0, 1\\]"),
        ({"cache_ratio": 1.5}, "cache_ratio must be a number in \\(0, 1\\]"),
        ({"cache_ratio": True}, "cache_ratio must be"),
        ({"cache_ratio": 0.01}, "cache_ratio=0.01 leaves"),
        ({"grid": 1}, "grid must be an int >= 2"),
        ({"seq_len": 2}, "seq_len must be an int >= 4"),
        ({"eval_windows": 0}, "eval_windows must be an int >= 1"),
        ({"selection": "best"}, "selection must be one of"),
        ({"svd": "exact"}, "svd must be one of"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(kwargs, match):
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match=match):
        run(model, **kwargs)
    assert not elitekv.is_converted(model)


def test_bad_texts_are_refused_naming_the_parameter():
    model = tiny_model("llama", "sdpa")
    with pytest.raises(ValueError, match="tokenizer="):
        elitekv.allocate(model, "some text", cache_ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="texts: no calibration text"):
        elitekv.allocate(model, [], cache_ratio=0.5, progress=False)
    with pytest.raises(ValueError, match="texts: calibration text too short"):
        elitekv.allocate(model, token_ids(1), cache_ratio=0.5, seq_len=SEQ, progress=False)
    converted = elitekv.convert(tiny_model("llama", "sdpa"), cache_ratio=0.5, selection="uniform", progress=False)
    with pytest.raises(ValueError, match="already EliteKV-converted"):
        elitekv.allocate(converted, token_ids(), cache_ratio=0.5, seq_len=SEQ, progress=False)


def test_the_plot_marks_each_ratio(swept, tmp_path):
    pytest.importorskip("matplotlib")
    from compresskv.eval.plots import plot_allocation

    _, _, _, _, a = swept
    other = copy.deepcopy(a)
    other.cache_ratio = 0.25
    path = plot_allocation([a.to_dict(), other.to_dict()], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
