"""Evaluation: long-context tasks generated locally, scored against DynamicCache in the same run."""

from .needle import NeedleTask, make_needle_task, run_needle

__all__ = ["NeedleTask", "make_needle_task", "run_needle"]
