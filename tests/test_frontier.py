"""``compresskv bench --frontier``: the best row per share of the full cache's bytes, the Pareto
front, the page section, the JSON and the figure; composed method names in the bench; transformers'
``QuantizedCache`` as a measured baseline; the ``--frontier`` option."""

from __future__ import annotations

import json
import random

import pytest
import torch

import compresskv
import compresskv.eval.bench as bench_mod
import compresskv.eval.methods as methods_mod
from compresskv import cli
from compresskv.eval.bench import FULL, BenchConfig, run_bench
from compresskv.eval.frontier import (
    FRONTIER_METHODS, FRONTIER_RATIOS, SLACK, best_at, frontier_markdown, frontier_picks, is_single, pareto_front,
    write_frontier,
)
from compresskv.eval.methods import DEFAULT_SETTINGS, MethodBuilder
from conftest import kv, tiny_model


def entry(method, ratio, bytes_vs_full, avg, ppl=None, decode=1.0):
    return {"method": method, "ratio": ratio, "bytes_vs_full": bytes_vs_full, "avg": avg, "ppl": ppl,
            "decode_vs_full": decode, "peak_decode_vs_full": bytes_vs_full, "scores": {"a": avg}}


@pytest.fixture
def table():
    return [
        entry(FULL, 0.0, 1.0, 100.0, 10.0),
        entry("snapkv", 0.75, 0.252, 60.0, 12.0),
        entry("snapkv+int4", 0.75, 0.26, 80.0, 11.0, decode=0.9),    # best at 1/4 (0.26 <= 0.25 * 1.05)
        entry("int4", DEFAULT_SETTINGS, 0.27, 95.0, 10.5),            # just above 1/4 with the slack
        entry("int8", DEFAULT_SETTINGS, 0.24, 78.0, 10.2),            # a quantizer: never the best single
        entry("quantizedcache_int4", DEFAULT_SETTINGS, 0.24, 75.0),   # a baseline: never the best single
        entry("pyramidkv", 0.875, 0.125, 55.0, 13.0),
        entry("knorm", 0.875, 0.125, 55.0, 12.0),                    # ties pyramidkv, lower ppl
        entry("pyramidkv+int4", 0.875, 0.13, 70.0, 12.5),            # best at 1/8
        entry("snapkv+int8", 0.9375, 0.07, 50.0, 11.0),              # above 1/16 * 1.05: nothing at 1/16
        entry("svd", 0.9375, None, 99.0),                            # no measured bytes: never picked
    ]


def names(picks, key):
    return [None if p[key] is None else (p[key]["method"], p[key]["ratio"]) for p in picks]


def test_picks_per_target(table):
    picks = frontier_picks(table)
    assert [p["label"] for p in picks] == ["1/4", "1/8", "1/16"]
    assert names(picks, "best") == [("snapkv+int4", 0.75), ("pyramidkv+int4", 0.875), None]
    assert names(picks, "best_single") == [("snapkv", 0.75), ("knorm", 0.875), None]
    assert picks[0]["best"]["decode_vs_full"] == 0.9 and picks[0]["best"]["bytes_vs_full"] == 0.26
    random.Random(0).shuffle(table)  # the pick does not depend on the table's order
    assert frontier_picks(table) == picks


def test_slack_boundary_full_cache_and_ties(table):
    assert best_at(table, 0.27 / SLACK)["method"] == "int4"  # exactly at target * slack qualifies
    assert best_at(table, 0.27 / SLACK - 1e-6)["method"] == "snapkv+int4"
    assert best_at(table, 1.0)["method"] != FULL  # the reference is never a pick
    assert best_at([entry(FULL, 0.0, 1.0, 100.0)], 1.0) is None
    # equal scores: the lower perplexity wins, and a row without perplexity loses to one with it
    tied = [entry("a", 0.5, 0.2, 50.0), entry("b", 0.5, 0.2, 50.0, 9.0), entry("c", 0.5, 0.2, 50.0, 8.0)]
    assert best_at(tied, 0.25)["method"] == "c"
    assert best_at(tied[:2], 0.25)["method"] == "b"
    with pytest.raises(ValueError, match="target"):
        best_at(table, 0.0)


def test_single_methods():
    assert is_single("snapkv") and is_single("minicache")
    assert not any(is_single(m) for m in ("snapkv+int4", "snapkv+pca+int4", "int4", "int8", "quantizedcache_int4",
                                          "quantizedcache_int2", FULL))


def test_pareto_front(table):
    front = pareto_front(table)
    xs, ys = [e["bytes_vs_full"] for e in front], [e["avg"] for e in front]
    assert xs == sorted(xs) and all(a < b for a, b in zip(ys, ys[1:]))
    # every other scored row is beaten by a front row with no more bytes
    for e in table:
        if e["bytes_vs_full"] is not None and e not in front:
            assert any(f["bytes_vs_full"] <= e["bytes_vs_full"] and f["avg"] >= e["avg"] for f in front), e["method"]
    # at equal bytes and score (knorm, pyramidkv) the lower perplexity stands for both
    assert [e["method"] for e in front] == ["snapkv+int8", "knorm", "pyramidkv+int4", "int8", "snapkv+int4", "int4", FULL]
    strong = [dict(e, avg=90.0) if e["method"] == "snapkv+int8" else e for e in table]
    assert [e["method"] for e in pareto_front(strong)] == ["snapkv+int8", "int4", FULL]


def test_markdown_section(table):
    text = frontier_markdown(frontier_picks(table))
    assert text.startswith("## Quality per byte\n")
    lines = {line.split(" | ")[0]: line for line in text.splitlines() if line.startswith("| ≤")}
    assert list(lines) == ["| ≤ 1/4", "| ≤ 1/8", "| ≤ 1/16"]
    assert "`snapkv+int4` at 0.75 | 0.260 | 80.0 | 11.000 | 0.90 | `snapkv` at 0.75 | 0.252 | 60.0 | 12.000" in lines["| ≤ 1/4"]
    assert "`pyramidkv+int4` at 0.875" in lines["| ≤ 1/8"] and "`knorm` at 0.875" in lines["| ≤ 1/8"]
    assert lines["| ≤ 1/16"].count("none qualifies") == 2
    assert "No row qualifies" in frontier_markdown(frontier_picks([entry(FULL, 0.0, 1.0, 100.0)]))


def test_write_frontier_json_and_figure(table, tmp_path):
    section, (json_path, png_path) = write_frontier(table, tmp_path / "out" / "bench", log=lambda m: None)
    assert json_path == tmp_path / "out" / "bench_frontier.json"
    data = json.loads(json_path.read_text())
    assert data["targets"] == json.loads(json.dumps(frontier_picks(table)))
    assert [e["method"] for e in data["front"]] == [e["method"] for e in pareto_front(table)]
    assert section == frontier_markdown(frontier_picks(table))
    pytest.importorskip("matplotlib")
    assert png_path == tmp_path / "out" / "bench_frontier.png"
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_frontier_figure_draws_rows_and_front(table, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from compresskv.eval import plots

    seen = {}
    real = plt.Figure.savefig

    def keep(fig, *args, **kwargs):
        seen["fig"] = fig
        return real(fig, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plt.Figure, "savefig", keep)
        plots.plot_frontier(table, tmp_path / "f.png", title="t")
    ax = seen["fig"].axes[0]
    assert ax.get_xscale() == "log"
    lines = {line.get_label(): line for line in ax.get_lines()}
    front = lines["Pareto front"]
    assert list(front.get_xdata()) == [e["bytes_vs_full"] for e in pareto_front(table)]
    assert list(lines["knorm"].get_xdata()) == [0.125] and "svd" not in lines  # no measured bytes
    labels = {t.get_text() for t in ax.texts}
    assert {"snapkv+int4 0.75", "int4 default", "knorm 0.875"} <= labels


def test_bench_with_frontier_writes_section_json_and_figure(model, tok, tmp_path):
    cfg = BenchConfig(methods=["snapkv", "streamingllm"], ratios=[0.75], tasks=["niah_single"], length=640,
                      seeds=[0], out=tmp_path / "res" / "bench", model="tiny", frontier=True)
    result = run_bench(model, tok, cfg, log=lambda m: None, progress=False)
    jsonl, md, png, fjson, fpng = result["paths"]
    text = md.read_text()
    assert "| method | ratio |" in text and "## Quality per byte" in text
    picks = json.loads(fjson.read_text())["targets"]
    assert picks == json.loads(json.dumps(frontier_picks(result["table"])))
    assert picks[0]["best"] is not None and picks[0]["best"]["method"] in ("snapkv", "streamingllm")
    assert fpng is None or fpng.exists()


# -- transformers' QuantizedCache as a measured baseline -------------------------------------------
def flat_bytes(t):
    if t is None:
        return 0
    if hasattr(t, "__tensor_flatten__"):
        names_, _ = t.__tensor_flatten__()
        return sum(flat_bytes(getattr(t, n)) for n in names_)
    assert type(t) is torch.Tensor
    return t.numel() * t.element_size()


def test_quantized_cache_baseline_holds_fewer_bytes_than_dynamic_cache():
    pytest.importorskip("optimum.quanto")
    from transformers import DynamicCache

    from compresskv.eval.measure import cache_nbytes

    model = tiny_model("llama")
    ids = torch.randint(3, 96, (1, 320), generator=torch.Generator().manual_seed(0))  # > residual_length 128
    builder = MethodBuilder(model, None)
    assert builder.unusable("quantizedcache_int4") is None
    assert builder.ratios_for("quantizedcache_int4", [0.5, 0.75]) == [DEFAULT_SETTINGS]
    caches = [builder.build("quantizedcache_int4", DEFAULT_SETTINGS), DynamicCache(config=model.config)]
    with torch.no_grad():
        for cache in caches:
            model(input_ids=ids, use_cache=True, **kv(cache))
            for step in range(4):  # decoded tokens wait, unquantized, in the residual
                model(input_ids=ids[:, step : step + 1], use_cache=True, **kv(cache))
    quantized, dynamic = caches
    layers = quantized.layers
    assert layers[0].keys.shape[-2] == 4 and type(layers[0]._quantized_keys) is not torch.Tensor
    expected = sum(flat_bytes(getattr(layer, name)) for layer in layers
                   for name in ("_quantized_keys", "_quantized_values", "keys", "values"))
    assert cache_nbytes(quantized) == quantized.nbytes() == expected
    assert expected > sum(flat_bytes(layer.keys) + flat_bytes(layer.values) for layer in layers)  # residual counted
    assert cache_nbytes(quantized) < cache_nbytes(dynamic) / 4
    with pytest.raises(ValueError, match="default settings"):
        builder.build("quantizedcache_int4", 0.5)
    with pytest.raises(ValueError, match="nbits"):
        methods_mod.quantized_cache(model, nbits=3)


def test_quantized_cache_baseline_needs_quanto(model, monkeypatch):
    monkeypatch.setattr(methods_mod, "quanto_missing", lambda: True)
    why = MethodBuilder(model, None).unusable("quantizedcache_int2")
    assert why == "needs optimum-quanto (pip install optimum-quanto)"


# -- composed method names ----------------------------------------------------------------------------
@pytest.fixture
def composed(monkeypatch):
    """Compositions resolved as ``compresskv.patching._factory`` will resolve them; each factory
    returns what it was given."""
    import compresskv.patching as patching

    real = patching._factory

    def fake(model, compression_ratio=0.5, projections=None):
        return {"compression_ratio": compression_ratio, "projections": projections}

    def factory(name):
        if name in ("snapkv+int4", "snapkv+pca", "snapkv+pca+int4", "snapkv+matryoshka+int8"):
            return fake
        return real(name)

    monkeypatch.setattr(patching, "_factory", factory)


def test_composed_names_are_usable_and_calibrated(model, composed, monkeypatch):
    builder = MethodBuilder(model, None)
    assert builder.unusable("snapkv+int4") is None
    assert "not a registered method" in builder.unusable("snapkv+nosuch")
    assert "--calibration" in builder.unusable("snapkv+pca+int4") and "PCA" in builder.unusable("snapkv+pca")
    assert "trained projections" in builder.unusable("snapkv+matryoshka+int8")
    assert builder.ratios_for("snapkv+int4", [0.5]) == [0.5]
    assert builder.source("snapkv+int4") is None
    calibrated = MethodBuilder(model, None, calibration="book.txt")
    assert calibrated.unusable("snapkv+pca+int4") is None
    assert calibrated.source("snapkv+pca+int4") == "calibration=book.txt"
    pca, trained = object(), object()
    monkeypatch.setattr(calibrated, "_pca", lambda: pca)
    monkeypatch.setattr(calibrated, "_trained", lambda: trained)
    assert calibrated.build("snapkv+pca+int4", 0.875) == {"compression_ratio": 0.875, "projections": pca}
    assert calibrated.build("snapkv+matryoshka+int8", 0.75) == {"compression_ratio": 0.75, "projections": trained}
    assert calibrated.build("snapkv+int4", 0.5) == {"compression_ratio": 0.5, "projections": None}
    notes = []
    assert bench_mod.usable_methods(model, ["snapkv+int4", "snapkv+nosuch", "snapkv"], [0.5], log=notes.append) == [
        "snapkv+int4", "snapkv"]
    assert len(notes) == 1 and "snapkv+nosuch" in notes[0]


# -- the command line --------------------------------------------------------------------------------
def test_cli_frontier_option(composed, monkeypatch, tmp_path):
    parsed = cli.build_parser().parse_args(["bench", "--frontier"])
    assert parsed.frontier and not parsed.ratios_given
    assert not cli.build_parser().parse_args(["bench"]).frontier
    given = cli.build_parser().parse_args(["bench", "--frontier", "--ratios", "0.5",
                                           "--methods", "snapkv+int4,quantizedcache_int4,snapkv"])
    assert given.ratios_given and given.ratios == [0.5]
    assert given.methods == ["snapkv+int4", "quantizedcache_int4", "snapkv"]

    configs = []

    def fake_run(model, tokenizer, config, log=None):
        configs.append(config)
        return {"table": [], "paths": []}

    monkeypatch.setattr(compresskv, "load_model", lambda *a, **k: (None, None))
    monkeypatch.setattr(bench_mod, "run_bench", fake_run)
    out = ["--out", str(tmp_path / "b"), "--threads", "1", "--device", "cpu"]
    assert cli.main(["bench", "--frontier", *out]) == 0
    assert configs[-1].frontier and configs[-1].methods == FRONTIER_METHODS and configs[-1].ratios == FRONTIER_RATIOS
    assert cli.main(["bench", "--frontier", "--ratios", "0.5", "--methods", "snapkv", *out]) == 0
    assert configs[-1].ratios == [0.5] and configs[-1].methods == ["snapkv"]
    assert cli.main(["bench", *out]) == 0
    assert not configs[-1].frontier and configs[-1].ratios == [0.5, 0.75, 0.875]


def test_cli_refuses_an_unknown_composition(composed, capsys, tmp_path):
    assert cli.main(["bench", "--methods", "snapkv+nosuch", "--out", str(tmp_path / "b")]) == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--methods" in message and "snapkv+nosuch" in message and "quantizedcache_int4" in message
