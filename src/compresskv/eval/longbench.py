"""LongBench (v1) tasks for ``compresskv bench``: ``--tasks longbench:qasper,longbench:trec,...``.

LongBench (Bai et al., arXiv 2308.14508; github.com/THUDM/LongBench) is the long-context suite
PyramidKV and xKV report. This module runs its English tasks through the bench's machinery (the
same run as ``DynamicCache``, the same result rows), with LongBench's own settings, written here
in our own code:

* the prompt template of each task (LongBench's ``config/dataset2prompt.json``, verbatim: they are
  data) and its answer length in tokens (``config/dataset2maxlen.json``);
* ``pred.py``'s truncation: a prompt longer than the model's maximum length (the bench's
  ``--length``) keeps its first and last ``length // 2`` tokens (decoded and joined as text), then
  goes through the model's chat template when it has one, except for the tasks LongBench keeps
  raw (``trec``, ``triviaqa``, ``samsum``, ``lcc``, ``repobench-p``); greedy decoding;
* ``eval.py``'s scoring: the task's metric against every reference answer, the best one kept; for
  ``trec``, ``triviaqa`` and ``samsum`` only the answer's first line is scored;
* ``metrics.py``'s metrics: token F1 after SQuAD-style normalisation (``qa_f1``), ROUGE-L F
  (``rouge``), class match (``classification``), paragraph number (``retrieval``), count
  (``count``) and edit similarity of the first code line (``code_sim``). Where ours differ from
  the reference implementation (the ``rouge`` and ``fuzzywuzzy`` packages, a list mutated while it
  is iterated) the function says so; docs/evaluations.md lists the differences.

A task's records are LongBench's JSON lines (``input``, ``context``, ``answers``, ``length``,
``dataset``, ``language``, ``all_classes``, ``_id``), read from ``DIR/<task>.jsonl`` (``DIR``:
``compresskv bench --longbench-dir DIR`` or ``$COMPRESSKV_LONGBENCH_DIR``), or else downloaded
from the Hugging Face hub (``THUDM/LongBench``'s ``data.zip``; needs network access). The bench's
seed ``i`` is the task's ``i``-th record (``--seeds 0,1,2``: the first three records).
The Chinese tasks (which need ``jieba``) are not included.
"""

from __future__ import annotations

import functools
import json
import os
import re
import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .tasks import Task, prompt_ids

#: the task-name prefix that selects a LongBench task in ``compresskv bench --tasks``
PREFIX = "longbench:"
#: environment variable naming a folder of ``<task>.jsonl`` files
ENV_DIR = "COMPRESSKV_LONGBENCH_DIR"
HUB_REPO = "THUDM/LongBench"

_QA = "Answer the question based on the given passages. Only give me the answer and do not output any other words."
_QASPER = (
    'as concisely as you can, using a single phrase or sentence if possible. If the question cannot be answered '
    'based on the information in the article, write "unanswerable". If the question is a yes/no question, answer '
    '"yes", "no", or "unanswerable". Do not provide any explanation.'
)
# (sic: "asconcisely" is in LongBench's template, which the papers' numbers were measured with)
_STORY = "asconcisely as you can, using a single phrase if possible. Do not provide any explanation."
#: LongBench's prompt templates (``{context}``, ``{input}`` filled from the record)
PROMPTS: dict[str, str] = {
    "narrativeqa": "You are given a story, which can be either a novel or a movie script, and a question. Answer the "
    f"question {_STORY}\n\nStory: {{context}}\n\nNow, answer the question based on the story {_STORY}\n\n"
    "Question: {input}\n\nAnswer:",
    "qasper": f"You are given a scientific article and a question. Answer the question {_QASPER}\n\nArticle: "
    f"{{context}}\n\n Answer the question based on the above article {_QASPER}\n\nQuestion: {{input}}\n\nAnswer:",
    "multifieldqa_en": "Read the following text and answer briefly.\n\n{context}\n\nNow, answer the following question "
    "based on the above text, only give me the answer and do not output any other words.\n\nQuestion: {input}\nAnswer:",
    **{name: f"{_QA}\n\nThe following are given passages.\n{{context}}\n\n{_QA}\n\nQuestion: {{input}}\nAnswer:"
       for name in ("hotpotqa", "2wikimqa", "musique")},
    "gov_report": "You are given a report by a government agency. Write a one-page summary of the report.\n\nReport:\n"
    "{context}\n\nNow, write a one-page summary of the report.\n\nSummary:",
    "qmsum": "You are given a meeting transcript and a query containing a question or instruction. Answer the query in "
    "one or more sentences.\n\nTranscript:\n{context}\n\nNow, answer the query based on the above meeting transcript "
    "in one or more sentences.\n\nQuery: {input}\nAnswer:",
    "multi_news": "You are given several news passages. Write a one-page summary of all news. \n\nNews:\n{context}\n\n"
    "Now, write a one-page summary of all the news.\n\nSummary:",
    "trec": "Please determine the type of the question below. Here are some examples of questions.\n\n{context}\n{input}",
    "triviaqa": "Answer the question based on the given passage. Only give me the answer and do not output any other "
    "words. The following are some examples.\n\n{context}\n\n{input}",
    "samsum": "Summarize the dialogue into a few short sentences. The following are some examples.\n\n{context}\n\n{input}",
    "passage_count": "There are some paragraphs below sourced from Wikipedia. Some of them may be duplicates. Please "
    "carefully read these paragraphs and determine how many unique paragraphs there are after removing duplicates. "
    "In other words, how many non-repeating paragraphs are there in total?\n\n{context}\n\nPlease enter the final "
    "count of unique paragraphs after removing duplicates. The output format should only contain the number, such as "
    "1, 2, 3, and so on.\n\nThe final answer is: ",
    "passage_retrieval_en": "Here are 30 paragraphs from Wikipedia, along with an abstract. Please determine which "
    "paragraph the abstract is from.\n\n{context}\n\nThe following is an abstract.\n\n{input}\n\nPlease enter the "
    'number of the paragraph that the abstract is from. The answer format must be like "Paragraph 1", "Paragraph 2", '
    "etc.\n\nThe answer is: ",
    "lcc": "Please complete the code given below. \n{context}Next line of code:\n",
    "repobench-p": "Please complete the code given below. \n{context}{input}Next line of code:\n",
}
#: tokens generated per answer (LongBench's ``dataset2maxlen``)
MAX_NEW_TOKENS: dict[str, int] = {
    "narrativeqa": 128, "qasper": 128, "multifieldqa_en": 64, "hotpotqa": 32, "2wikimqa": 32, "musique": 32,
    "gov_report": 512, "qmsum": 512, "multi_news": 512, "trec": 64, "triviaqa": 32, "samsum": 128,
    "passage_count": 32, "passage_retrieval_en": 32, "lcc": 64, "repobench-p": 64,
}
#: tasks whose prompt LongBench does not put in the chat template ("chat models are better off without")
NO_CHAT = frozenset({"trec", "triviaqa", "samsum", "lcc", "repobench-p"})
#: tasks whose answer is scored on its first line only (few-shot tasks: the model goes on with examples)
FIRST_LINE = frozenset({"trec", "triviaqa", "samsum"})


# -- metrics ---------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation, as LongBench's: lower case, punctuation removed, the articles
    *a*, *an*, *the* removed, whitespace collapsed."""
    text = "".join(ch for ch in text.lower() if ch not in string.punctuation)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """F1 of two token lists, counting repeated tokens (a bag of tokens), 0 without overlap."""
    same = sum((Counter(prediction) & Counter(reference)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(prediction), same / len(reference)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, reference: str, **_: Any) -> float:
    """Token F1 of the normalised (:func:`normalize_answer`) prediction and reference."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def _lcs_table(x: Sequence[Any], y: Sequence[Any]) -> list[list[int]]:
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, 1):
        row, prev = table[i], table[i - 1]
        for j, b in enumerate(y, 1):
            row[j] = prev[j - 1] + 1 if a == b else (prev[j] if prev[j] >= row[j - 1] else row[j - 1])
    return table


def _lcs_items(x: Sequence[str], y: Sequence[str]) -> set[str]:
    """The words of one longest common subsequence of ``x`` and ``y`` (traced back preferring
    to drop from ``y`` on ties, as the ``rouge`` package does)."""
    table, i, j, out = _lcs_table(x, y), len(x), len(y), set()
    while i and j:
        if x[i - 1] == y[j - 1]:
            out.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out


def rouge_score(prediction: str, reference: str, **_: Any) -> float:
    """ROUGE-L F (summary level), computed as the ``rouge`` package (1.0.1) LongBench uses does:
    both texts are cut into sentences at ``.`` and into words at spaces (no lower-casing, no
    stemming); the union of the words of each (reference sentence, prediction sentence) longest
    common subsequence is counted against the *distinct* words of each side (that package's
    default ``exclusive=True`` counts sets, not the word counts of Lin's definition);
    ``F = 2PR / (P + R + 1e-8)``. An empty text scores 0 (where the package raises and LongBench
    scores 0). Ours is a re-implementation, not the package: no dependency is added."""

    def sentences(text: str) -> list[str]:
        return [" ".join(s.split()) for s in text.split(".") if s]

    hyp, ref = sentences(prediction), sentences(reference)
    if not hyp or not ref:
        return 0.0
    hyp_words = [s.split(" ") for s in hyp]
    ref_words = [s.split(" ") for s in ref]
    union: set[str] = set()
    for r in ref_words:
        for h in hyp_words:
            union |= _lcs_items(r, h)
    p = len(union) / len({w for s in hyp_words for w in s})
    r = len(union) / len({w for s in ref_words for w in s})
    return 2 * p * r / (p + r + 1e-8)


def classification_score(prediction: str, reference: str, all_classes: Sequence[str] = (), **_: Any) -> float:
    """The class names found in the prediction (substring match) less those that are part of the
    reference without being it; ``1 / (number found)`` when the reference is among them, else 0.
    LongBench removes those names from the list it is iterating over, so that a second such name
    right after a first one stays in it; here every such name is removed."""
    found = [c for c in all_classes if c in prediction]
    found = [c for c in found if not (c in reference and c != reference)]
    return 1.0 / len(found) if reference in found else 0.0


def _numbers_score(prediction: str, expected: str) -> float:
    numbers = re.findall(r"\d+", prediction)
    return sum(n == expected for n in numbers) / len(numbers) if numbers else 0.0


def retrieval_score(prediction: str, reference: str, **_: Any) -> float:
    """The share of the numbers in the prediction that are the reference paragraph's number
    (``"Paragraph 12"`` -> ``12``)."""
    match = re.search(r"Paragraph (\d+)", reference)
    if match is None:
        raise ValueError(f"compresskv: a passage_retrieval answer names no 'Paragraph N': {reference!r}")
    return _numbers_score(prediction, match.group(1))


def count_score(prediction: str, reference: str, **_: Any) -> float:
    """The share of the numbers in the prediction that equal the reference count."""
    return _numbers_score(prediction, str(reference).strip())


def edit_similarity(a: str, b: str) -> float:
    """``fuzzywuzzy.fuzz.ratio(a, b) / 100`` as computed with ``python-Levenshtein`` installed:
    ``round(100 * 2 * LCS / (len(a) + len(b)))`` over characters (the InDel similarity), 1 for
    equal strings, 0 when one is empty. ``fuzzywuzzy`` without ``python-Levenshtein`` uses
    ``difflib``'s matching blocks instead, which can find fewer matches than the LCS."""
    if a == b:
        return 1.0
    if not a or not b:
        return 0.0
    common = _lcs_table(a, b)[len(a)][len(b)]
    return int(round(100 * 2 * common / (len(a) + len(b)))) / 100


def code_sim_score(prediction: str, reference: str, **_: Any) -> float:
    """:func:`edit_similarity` of the prediction's first line that is not a comment or a code
    fence (no ``#``, ``//`` or backtick; none: the empty line) and the reference line."""
    lines = prediction.lstrip("\n").split("\n")
    line = next((x for x in lines if "`" not in x and "#" not in x and "//" not in x), "")
    return edit_similarity(line, reference)


METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1_score, "rouge": rouge_score, "classification": classification_score,
    "retrieval": retrieval_score, "count": count_score, "code_sim": code_sim_score,
}
#: each task's metric (a key of :data:`METRICS`), as LongBench's ``eval.py`` assigns them
TASK_METRIC: dict[str, str] = {
    **dict.fromkeys(("narrativeqa", "qasper", "multifieldqa_en", "hotpotqa", "2wikimqa", "musique", "triviaqa"), "qa_f1"),
    **dict.fromkeys(("gov_report", "qmsum", "multi_news", "samsum"), "rouge"),
    "trec": "classification", "passage_retrieval_en": "retrieval", "passage_count": "count",
    "lcc": "code_sim", "repobench-p": "code_sim",
}


def longbench_score(task: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """LongBench's score of one answer in [0, 1]: the task's metric against each reference
    answer, the best kept (0 without answers); few-shot tasks score the first line only."""
    if task not in TASK_METRIC:
        raise ValueError(f"compresskv: unknown LongBench task {task!r}; choose one of {available_longbench_tasks()}")
    if task in FIRST_LINE:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = METRICS[TASK_METRIC[task]]
    return max((float(metric(prediction, ref, all_classes=all_classes or [])) for ref in answers), default=0.0)


# -- records and prompts ------------------------------------------------------------------------------
def available_longbench_tasks() -> list[str]:
    """The LongBench task names this module runs (without the ``longbench:`` prefix)."""
    return list(PROMPTS)


def is_longbench(name: str) -> bool:
    """Whether a bench task name (``longbench:qasper``, optionally with ``:after``) is a LongBench task."""
    return name.startswith(PREFIX) and name[len(PREFIX):].removesuffix(":after") in PROMPTS


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _from_hub(task: str) -> list[dict[str, Any]]:
    """The task's records from the hub: ``data.zip`` of ``THUDM/LongBench`` (``datasets`` >= 4
    refuses that repository's loading script), or ``datasets.load_dataset`` where that works."""
    import zipfile

    try:
        from huggingface_hub import hf_hub_download

        archive = hf_hub_download(HUB_REPO, "data.zip", repo_type="dataset")
        with zipfile.ZipFile(archive) as z:
            lines = z.read(f"data/{task}.jsonl").decode("utf-8").splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except Exception as hub_error:  # noqa: BLE001 - offline, or a layout change: try datasets
        try:
            import datasets

            return [dict(r) for r in datasets.load_dataset(HUB_REPO, task, split="test")]
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(
                f"compresskv: could not read LongBench task {task!r} from the hub ({hub_error}; datasets: {err}); "
                f"give a folder of <task>.jsonl files (--longbench-dir DIR or ${ENV_DIR})"
            ) from err


@functools.lru_cache(maxsize=32)
def _records(task: str, data_dir: str | None) -> tuple[dict[str, Any], ...]:
    if data_dir:
        path = Path(data_dir) / f"{task}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(f"compresskv: no LongBench file {str(path)!r} (a folder of <task>.jsonl files)")
        return tuple(_read_jsonl(path))
    return tuple(_from_hub(task))


def load_longbench(task: str, data_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """The records of LongBench task ``task`` (e.g. ``"qasper"``): ``data_dir/<task>.jsonl``
    (default ``$COMPRESSKV_LONGBENCH_DIR``), or else from the hub (needs network access)."""
    if task not in PROMPTS:
        raise ValueError(f"compresskv: unknown LongBench task {task!r}; choose one of {available_longbench_tasks()}")
    folder = data_dir if data_dir is not None else os.environ.get(ENV_DIR)
    return [dict(r) for r in _records(task, str(folder) if folder else None)]


def truncate_middle(tokenizer: Any, prompt: str, max_length: int) -> str:
    """LongBench's truncation: a prompt of more than ``max_length`` tokens becomes its first and
    last ``max_length // 2`` tokens, each decoded (special tokens skipped) and joined as text."""
    ids = list(tokenizer(prompt)["input_ids"])
    if len(ids) <= max_length:
        return prompt
    half = max_length // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True))


def build_prompt(tokenizer: Any, task: str, record: dict[str, Any], max_length: int) -> list[int]:
    """The token ids LongBench's ``pred.py`` feeds the model for ``record``: the task's template
    filled, truncated in the middle to ``max_length`` tokens, then in the chat template where
    the tokenizer has one (not for :data:`NO_CHAT` tasks, which are tokenized as they are)."""
    prompt = truncate_middle(tokenizer, PROMPTS[task].format(**record), max_length)
    if task not in NO_CHAT and getattr(tokenizer, "chat_template", None):
        return prompt_ids(tokenizer, prompt)
    return list(tokenizer(prompt)["input_ids"])


@dataclass
class LongBenchTask(Task):
    """One LongBench record as a bench task: :attr:`answers` are the reference answers and
    :meth:`score` is LongBench's metric for the task (best over the answers)."""

    all_classes: list[str] = field(default_factory=list)
    longbench_task: str = ""

    def score(self, text: str) -> float:
        """LongBench's score of ``text`` (:func:`longbench_score`), in [0, 1]."""
        return longbench_score(self.longbench_task, text, self.answers, self.all_classes)


def make_longbench_task(
    task: str, tokenizer: Any, max_length: int = 4096, index: int = 0, data_dir: str | Path | None = None
) -> LongBenchTask:
    """Record ``index`` of LongBench task ``task`` (``"qasper"``; ``"longbench:qasper"`` also
    works) as a :class:`LongBenchTask`, its prompt built by :func:`build_prompt`."""
    name = task.removeprefix(PREFIX)
    records = load_longbench(name, data_dir)
    if not 0 <= index < len(records):
        raise ValueError(f"compresskv: LongBench task {name!r} has {len(records)} records; no record {index} "
                         "(the bench's seeds index the records)")
    record = records[index]
    ids = build_prompt(tokenizer, name, record, max_length)
    answers = record.get("answers") or []
    if isinstance(answers, str):
        answers = [answers]
    info = {"_id": record.get("_id"), "length": record.get("length"), "language": record.get("language")}
    return LongBenchTask(
        name=PREFIX + name, input_ids=torch.tensor([ids]), answers=[str(a) for a in answers], needles=[], seed=index,
        max_new_tokens=MAX_NEW_TOKENS[name], target_length=max_length, info=info,
        all_classes=list(record.get("all_classes") or []), longbench_task=name,
    )
