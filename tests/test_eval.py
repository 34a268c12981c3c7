"""compresskv.eval: generated tasks (length, needles, scorers), perplexity, memory and speed."""

from __future__ import annotations

import sys
import types

import pytest
import torch
import torch.nn.functional as F

import compresskv
from compresskv.eval import (
    NeedleTask,
    PeakMemory,
    available_tasks,
    load_text,
    make_needle_task,
    make_perplexity_task,
    make_task,
    run_perplexity,
    run_task,
    score_all,
)
from compresskv.eval.tasks import Haystack, fit_length
from tiny_tokenizer import prose

TASKS = available_tasks()


def correct_answer(task) -> str:
    return "The answers are: " + ", ".join(task.answers) + "."


def wrong_answer(task) -> str:
    if task.name == "cwe":
        words = [w for w in compresskv.eval.tasks.VOCABULARY if w not in task.answers][:10]
        return ", ".join(words)
    if task.name == "vt":
        return "AAAAA, BBBBB, CCCCC, DDDDD, EEEEE"
    return ", ".join(str(int(a) + 1) for a in task.answers)  # off by one: not the needle


# -- generation: length, needles, reproducibility --------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
@pytest.mark.parametrize("length", [700, 1500])
def test_prompt_has_the_asked_length_and_each_needle_once(tok, name, length):
    for seed in (0, 1):
        task = make_task(name, tok, length, seed=seed)
        assert abs(task.length - length) <= 0.02 * length, (task.length, length)
        text = tok.decode(task.input_ids[0])
        for needle in task.needles:
            assert text.count(needle) == 1, needle
        assert task.target_length == length and task.name == name and task.seed == seed
        assert text.rstrip().endswith(("is", "are", "are:", "they are:"))  # the answer prefix ends the prompt


@pytest.mark.parametrize("name", [t for t in TASKS if t != "cwe"])
def test_needles_in_a_real_text_haystack(tok, name):
    hay = prose()
    task = make_task(name, tok, 900, seed=2, haystack=hay)
    text = tok.decode(task.input_ids[0])
    assert abs(task.length - 900) <= 18
    for needle in task.needles:
        assert text.count(needle) == 1
        before = text.split(needle)[0].rstrip()
        assert before.endswith((".", "!", "?", "afterwards.", "text.")), before[-40:]  # placed at a sentence end
    for answer in task.answers:
        assert answer not in hay


def test_tasks_are_reproducible_from_their_seed(tok):
    for name in TASKS:
        a, b, c = (make_task(name, tok, 800, seed=s) for s in (5, 5, 6))
        assert torch.equal(a.input_ids, b.input_ids) and a.answers == b.answers
        assert a.answers != c.answers


def test_what_each_task_hides(tok):
    single = make_task("niah_single", tok, 800, seed=0)
    assert len(single.needles) == 1 and len(single.answers) == 1 and single.answers[0] in single.needles[0]
    mk = make_task("niah_multikey", tok, 800, seed=0)
    assert len(mk.needles) == 4 and len(mk.answers) == 1
    assert sum(mk.answers[0] in n for n in mk.needles) == 1 and mk.info["asked"][0] in tok.decode(mk.input_ids[0][-40:])
    mv = make_task("niah_multivalue", tok, 800, seed=0)
    assert len(set(n.split(" is:")[0] for n in mv.needles)) == 1 and len(mv.answers) == 4
    mq = make_task("niah_multiquery", tok, 800, seed=0)
    assert len(set(n.split(" is:")[0] for n in mq.needles)) == 4 and len(mq.answers) == 4
    v = make_task("vt", tok, 800, seed=0)
    value = v.info["value"]
    assert v.needles[0] == f"VAR {v.answers[0]} = {value}." and len(v.answers) == 5
    assert all(f"VAR {b} = VAR {a}." in v.needles for a, b in zip(v.answers, v.answers[1:]))
    text = tok.decode(v.input_ids[0])
    assert [text.index(n) for n in v.needles] == sorted(text.index(n) for n in v.needles)  # chain in order


def test_cwe_frequencies(tok):
    import re

    task = make_task("cwe", tok, 1500, seed=0)
    text = tok.decode(task.input_ids[0])
    listing = re.findall(r"\d+\. ([a-z]+)", text)
    counts = {w: listing.count(w) for w in set(listing)}
    assert all(counts[w] == task.info["freq_common"] for w in task.answers)
    rare = [c for w, c in counts.items() if w not in task.answers]
    assert rare and all(c == task.info["freq_rare"] for c in rare)
    assert task.info["freq_common"] > task.info["freq_rare"]


def test_too_short_a_length_is_refused(tok):
    with pytest.raises(ValueError, match="without any filler"):
        make_task("niah_multiquery", tok, 100)
    with pytest.raises(ValueError, match="unknown task"):
        make_task("qa", tok, 800)
    with pytest.raises(ValueError, match="too short"):
        Haystack("only a few words here")
    with pytest.raises(ValueError, match="within 2%"):
        fit_length(tok, lambda n: ("x " + "word " * (1000 * n), ""), 500, max_units=4)  # far too coarse


# -- scorers ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TASKS)
def test_scorer_right_on_a_hand_made_answer_and_wrong_on_a_wrong_one(tok, name):
    task = make_task(name, tok, 800, seed=3)
    assert task.score(correct_answer(task)) == 1.0
    assert task.score(wrong_answer(task)) == 0.0
    assert task.score("") == 0.0
    if len(task.answers) > 1:  # partial credit, RULER's string_match_all
        half = task.answers[: len(task.answers) // 2]
        assert task.score(" ".join(half)) == pytest.approx(len(half) / len(task.answers))


def test_score_all_matches_whole_words_case_insensitively():
    assert score_all("the number is 1234567.", ["1234567"]) == 1.0
    assert score_all("the number is 12345678", ["1234567"]) == 0.0
    assert score_all("x1234567", ["1234567"]) == 0.0
    assert score_all("Apple, PEAR", ["apple", "pear", "plum"]) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        score_all("anything", [])


def test_needle_task_keeps_its_interface(tok):
    task = make_needle_task(tok, length=600, depth=0.3, seed=1)
    assert isinstance(task, NeedleTask) and task.depth == 0.3
    assert task.score(f"It is {task.answer[:3]},{task.answer[3:]}") and not task.score("1")


# -- running: answers, bytes, memory, speed ----------------------------------------------------------
def test_run_task_measures_against_dynamic_cache(model, tok):
    task = make_task("niah_single", tok, 700, seed=0)
    full = run_task(model, tok, task)
    snap = run_task(model, tok, task, compresskv.SnapKVCache(model, compression_ratio=0.5))
    compresskv.unpatch(model)
    for row in (full, snap):
        assert set(row) >= {"answer", "score", "prefill_s", "decode_tok_s", "cache_bytes_prefill", "cache_bytes",
                            "peak_prefill_bytes", "peak_decode_bytes", "tokens"}
        assert 0.0 <= row["score"] <= 1.0 and row["prefill_s"] > 0 and row["decode_tok_s"] > 0
    n_kv, head_dim, layers = 2, 16, 2
    assert full["cache_bytes_prefill"] == task.length * layers * 2 * n_kv * head_dim * 4
    assert full["cache_bytes"] == (task.length + task.max_new_tokens - 1) * layers * 2 * n_kv * head_dim * 4
    assert abs(snap["cache_bytes_prefill"] / full["cache_bytes_prefill"] - 0.5) < 0.01


def test_peak_memory_sees_a_large_allocation():
    mem = PeakMemory("cpu").start()
    if mem.start_bytes is None:
        pytest.skip("no /proc/self/status here")
    with mem.phase() as big:
        x = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
        x += 1
    del x
    with mem.phase() as small:
        y = torch.ones(1024)
        y += 1
    if big.peak_bytes is None:
        pytest.skip("the peak RSS counter cannot be reset here")
    assert big.peak_bytes >= 60 * 2**20
    assert small.peak_bytes < 32 * 2**20


# -- perplexity ---------------------------------------------------------------------------------------
def test_perplexity_equals_a_plain_forward_and_survives_chunking(model, tok):
    task = make_perplexity_task(tok, prose(300), length=300, continuation=64, seed=1)
    assert task.length == 300 and task.continuation.shape[-1] == 64
    ids = torch.cat([task.prefix, task.continuation], dim=-1)
    with torch.no_grad():
        logits = model(ids).logits[0, 299:-1].float()
    ref = F.cross_entropy(logits, task.continuation[0]).item()
    full = run_perplexity(model, task)
    assert full["nll"] == pytest.approx(ref, abs=1e-4)
    assert full["cache_bytes_prefill"] < full["cache_bytes"]
    # A cache that evicts nothing gives DynamicCache's perplexity; chunking does not change a result.
    none = run_perplexity(model, task, compresskv.SnapKVCache(model, compression_ratio=0.0), chunk_size=16)
    assert none["nll"] == pytest.approx(ref, abs=1e-4)
    a = run_perplexity(model, task, compresskv.SnapKVCache(model, compression_ratio=0.5), chunk_size=64)
    b = run_perplexity(model, task, compresskv.SnapKVCache(model, compression_ratio=0.5), chunk_size=1)
    compresskv.unpatch(model)
    assert a["nll"] == pytest.approx(b["nll"], abs=1e-4)
    assert a["cache_bytes_prefill"] < 0.6 * full["cache_bytes_prefill"]


def test_perplexity_windows_are_seeded_and_checked(tok):
    text = prose(300)
    a, b, c = (make_perplexity_task(tok, text, 200, 32, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.prefix, b.prefix) and a.start != c.start
    with pytest.raises(ValueError, match="fewer than"):
        make_perplexity_task(tok, "too short", 200, 32)


def test_load_text_from_a_file_and_a_dataset(tmp_path, monkeypatch):
    path = tmp_path / "t.txt"
    path.write_text("Some real text.")
    assert load_text(path) == "Some real text."
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "missing.txt")
    calls = {}

    def load_dataset(name, config, split, streaming):
        calls.update(name=name, config=config, split=split, streaming=streaming)
        return iter([{"text": "first"}, {"text": ""}, {"text": "second"}, {"text": "third"}])

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    assert load_text("hf:wikitext:wikitext-2-raw-v1:test", min_chars=8) == "first\n\nsecond"
    assert calls == {"name": "wikitext", "config": "wikitext-2-raw-v1", "split": "test", "streaming": True}
    assert load_text("hf:pg19") == "first\n\nsecond\n\nthird"


# -- the embedded model's tokenizer at 4k (fast: no weights are loaded) -------------------------------
@pytest.mark.slow
def test_tasks_at_4k_with_the_embedded_tokenizer():
    from transformers import AutoTokenizer

    from compresskv.models import model_path

    tokenizer = AutoTokenizer.from_pretrained(model_path())
    for name in TASKS:
        task = make_task(name, tokenizer, 4096, seed=0)
        assert abs(task.length - 4096) <= 0.02 * 4096, (name, task.length)
        text = tokenizer.decode(task.input_ids[0])
        assert text.startswith("<|im_start|>system")  # the chat template was applied
        for needle in task.needles:
            assert text.count(needle) == 1
