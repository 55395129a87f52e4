"""Embedded tasks with their training recipes (no downloads)."""

from ._digits import RECIPES, DigitsTask, load_digits_task, make_digits_mlp

__all__ = ["RECIPES", "DigitsTask", "load_digits_task", "make_digits_mlp"]
