"""Collection settings for the doctests under sourcekit/: the modules of the optional
trainer integrations import their trainer package, so their doctests are collected only
where it is installed (``pip install -e ".[hf]"`` / ``".[lightning]"``)."""

from __future__ import annotations

import importlib.util

collect_ignore: list[str] = []
if importlib.util.find_spec("transformers") is None:
    collect_ignore.append("sourcekit/integrations/hf.py")
if (
    importlib.util.find_spec("pytorch_lightning") is None
    and importlib.util.find_spec("lightning") is None
):
    collect_ignore.append("sourcekit/integrations/lightning.py")
