"""``compresskv demo`` (the README's main job, #18): several needle questions per method, a table
whose columns say what they are, and a conclusion drawn from the measured runs."""

from __future__ import annotations

import pytest

import compresskv
from compresskv import cli
from compresskv.eval.demo import DEFAULT_METHODS, FULL, DemoRun, conclusion, demo_runs, format_table
from compresskv.eval.methods import CALIBRATED, DEFAULT_SETTINGS, takes_ratio
from conftest import tiny_model
from tiny_tokenizer import tiny_tokenizer

LENGTH = 640


class _Task:
    def __init__(self, depth: float, length: int = 4000) -> None:
        self.info = {"depths": [depth]}
        self.length = length


def _run(method, ratio, found, mib, tok_s, asked=3, error=None):
    run = DemoRun(method, ratio, found=found, asked=asked, error=error)
    if not error:
        run.cache_bytes = [int(mib * 2**20)] * asked
        run.prefill_s = [1.0] * asked
        run.decode_tok_s = [tok_s] * asked
    return run


def test_every_method_answers_every_question_and_the_model_is_given_back(monkeypatch):
    """Every registered method runs every seed's question, at each ratio (minicache once, at its
    defaults), the calibrated ones on the bundled novel: no method is skipped for want of text."""
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), layers=4)  # MiniCache's default range needs a layer pair
    methods = compresskv.available_methods()
    runs, tasks = demo_runs(model, tok, methods, [0.5, 0.875], length=LENGTH, seeds=(0, 1), log=lambda m: None,
                            progress=False)
    assert runs[0].method == FULL and len(tasks) == 2 and {t.seed for t in tasks} == {0, 1}
    got = {(r.method, r.ratio) for r in runs}
    for method in methods:
        if not takes_ratio(method):  # minicache, int4, int8: once, at their defaults
            assert (method, DEFAULT_SETTINGS) in got
        else:
            assert {(method, 0.5), (method, 0.875)} <= got, method
    assert set(CALIBRATED) <= {m for m, _ in got}
    for run in runs:
        assert run.error is None and run.asked == 2 and len(run.cache_bytes) == 2, (run.method, run.error)
    by = {(r.method, r.ratio): r.mean_bytes for r in runs}
    for method in ("snapkv", "xkv", "pca"):
        assert by[(method, 0.875)] < by[(method, 0.5)] < runs[0].mean_bytes
    assert not model.config._attn_implementation.startswith("compresskv_")  # the model is given back as loaded
    table = format_table(runs)
    assert len([line for line in table.splitlines() if line.startswith(("DynamicCache", *methods))]) == len(runs)


def test_a_method_that_fails_is_reported_not_fatal(monkeypatch):
    tok = tiny_tokenizer()
    model = tiny_model("llama", vocab_size=len(tok), layers=2)

    def broken(model, compression_ratio=0.5):
        raise RuntimeError("no such luck")

    monkeypatch.setitem(compresskv.patching._METHODS, "broken", broken)
    runs, tasks = demo_runs(model, tok, ["snapkv", "broken"], [0.5], length=LENGTH, seeds=(0,), log=lambda m: None,
                            progress=False)
    assert [r.method for r in runs] == [FULL, "snapkv"]  # not buildable: skipped before the runs, with a note


def test_the_conclusion_names_the_cache_that_kept_every_needle_at_the_fewest_bytes():
    runs = [
        _run(FULL, None, 3, 180.0, 10.0),
        _run("snapkv", 0.5, 3, 90.0, 18.0), _run("snapkv", 0.875, 3, 22.5, 22.0),
        _run("xkv", 0.875, 3, 22.4, 7.0),  # within 2% of snapkv's bytes but slower: a tie, not the lead
        _run("streamingllm", 0.5, 1, 90.0, 19.0),
        _run("pca", 0.5, 0, 91.4, 15.0),
        _run("svd", 0.5, 0, 0, 0, error="RuntimeError: boom"),
    ]
    text = conclusion(runs, [_Task(0.2), _Task(0.5), _Task(0.9)])
    assert text.startswith("Over 3 needle questions of ~4000 tokens (needles at depths 20%, 50%, 90%)")
    assert "found 3/3" in text
    assert "snapkv (and xkv) kept all 3 at compression ratio 0.875: 12.5% of the cache bytes" in text
    assert "157.5 MiB saved" in text and "8.0x more" in text and "2.20x DynamicCache's speed" in text
    assert "Lost needles: streamingllm (1/3 at 0.5); pca (0/3 at 0.5)." in text
    assert "Failed to run: svd." in text
    table = format_table(runs)
    assert "failed: RuntimeError: boom" in table and "12.5%" in table and "2.20x" in table


def test_the_conclusion_when_nothing_or_only_the_full_cache_finds_the_needles():
    tasks = [_Task(0.5)]
    none = conclusion([_run(FULL, None, 0, 10, 1, asked=1), _run("snapkv", 0.5, 0, 5, 1, asked=1)], tasks)
    assert "The model itself misses these needles" in none
    lost = conclusion([_run(FULL, None, 1, 10, 1, asked=1), _run("snapkv", 0.5, 0, 5, 1, asked=1)], tasks)
    assert "No compressed cache kept every needle" in lost and "snapkv (0/1 at 0.5)" in lost


def test_demo_defaults_and_options():
    args = cli.build_parser().parse_args(["demo"])
    assert args.methods == list(DEFAULT_METHODS) and args.seeds == [0, 1, 2] and args.calibration is None
    assert any(m in CALIBRATED for m in args.methods)  # the first command shows a calibrated method too
    assert cli.build_parser().parse_args(["demo", "--methods", "all"]).methods == compresskv.available_methods()


@pytest.mark.slow
def test_demo_command_on_the_embedded_model(capsys):
    """The README's first command, on short prompts: the default methods, a table and a conclusion."""
    assert cli.main(["demo", "--length", "600", "--ratios", "0.5", "--seeds", "0,1"]) == 0
    out = capsys.readouterr().out
    for method in DEFAULT_METHODS:
        assert f"\n{method} " in out, method
    last = out.strip().splitlines()[-1]
    assert last.startswith("Over 2 needle questions") and "DynamicCache" in last and "found 2/2" in last
