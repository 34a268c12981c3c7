"""Evaluation: long-context tasks generated locally (in the spirit of RULER), long-text
perplexity with the prefix in the cache, memory and speed, always against ``DynamicCache`` in
the same run; the ``compresskv bench`` driver that writes JSON lines, a table and a plot; and
scoring continuations against a compressed context (:func:`score_continuation`, for lm-eval's
``loglikelihood`` requests); LongBench (v1) tasks from local JSON lines or the hub (``longbench:TASK``
in ``compresskv bench``); and the ``compresskv`` model of lm-evaluation-harness
(``compresskv.eval.harness``, imported on its own: it needs lm-eval). See docs/evaluations.md."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._lazy import lazy_exports

_EXPORTS = {
    "BenchConfig": "bench",
    "aggregate": "bench",
    "plot": "plots",
    "run_bench": "bench",
    "table_markdown": "bench",
    "frontier_picks": "frontier",
    "pareto_front": "frontier",
    "PeakMemory": "measure",
    "cache_nbytes": "measure",
    "run_task": "measure",
    "machine_info": "machine",
    "LongBenchTask": "longbench",
    "available_longbench_tasks": "longbench",
    "load_longbench": "longbench",
    "longbench_score": "longbench",
    "make_longbench_task": "longbench",
    "score_continuation": "loglikelihood",
    "score_continuations": "loglikelihood",
    "MethodBuilder": "methods",
    "NeedleTask": "needle",
    "dynamic_cache_nbytes": "needle",
    "make_needle_task": "needle",
    "run_needle": "needle",
    "PerplexityTask": "perplexity",
    "load_text": "perplexity",
    "make_perplexity_task": "perplexity",
    "run_perplexity": "perplexity",
    "Task": "tasks",
    "available_tasks": "tasks",
    "make_task": "tasks",
    "score_all": "tasks",
}

if TYPE_CHECKING:  # what static tools see
    from .bench import BenchConfig, aggregate, run_bench, table_markdown
    from .frontier import frontier_picks, pareto_front
    from .measure import PeakMemory, cache_nbytes, run_task
    from .machine import machine_info
    from .longbench import (LongBenchTask, available_longbench_tasks, load_longbench, longbench_score,
                            make_longbench_task)
    from .loglikelihood import score_continuation, score_continuations
    from .methods import MethodBuilder
    from .needle import NeedleTask, dynamic_cache_nbytes, make_needle_task, run_needle
    from .perplexity import PerplexityTask, load_text, make_perplexity_task, run_perplexity
    from .plots import plot
    from .tasks import Task, available_tasks, make_task, score_all

__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)

__all__ = [
    "BenchConfig",
    "LongBenchTask",
    "MethodBuilder",
    "NeedleTask",
    "PeakMemory",
    "PerplexityTask",
    "Task",
    "aggregate",
    "available_longbench_tasks",
    "available_tasks",
    "cache_nbytes",
    "dynamic_cache_nbytes",
    "frontier_picks",
    "load_longbench",
    "load_text",
    "longbench_score",
    "machine_info",
    "make_longbench_task",
    "make_needle_task",
    "make_perplexity_task",
    "make_task",
    "pareto_front",
    "plot",
    "run_bench",
    "run_needle",
    "run_perplexity",
    "run_task",
    "score_all",
    "score_continuation",
    "score_continuations",
    "table_markdown",
]
