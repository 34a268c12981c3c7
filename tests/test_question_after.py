"""Asking the question after the context was compressed (#17, part 1): tasks know where their
question starts, run_task prefills the context alone and appends the question uncompressed, and
``compresskv bench --question-after`` runs both modes in one run."""

from __future__ import annotations

import json

import pytest

import compresskv
from compresskv import cli
from compresskv.eval import measure
from compresskv.eval.bench import FULL, BenchConfig, read_rows, run_bench
from compresskv.eval.tasks import available_tasks, make_task

LENGTH = 640


@pytest.mark.parametrize("name", available_tasks())
def test_a_task_says_where_its_question_starts(tok, name):
    task = make_task(name, tok, LENGTH, seed=1)
    k = task.context_length
    assert 0 < k < task.length - 5
    asked = tok.decode(task.input_ids[0, k:])
    assert asked.lstrip().startswith(("What", "Question:")), asked[:40]
    # what the offsets were taken from is the prompt itself: the same tokens, cut in two
    text = tok.decode(task.input_ids[0])
    assert tok(text, add_special_tokens=False)["input_ids"] == task.input_ids[0].tolist()


def test_asking_after_the_context_with_a_full_cache_changes_nothing(model, tok):
    task = make_task("niah_single", tok, LENGTH, seed=0)
    inside = measure.run_task(model, tok, task)
    after = measure.run_task(model, tok, task, question_after=True)
    assert after["answer"] == inside["answer"] and after["score"] == inside["score"]


def test_asking_after_compresses_the_context_alone_and_appends_the_question(model, tok):
    task = make_task("niah_single", tok, LENGTH, seed=0)
    cache = compresskv.SnapKVCache(model, budget=64, window_size=8)
    result = measure.run_task(model, tok, task, cache, question_after=True)
    question = task.length - task.context_length
    steps = task.max_new_tokens - 1  # the last generated token is not fed back
    assert cache.stats().tokens_stored == [64 + question + steps] * 2
    assert result["tokens"] == task.length
    inside = compresskv.SnapKVCache(model, budget=64, window_size=8)
    measure.run_task(model, tok, task, inside)
    assert inside.stats().tokens_stored == [64 + steps] * 2  # the question was inside the compressed prompt


def test_bench_runs_both_modes_in_one_run(model, tok, tmp_path, monkeypatch, capsys):
    cfg = BenchConfig(methods=["snapkv"], ratios=[0.5], tasks=["niah_single", "niah_single:after"], length=LENGTH,
                      seeds=[0], out=tmp_path / "b" / "bench", model="tiny")
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    rows = read_rows(result["paths"][0])
    assert {(r["task"], r["method"]) for r in rows} == {(t, m) for t in ("niah_single", "niah_single:after")
                                                        for m in (FULL, "snapkv")}
    assert all("error" not in r for r in rows)
    assert "niah_single:after" in result["paths"][1].read_text()
    with pytest.raises(ValueError, match="unknown tasks"):
        run_bench(model, tok, BenchConfig(methods=["snapkv"], ratios=[0.5], tasks=["qa:after"], out=tmp_path / "x"),
                  progress=False)
    # the command: --question-after adds the :after variant of every task
    monkeypatch.setattr(compresskv, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "cli" / "bench"
    assert cli.main(["bench", "--methods", "snapkv", "--ratios", "0.5", "--tasks", "niah_single", "--question-after",
                     "--length", str(LENGTH), "--out", str(out), "--threads", "2"]) == 0
    tasks = {json.loads(line)["task"] for line in out.with_suffix(".jsonl").read_text().splitlines()}
    assert tasks == {"niah_single", "niah_single:after"}
    capsys.readouterr()
