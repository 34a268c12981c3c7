"""LongBench (v1) tasks (compresskv.eval.longbench): the metrics on hand-made cases, the prompt
(truncated in the middle, chat template or not), records read from local JSON lines, and
``compresskv bench --tasks longbench:...`` end to end on the tiny model. Nothing is downloaded."""

from __future__ import annotations

import json

import pytest

import compresskv
from compresskv import cli
from compresskv.eval import longbench as lb
from compresskv.eval.bench import FULL, BenchConfig, run_bench

PARAGRAPHS = [
    "The lighthouse keeper painted the tower red every spring and kept a log of passing ships.",
    "A small bakery on the corner sold lemon cakes to the fishermen before dawn each day.",
    "The orchard behind the school grew pears, and the children picked them in the autumn.",
    "An old violin maker carved his instruments from maple wood dried for twenty winters.",
]


def records() -> dict[str, list[dict]]:
    """One qasper-like, one trec-like and one passage_retrieval_en-like task, in LongBench's format."""
    article = " ".join(PARAGRAPHS * 3)
    qasper = [
        {"input": "What colour was the tower painted?", "context": article, "answers": ["red", "the tower was red"],
         "length": 120, "dataset": "qasper", "language": "en", "all_classes": None, "_id": "q0"},
        {"input": "What did the bakery sell?", "context": article, "answers": ["lemon cakes"],
         "length": 120, "dataset": "qasper", "language": "en", "all_classes": None, "_id": "q1"},
    ]
    shots = "\n".join(f"Question: {q}\nType: {t}" for q, t in [
        ("Where is the lighthouse?", "Location"), ("How many ships passed?", "Number"),
        ("Who made the violin?", "Human being"), ("Where is the bakery?", "Location"),
    ] * 3)
    trec = [{"input": "Question: Where is the orchard?\nType:", "context": shots, "answers": ["Location"],
             "length": 90, "dataset": "trec", "language": "en",
             "all_classes": ["Location", "Number", "Human being", "Entity"], "_id": "t0"}]
    context = "\n\n".join(f"Paragraph {i + 1}: {p}" for i, p in enumerate(PARAGRAPHS))
    retrieval = [{"input": "Pears were picked by children behind a school.", "context": context,
                  "answers": ["Paragraph 3"], "length": 80, "dataset": "passage_retrieval_en", "language": "en",
                  "all_classes": [], "_id": "p0"}]
    return {"qasper": qasper, "trec": trec, "passage_retrieval_en": retrieval}


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "longbench"
    folder.mkdir()
    for task, recs in records().items():
        (folder / f"{task}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return folder


# -- metrics, on cases computed by hand -------------------------------------------------------------
def test_qa_f1_normalises_then_counts_shared_tokens():
    assert lb.normalize_answer("The  Cat, sat!") == "cat sat"
    assert lb.qa_f1_score("the cat sat", "a cat sat") == 1.0  # both "cat sat" after normalisation
    # prediction {cat, sat, on, mat}, reference {cat, sat}: P = 2/4, R = 2/2, F1 = 2PR/(P+R) = 2/3
    assert lb.qa_f1_score("The cat sat on the mat.", "a cat sat") == pytest.approx(2 / 3)
    # repeated tokens count once per match: prediction [cat, cat], reference [cat]: P = 1/2, R = 1
    assert lb.qa_f1_score("cat cat", "cat") == pytest.approx(2 * 0.5 / 1.5)
    assert lb.qa_f1_score("dog", "cat") == 0.0


def test_rouge_l_is_summary_level_over_distinct_words():
    # one sentence each: LCS "the cat on the mat" has distinct words {the, cat, on, mat} = 4;
    # distinct words: prediction {the, cat, sat, on, mat} = 5, reference 5: P = R = 4/5
    assert lb.rouge_score("the cat sat on the mat", "the cat lay on the mat") == pytest.approx(0.8, abs=1e-6)
    # summary level: each prediction sentence is matched against the reference sentence separately,
    # so the order of the sentences does not matter (a plain LCS of the two texts would give 2/4)
    assert lb.rouge_score("c d. a b", "a b c d") == pytest.approx(1.0, abs=1e-6)
    # prediction sentences "a b", "c d" vs reference "a c d": union {a} + {c, d} = 3; P = 3/4, R = 3/3
    assert lb.rouge_score("a b. c d", "a c d") == pytest.approx(2 * 0.75 / 1.75, abs=1e-6)
    assert lb.rouge_score("", "a b") == 0.0
    assert lb.rouge_score("Cat", "cat") == 0.0  # no lower-casing, as the rouge package


def test_classification_retrieval_and_count():
    classes = ["Location", "Number", "Human being", "Entity"]
    assert lb.classification_score("Location", "Location", all_classes=classes) == 1.0
    assert lb.classification_score("Location or Number", "Location", all_classes=classes) == 0.5
    assert lb.classification_score("Human being", "Location", all_classes=classes) == 0.0
    assert lb.classification_score("no idea", "Location", all_classes=classes) == 0.0
    # a class that is part of the reference (and not it) is not counted against the answer
    nested = ["Other location", "Other"]
    assert lb.classification_score("Other location", "Other location", all_classes=nested) == 1.0
    assert lb.retrieval_score("Paragraph 2", "Paragraph 2") == 1.0
    assert lb.retrieval_score("Paragraph 2 or Paragraph 3", "Paragraph 2") == 0.5
    assert lb.retrieval_score("Paragraph 12", "Paragraph 2") == 0.0
    assert lb.retrieval_score("I do not know", "Paragraph 2") == 0.0
    assert lb.count_score("There are 5 unique paragraphs", 5) == 1.0
    assert lb.count_score("5 or 6", "5") == 0.5
    assert lb.count_score("none", "5") == 0.0


def test_code_similarity_takes_the_first_code_line():
    # "```python" and "# comment" are skipped; "x = foo(1)" vs "x = foo(2)": 9 common characters of
    # 10 + 10, similarity 2 * 9 / 20 = 0.9
    assert lb.code_sim_score("```python\n# comment\nx = foo(1)\ny = 2", "x = foo(2)") == pytest.approx(0.9)
    assert lb.edit_similarity("abc", "abd") == pytest.approx(0.67)  # 2 * 2 / 6 = 0.667, whole percent
    assert lb.code_sim_score("x = 1", "x = 1") == 1.0
    assert lb.code_sim_score("// only a comment", "x = 1") == 0.0


def test_score_takes_the_best_answer_and_the_first_line_of_few_shot_tasks():
    # F1 against each answer: "red" 0, "blue sky" 1, "blue" 2/3 -> the best, 1
    assert lb.longbench_score("qasper", "blue sky", ["red", "blue sky", "blue"]) == 1.0
    assert lb.longbench_score("qasper", "blue", ["red", "blue sky"]) == pytest.approx(2 / 3)
    classes = ["Location", "Number"]
    # trec scores the first line only: "Location" alone (the second line would halve it)
    assert lb.longbench_score("trec", "Location\nNumber", ["Location"], classes) == 1.0
    assert lb.classification_score("Location\nNumber", "Location", all_classes=classes) == 0.5
    assert lb.longbench_score("qasper", "anything", []) == 0.0
    with pytest.raises(ValueError, match="unknown LongBench task"):
        lb.longbench_score("nosuch", "x", ["x"])


# -- prompts --------------------------------------------------------------------------------------------
def test_truncation_keeps_the_head_and_the_tail(tok):
    prompt = "START here. " + " ".join(f"filler {i}." for i in range(300)) + " The END"
    assert len(tok(prompt)["input_ids"]) > 200
    cut = lb.truncate_middle(tok, prompt, 60)
    assert cut.startswith("START here.") and cut.endswith("The END")
    assert "filler 150." not in cut
    assert len(tok(cut)["input_ids"]) <= 64  # 60, give or take a merge across the seam
    short = "START here. The END"
    assert lb.truncate_middle(tok, short, 60) == short


def test_prompt_uses_the_template_and_the_chat_template_except_for_raw_tasks(tok):
    rec = records()
    qasper = tok.decode(lb.build_prompt(tok, "qasper", rec["qasper"][0], 4096))
    assert qasper.startswith("<|im_start|>user\nYou are given a scientific article")
    assert "Question: What colour was the tower painted?\n\nAnswer:" in qasper and "assistant" in qasper
    trec = tok.decode(lb.build_prompt(tok, "trec", rec["trec"][0], 4096))
    assert trec.startswith("Please determine the type of the question below.") and "<|im_start|>" not in trec
    assert lb.MAX_NEW_TOKENS["qasper"] == 128 and lb.MAX_NEW_TOKENS["trec"] == 64
    assert set(lb.PROMPTS) == set(lb.MAX_NEW_TOKENS) == set(lb.TASK_METRIC)


def test_records_come_from_the_folder_or_the_environment(data_dir, tok, monkeypatch):
    assert [r["_id"] for r in lb.load_longbench("qasper", data_dir)] == ["q0", "q1"]
    monkeypatch.setenv(lb.ENV_DIR, str(data_dir))
    task = lb.make_longbench_task("longbench:qasper", tok, max_length=4096, index=1)
    assert task.answers == ["lemon cakes"] and task.max_new_tokens == 128 and task.name == "longbench:qasper"
    assert task.score("Lemon cakes.") == 1.0 and task.score("bread") == 0.0
    with pytest.raises(ValueError, match="has 2 records"):
        lb.make_longbench_task("qasper", tok, index=2)
    with pytest.raises(FileNotFoundError, match="no LongBench file"):
        lb.load_longbench("trec", data_dir / "missing")
    with pytest.raises(ValueError, match="unknown LongBench task"):
        lb.load_longbench("nosuch", data_dir)


# -- end to end -------------------------------------------------------------------------------------------
TASKS = ["longbench:qasper", "longbench:trec", "longbench:passage_retrieval_en"]


def test_bench_runs_longbench_tasks_with_the_full_cache_and_a_method(model, tok, data_dir, tmp_path):
    config = BenchConfig(methods=["snapkv"], ratios=[0.5], tasks=TASKS, length=160, seeds=[0],
                         out=tmp_path / "lb", longbench_dir=str(data_dir))
    result = run_bench(model, tok, config, log=lambda msg: None, progress=False)
    rows = result["rows"]
    assert sorted((r["task"], r["method"]) for r in rows) == sorted((t, m) for t in TASKS for m in (FULL, "snapkv"))
    recs = records()
    for r in rows:
        assert not r.get("error"), r
        name = r["task"].removeprefix("longbench:")
        rec = recs[name][0]
        assert r["expected"] == rec["answers"] and r["source"] == str(data_dir)
        # the row's score is LongBench's metric of the row's answer
        assert r["score"] == lb.longbench_score(name, r["answer"], rec["answers"], rec["all_classes"])
    by = {(r["task"], r["method"]): r for r in rows}
    for task in TASKS:  # snapkv held half the prompt's cache after prefill; the same prompt for both
        full, snap = by[task, FULL], by[task, "snapkv"]
        assert snap["tokens"] == full["tokens"]
        assert snap["cache_bytes_prefill"] < 0.75 * full["cache_bytes_prefill"]
    # the qasper prompt was cut to 160 tokens, then the chat template was added (a few tokens)
    rec = recs["qasper"][0]
    assert len(tok(lb.PROMPTS["qasper"].format(**rec))["input_ids"]) > 200
    assert by["longbench:qasper", FULL]["tokens"] == len(lb.build_prompt(tok, "qasper", rec, 160)) < 190
    md = (tmp_path / "lb.md").read_text()
    assert "LongBench's metric" in md and "| snapkv | 0.5 |" in md


def test_cli_bench_longbench(model, tok, data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(compresskv, "load_model", lambda *a, **k: (model, tok))
    out = tmp_path / "cli" / "lb"
    argv = ["bench", "--methods", "snapkv", "--ratios", "0.5", "--tasks", "longbench:passage_retrieval_en",
            "--seeds", "0", "--length", "512", "--longbench-dir", str(data_dir), "--out", str(out), "--threads", "2"]
    assert cli.main(argv) == 0
    assert "| snapkv | 0.5 |" in capsys.readouterr().out
    rows = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    assert [(r["task"], r["method"]) for r in rows] == [("longbench:passage_retrieval_en", m) for m in (FULL, "snapkv")]
    assert cli.main(argv[:-4] + ["--longbench-dir", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert cli.main(["bench", "--tasks", "longbench:nosuch", "--out", str(out)]) == 2


def test_without_a_folder_the_records_come_from_the_hubs_data_zip(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("data/trec.jsonl", "".join(json.dumps(r) + "\n" for r in records()["trec"]))
    asked = []

    def download(repo_id, filename, repo_type=None, **_):
        asked.append((repo_id, filename, repo_type))
        return str(archive)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    monkeypatch.delenv(lb.ENV_DIR, raising=False)
    lb._records.cache_clear()
    assert [r["_id"] for r in lb.load_longbench("trec")] == ["t0"]
    assert asked == [("THUDM/LongBench", "data.zip", "dataset")]
    lb._records.cache_clear()
