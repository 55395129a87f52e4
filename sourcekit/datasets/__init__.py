"""Embedded tasks with their training recipes (no downloads)."""

from ._digits import RECIPES, DigitsTask, load_digits_task, make_digits_mlp
from ._text import TEXT_RECIPES, NextTokenModel, TextTask, load_text_task

__all__ = [
    "RECIPES",
    "TEXT_RECIPES",
    "DigitsTask",
    "NextTokenModel",
    "TextTask",
    "load_digits_task",
    "load_text_task",
    "make_digits_mlp",
]
