"""lm-evaluation-harness with a compressed cache (compresskv.eval.harness): the ``compresskv`` model
answers loglikelihood, loglikelihood_rolling and generate_until requests, through
``lm_eval.simple_evaluate`` and ``compresskv lm-eval`` on the tiny local tasks of
tests/data/lm_eval_tasks (nothing is downloaded)."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install 'compresskv[lm-eval]')")

from lm_eval.tasks import TaskManager  # noqa: E402

from compresskv import cli  # noqa: E402
from compresskv.eval.harness import CompressKVLM  # noqa: E402

TASKS_DIR = Path(__file__).resolve().parent / "data" / "lm_eval_tasks"
STORY = ("Anne lived in Bath with her family. The garden was well kept, with roses along the wall. "
         "Her aunt wrote often. Her favourite colour was green. Dinner was served at six. ") * 3


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """The task YAMLs with their data paths made absolute (they are relative to the repository root)."""
    out = tmp_path_factory.mktemp("lm_eval_tasks")
    for yaml in TASKS_DIR.glob("*.yaml"):
        (out / yaml.name).write_text(yaml.read_text().replace("tests/data/lm_eval_tasks/", f"{TASKS_DIR}/"))
    return out


def request(*args):
    return types.SimpleNamespace(args=args)


def lm_for(model, tok, method=None, max_length=1024, rolling_context=None, **options):
    return CompressKVLM(model=model, tokenizer=tok, method=method, max_length=max_length,
                        rolling_context=rolling_context, **options)


def plain_logprob(model, ctx: list[int], cont: list[int]) -> float:
    """log P(cont | ctx) from one forward of ctx + cont, no cache."""
    ids = torch.tensor([ctx + cont])
    with torch.no_grad():
        logp = F.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    rows = logp[len(ctx) - 1 : len(ctx) + len(cont) - 1]
    return float(rows.gather(-1, torch.tensor(cont)[:, None]).sum())


def test_loglikelihood_full_matches_a_plain_forward_and_the_method_changes_it(model, tok):
    full, snap = lm_for(model, tok), lm_for(model, tok, "snapkv", compression_ratio=0.5)
    ctx_text, cont_text = STORY + "Question: What was Anne's favourite colour?\nAnswer:", " green"
    ctx, cont = full._encode_pair(ctx_text, cont_text)
    assert 100 < len(ctx) + len(cont) < 1024 and cont  # long enough for SnapKV to evict (window 32), not cut
    (lp_full, _), = full.loglikelihood([request(ctx_text, cont_text)])
    assert lp_full == pytest.approx(plain_logprob(model, ctx, cont), abs=1e-3)
    (lp_snap, _), = snap.loglikelihood([request(ctx_text, cont_text)])
    assert abs(lp_snap - lp_full) > 1e-4
    none = lm_for(model, tok, "snapkv", compression_ratio=0.0)  # nothing evicted: the full cache's answer
    assert none.loglikelihood([request(ctx_text, cont_text)])[0][0] == pytest.approx(lp_full, abs=1e-3)
    info = snap.get_model_info()["compresskv"]
    assert info["method"] == "snapkv" and info["caches"] == 1
    assert info["mean_tokens_stored"] < info["mean_tokens_seen"]


def test_pair_encoding_moves_trailing_spaces_and_an_empty_context_gets_the_prefix_token(model, tok):
    lm = lm_for(model, tok)
    ctx, cont = lm._encode_pair("Answer: ", "green")
    assert ctx == lm._encode("Answer:") and ctx + cont == lm._encode("Answer: green")
    assert lm._encode_pair("", "green") == ([lm.prefix_token_id], lm._encode("green"))


def test_rolling_windows_score_every_token_once_after_their_context(model, tok):
    lm = lm_for(model, tok, max_length=128, rolling_context=64)  # pieces of 64 tokens
    tokens = list(range(3, 3 + 150))
    windows = lm.rolling_windows(tokens)
    assert [t for _, piece in windows for t in piece] == tokens
    assert windows[0][0] == [lm.prefix_token_id]
    for (ctx, piece), start in zip(windows[1:], range(64, 150, 64)):
        assert ctx == tokens[start - 64 : start] and piece[0] == tokens[start]
    # the full cache's rolling log-likelihood is the sum of its windows' plain log-likelihoods
    text = STORY
    expected = sum(plain_logprob(model, c, p) for c, p in lm.rolling_windows(lm._encode(text)))
    assert lm.loglikelihood_rolling([request(text)])[0] == pytest.approx(expected, abs=1e-2)


def test_generate_until_stops_and_matches_greedy_generation(model, tok):
    lm = lm_for(model, tok)
    ctx = STORY + "Question: Where did Anne live?\nAnswer:"
    ids = torch.tensor([lm._encode(ctx)])
    ref = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                         pad_token_id=0)
    ref_text = tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    (text,) = lm.generate_until([request(ctx, {"until": [], "max_gen_toks": 6})])
    assert text == ref_text
    stop = ref_text[2:4] if len(ref_text) >= 4 else ref_text[:1]
    (cut,) = lm.generate_until([request(ctx, {"until": [stop], "max_gen_toks": 6})])
    assert stop not in cut and ref_text.startswith(cut)
    snap = lm_for(model, tok, "snapkv", compression_ratio=0.5)
    snap.generate_until([request(ctx, {"until": ["\n"], "max_gen_toks": 4})])
    info = snap.get_model_info()["compresskv"]
    assert info["caches"] == 1 and info["mean_tokens_stored"] < info["mean_tokens_seen"]


def test_simple_evaluate_runs_the_three_request_types(model, tok, task_dir):
    results = {}
    for method in (None, "snapkv"):
        args = {"model": model, "tokenizer": tok, "max_length": 128, "rolling_context": 64}
        if method:
            args.update(method=method, compression_ratio=0.5)
        results[method] = lm_eval.simple_evaluate(
            model="compresskv", model_args=args, tasks=["ckv_mc", "ckv_gen", "ckv_ppl"],
            task_manager=TaskManager(include_path=str(task_dir)), limit=2,
        )
    for out in results.values():
        assert 0.0 <= out["results"]["ckv_mc"]["acc,none"] <= 1.0
        assert 0.0 <= out["results"]["ckv_gen"]["exact_match,strip"] <= 1.0
        assert out["results"]["ckv_ppl"]["word_perplexity,none"] > 1.0
    full, snap = results[None]["config"]["compresskv"], results["snapkv"]["config"]["compresskv"]
    assert full["method"] == "full" and full["mean_tokens_stored"] is None  # DynamicCache: no compression stats
    assert snap["method"] == "snapkv" and snap["options"] == {"compression_ratio": 0.5}
    assert snap["caches"] == full["caches"] > 0  # one cache per request, the same requests
    assert snap["mean_tokens_stored"] < snap["mean_tokens_seen"]
    # the compressed context changed the perplexity
    assert results["snapkv"]["results"]["ckv_ppl"]["word_perplexity,none"] != pytest.approx(
        results[None]["results"]["ckv_ppl"]["word_perplexity,none"])


def test_cli_runs_lm_eval_with_the_model_registered(model, tok, task_dir, tmp_path, capsys):
    saved = tmp_path / "tiny"
    model.save_pretrained(saved)
    tok.save_pretrained(saved)
    argv = ["lm-eval", "--model", "compresskv", "--model_args",
            f"pretrained={saved},method=snapkv,compression_ratio=0.5,max_length=128",
            "--tasks", "ckv_mc", "--include_path", str(task_dir), "--limit", "2", "--device", "cpu"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "ckv_mc" in out and "acc" in out
    with pytest.raises(TypeError, match="does not take"):
        CompressKVLM(model=model, tokenizer=tok, method="snapkv", nosuch=1)
    with pytest.raises(ValueError, match="need a method"):
        CompressKVLM(model=model, tokenizer=tok, compression_ratio=0.5)
