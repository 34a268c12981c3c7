"""``compresskv bench``: plan, resumable JSON lines, table, plot, skipped methods, the CLI."""

from __future__ import annotations

import json

import pytest
import torch

import compresskv
import compresskv.eval.bench as bench_mod
from compresskv import cli
from compresskv.eval.bench import FULL, BenchConfig, aggregate, read_rows, run_bench, table_markdown
from conftest import tiny_model
from tiny_tokenizer import prose

LENGTH = 640


@pytest.fixture
def budget_only(monkeypatch):
    """A registered method without compression_ratio (run once at its defaults), and one that
    cannot be built at all."""

    def factory(model, budget=64):
        return compresskv.SnapKVCache(model, budget=budget, window_size=8)

    def broken(model, compression_ratio=0.5):
        raise RuntimeError("no such luck")

    monkeypatch.setitem(compresskv.patching._METHODS, "budgetonly", factory)
    monkeypatch.setitem(compresskv.patching._METHODS, "broken", broken)


def config(tmp_path, **kw):
    base = dict(methods=["snapkv", "streamingllm"], ratios=[0.5, 0.75], tasks=["niah_single", "vt"],
                length=LENGTH, seeds=[0], out=tmp_path / "res" / "bench", model="tiny")
    base.update(kw)
    return BenchConfig(**base)


def test_bench_writes_rows_table_and_plot_and_resumes(model, tok, tmp_path, budget_only, monkeypatch):
    notes: list[str] = []
    cfg = config(tmp_path, methods=["snapkv", "budgetonly", "streamingllm", "nosuch", "broken", "pca"])
    result = run_bench(model, tok, cfg, log=notes.append, progress=False)
    jsonl, md, png = result["paths"]
    rows = read_rows(jsonl)
    assert len(rows) == 2 * (1 + 2 * 2 + 1)  # tasks x (full + methods x ratios + budgetonly at its defaults)
    assert {r["method"] for r in rows} == {FULL, "snapkv", "streamingllm", "budgetonly"}
    assert {r["ratio"] for r in rows if r["method"] == "budgetonly"} == {bench_mod.DEFAULT_SETTINGS}
    assert any("nosuch" in n and "not a registered method" in n for n in notes)
    assert any("broken" in n and "no such luck" in n for n in notes)
    assert any("pca" in n and "--calibration" in n for n in notes)
    assert [s.split()[0] for s in result["skipped"]] == ["nosuch", "broken", "pca"]
    default = next(e for e in result["table"] if e["method"] == "budgetonly")
    assert bench_mod.plot_ratio(default) == pytest.approx(1 - default["bytes_vs_full"]) and 0 < default["bytes_vs_full"] < 1
    for r in rows:
        assert not r.get("error"), r
        assert 0.0 <= r["score"] <= 1.0 and abs(r["tokens"] - LENGTH) <= 0.02 * LENGTH
        assert r["cache_bytes_prefill"] > 0 and r["prefill_s"] > 0
    text = md.read_text()
    assert "| method | ratio | cache MiB | bytes vs full | niah_single | vt | avg |" in text
    assert "DynamicCache (full)" in text and "Skipped" in text and "| budgetonly | default (0." in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    snap = next(e for e in result["table"] if e["method"] == "snapkv" and e["ratio"] == 0.5)
    assert snap["bytes_vs_full"] == pytest.approx(0.5, abs=0.02)

    # Rerunning skips every finished row; dropping one row reruns exactly that one.
    import compresskv.eval.measure as measure

    real = measure.run_task
    monkeypatch.setattr(measure, "run_task", lambda *a, **k: pytest.fail("reran a finished row"))
    again = run_bench(model, tok, cfg, log=notes.append, progress=False)
    assert len(read_rows(jsonl)) == len(rows) and len(again["table"]) == len(result["table"])
    monkeypatch.setattr(measure, "run_task", real)
    kept = [r for r in rows if not (r["task"] == "vt" and r["method"] == "streamingllm" and r["ratio"] == 0.75)]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in kept))
    assert len(kept) == len(rows) - 1
    run_bench(model, tok, cfg, log=notes.append, progress=False)
    assert len(read_rows(jsonl)) == len(rows)


def test_failed_runs_are_recorded_and_retried(model, tok, tmp_path, monkeypatch):
    import compresskv.eval.measure as measure

    real = measure.run_task
    state = {"fail": True}

    def flaky(model, tokenizer, task, cache=None, **kw):
        if cache is not None and state["fail"]:
            raise RuntimeError("boom")
        return real(model, tokenizer, task, cache, **kw)

    monkeypatch.setattr(measure, "run_task", flaky)
    cfg = config(tmp_path, methods=["snapkv"], ratios=[0.5], tasks=["niah_single"])
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    rows = read_rows(result["paths"][0])
    assert [r.get("error") for r in rows] == [None, "RuntimeError: boom"]
    assert "1 runs failed" in result["paths"][1].read_text()
    state["fail"] = False
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    assert len(read_rows(result["paths"][0])) == 3  # the failed row was retried
    assert all(not r.get("error") for r in result["rows"])


def test_bench_with_perplexity(model, tok, tmp_path):
    text = tmp_path / "book.txt"
    text.write_text(prose(600))
    cfg = config(tmp_path, methods=["snapkv"], ratios=[0.5], tasks=["perplexity"], text=str(text), continuation=32, length=256)
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    full, snap = result["table"]
    assert full["ppl"] > 1 and snap["ppl"] > 1 and snap["bytes_vs_full"] < 0.6
    assert "| ppl |" in result["paths"][1].read_text()
    with pytest.raises(ValueError, match="needs a text"):
        run_bench(model, tok, config(tmp_path, tasks=["perplexity"]), progress=False)
    with pytest.raises(ValueError, match="unknown tasks"):
        run_bench(model, tok, config(tmp_path, tasks=["qa"]), progress=False)


def test_bench_calibrates_pca_matryoshka_and_elitekv_once(tok, tmp_path, monkeypatch):
    import compresskv.eval.methods as methods_mod
    from compresskv import elitekv

    for name, value in dict(CALIB_SEQ_LEN=64, CALIB_WINDOWS=2, TRAIN_SEQ_LEN=64, TRAIN_STEPS=2,
                            ALLOC_SEQ_LEN=64, ALLOC_WINDOWS=1).items():
        monkeypatch.setattr(methods_mod, name, value)
    monkeypatch.setenv("COMPRESSKV_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama", vocab_size=len(tok), layers=4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    calib = tmp_path / "calibration.txt"
    calib.write_text(prose(400, seed=3))
    cfg = config(tmp_path, methods=["pca", "matryoshka", "elitekv", "minicache", "snapkv"], ratios=[0.5, 0.75],
                 tasks=["niah_single"], calibration=str(calib))
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    rows = read_rows(result["paths"][0])
    assert all(not r.get("error") for r in rows), [r.get("error") for r in rows]
    assert len(rows) == 1 + 4 * 2 + 1 and result["skipped"] == []
    for entry in result["table"]:
        if entry["method"] in ("pca", "matryoshka", "elitekv", "snapkv"):
            assert entry["bytes_vs_full"] == pytest.approx(1 - entry["ratio"], abs=0.06), entry
    # The model is handed back as loaded: the EliteKV conversion was reverted.
    assert not elitekv.is_converted(model)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    work = next((tmp_path / "cache" / "bench").iterdir())
    assert {p.name for p in work.iterdir()} == {"pca", "matryoshka", "ropelite"}
    assert "calibrated on `calibration.txt`" in result["paths"][1].read_text()

    # Rerunning the calibrated rows reuses the artifacts on disk instead of calibrating again.
    jsonl = result["paths"][0]
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows if r["method"] not in ("pca", "matryoshka", "elitekv")))
    for name in ("calibrate", "train_projections", "allocate_ranks"):
        monkeypatch.setattr(compresskv.projected, name, lambda *a, **k: pytest.fail("recalibrated"))
    monkeypatch.setattr(elitekv, "rank_frequencies", lambda *a, **k: pytest.fail("re-ranked"))
    again = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    assert all(not r.get("error") for r in again["rows"]) and len(again["rows"]) == len(rows)


def test_aggregate_pairs_each_row_with_its_full_cache_run():
    def row(task, seed, method, ratio, score, nbytes, prefill, decode):
        return {"task": task, "seed": seed, "method": method, "ratio": ratio, "score": score,
                "cache_bytes_prefill": nbytes, "prefill_s": prefill, "decode_tok_s": decode,
                "peak_prefill_bytes": None, "peak_decode_bytes": 2 * nbytes}

    rows = [
        row("a", 0, FULL, 0.0, 1.0, 100, 2.0, 10.0), row("a", 1, FULL, 0.0, 0.0, 200, 4.0, 10.0),
        row("a", 0, "m", 0.5, 1.0, 50, 1.0, 20.0), row("a", 1, "m", 0.5, 0.0, 60, 4.0, 10.0),
    ]
    full, m = aggregate(rows, ["a"], [FULL, "m"], [0.5])
    assert full["scores"]["a"] == 50.0 and m["scores"]["a"] == 50.0
    assert m["bytes_vs_full"] == pytest.approx((0.5 + 0.3) / 2)
    assert m["peak_decode_vs_full"] == pytest.approx((0.5 + 0.3) / 2)
    assert m["peak_prefill_vs_full"] is None
    assert m["prefill_vs_full"] == pytest.approx((0.5 + 1.0) / 2)
    assert m["decode_vs_full"] == pytest.approx((2.0 + 1.0) / 2)
    md = table_markdown([full, m], ["a"])
    assert "| m | 0.5 |" in md and "–" in md  # a missing measurement is shown as a dash


# -- the plot (compresskv.eval.plots) ---------------------------------------------------------------
def _entry(method, ratio, scores, bytes_vs_full, decode, ppl):
    return {"method": method, "ratio": ratio, "scores": scores, "avg": sum(scores.values()) / len(scores),
            "ppl": ppl, "bytes_vs_full": bytes_vs_full, "decode_vs_full": decode}


@pytest.fixture
def plotted():
    """A figure of a small aggregate table: two methods with equal scores at every ratio (all 100
    on task a, 0 on task b) and one run at its default settings that saved 22% of the bytes."""
    import matplotlib.pyplot as plt

    from compresskv.eval import plots
    from compresskv.eval.methods import DEFAULT_SETTINGS

    table = [_entry(FULL, 0.0, {"a": 100.0, "b": 50.0}, 1.0, 1.0, 10.0)]
    for method in ("snapkv", "knorm"):
        table += [_entry(method, r, {"a": 100.0, "b": 0.0}, 1 - r, 1 + r, 11.0) for r in (0.5, 0.75)]
    table.append(_entry("minicache", DEFAULT_SETTINGS, {"a": 0.0, "b": 0.0}, 0.78, 1.6, 20.0))
    fig = plots.figure(table, ["a", "b", "perplexity"], title="t")
    yield fig, [ax for ax in fig.axes if ax.axison]
    plt.close(fig)


def _line(ax, method):
    return next(line for line in ax.get_lines() if line.get_label() == method)


def test_plot_has_ratio_bytes_saved_and_decode_speed_views(plotted):
    fig, axes = plotted
    assert [ax.get_title() for ax in axes] == [
        "a", "b", "average", "perplexity (lower is better)", "average score by bytes saved",
        "decode speed (higher is faster)"]
    assert all("ratio asked" in ax.get_xlabel() for ax in axes[:4])
    assert all("bytes saved" in ax.get_xlabel() for ax in axes[4:])
    by_bytes, speed = axes[4], axes[5]
    # Measured positions are not moved: x is 1 - bytes_vs_full, y the decode speed vs full.
    assert list(_line(by_bytes, "minicache").get_xdata()) == pytest.approx([0.22])
    assert list(_line(speed, "snapkv").get_xdata()) == pytest.approx([0.5, 0.75])
    assert list(_line(speed, "snapkv").get_ydata()) == pytest.approx([1.5, 1.75])
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["snapkv", "knorm", "minicache", "full cache (DynamicCache)"]


def test_plot_keeps_equal_scores_at_one_ratio_apart(plotted):
    _, axes = plotted
    for ax in axes[:2]:  # task a: both at 100; task b: both at 0
        snap, knorm = _line(ax, "snapkv"), _line(ax, "knorm")
        assert list(snap.get_ydata()) == list(knorm.get_ydata())
        assert snap.get_marker() != knorm.get_marker()
        for xs, xk, asked in zip(snap.get_xdata(), knorm.get_xdata(), (0.5, 0.75)):
            assert xs != xk and (xs + xk) / 2 == pytest.approx(asked)  # spread around the ratio
            assert abs(xs - xk) < 0.25 / 2  # and still closer to it than to the next ratio


def test_plot_labels_the_default_settings_point(plotted):
    _, axes = plotted
    for ax in axes:
        notes = [t for t in ax.texts if "minicache" in t.get_text()]
        assert len(notes) == 1, ax.get_title()
        assert "default settings" in notes[0].get_text() and "22%" in notes[0].get_text()
        assert notes[0].xy[0] == pytest.approx(0.22)


def test_plot_panels_for_one_task_or_perplexity_alone_and_the_old_names(tmp_path):
    from compresskv.eval import plots

    assert [p.title for p in plots.panels(["vt"])] == ["vt", "vt by bytes saved", "decode speed (higher is faster)"]
    assert [p.title for p in plots.panels(["perplexity"])][1] == "perplexity by bytes saved"
    assert compresskv.eval.plot is plots.plot and bench_mod.plot is plots.plot
    assert bench_mod.plot_ratio is plots.plot_ratio
    table = [_entry(FULL, 0.0, {"vt": 100.0}, 1.0, 1.0, None), _entry("snapkv", 0.5, {"vt": 50.0}, 0.5, 2.0, None)]
    png = compresskv.eval.plot(table, ["vt"], tmp_path / "p" / "bench.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_bench(model, tok, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compresskv, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "cli" / "bench"
    argv = ["bench", "--methods", "snapkv", "--ratios", "0.5", "--tasks", "niah_single", "--length", str(LENGTH),
            "--out", str(out), "--threads", "2"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr()
    assert "| snapkv | 0.5 |" in printed.out
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [r["method"] for r in rows] == [FULL, "snapkv"]
    assert "compresskv bench --methods snapkv" in out.with_suffix(".md").read_text()
    assert out.with_suffix(".png").exists()
    assert cli.main(["bench", "--tasks", "perplexity", "--out", str(out)]) == 2
    assert cli.main(["bench", "--tasks", "nosuch", "--out", str(out)]) == 2


@pytest.mark.slow
def test_bench_on_the_embedded_model(tmp_path):
    """Short prompts, one method: the full cache finds the needle; SnapKV at 0.5 halves the bytes."""
    model, tokenizer = compresskv.load_model()
    cfg = BenchConfig(methods=["snapkv"], ratios=[0.5], tasks=["niah_single"], length=500, seeds=[0],
                      out=tmp_path / "bench", model=compresskv.DEFAULT_MODEL)
    result = run_bench(model, tokenizer, cfg, log=lambda m: None, progress=False)
    full, snap = result["table"]
    assert full["scores"]["niah_single"] == 100.0
    assert snap["bytes_vs_full"] == pytest.approx(0.5, abs=0.02)
    assert all(p.exists() for p in result["paths"])
