"""Figures (needs matplotlib: ``pip install "sourcekit[plot]"``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["proponents_figure"]


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            'Figures need matplotlib. Install it with: pip install "sourcekit[plot]".'
        ) from err
    return plt


def _as_images(images: Any, name: str) -> np.ndarray:
    """Images as (n, h, w) grey or (n, h, w, 3) colour arrays, from the forms people pass."""
    if hasattr(images, "detach"):  # a torch tensor
        images = images.detach().cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 2:  # flat rows: a square of pixels each
        side = round(float(np.sqrt(images.shape[1])))
        if side * side != images.shape[1]:
            raise ValueError(
                f"The {name} are flat rows of {images.shape[1]} values, which is not a square "
                "number of pixels; pass images of shape (n, h, w) or (n, c, h, w)."
            )
        return images.reshape(len(images), side, side)
    if images.ndim == 3:
        return images
    if images.ndim == 4:
        if images.shape[1] in (1, 3) and images.shape[-1] not in (1, 3):
            images = np.moveaxis(images, 1, -1)  # PyTorch's channels first
        if images.shape[-1] == 1:
            return images[..., 0]
        if images.shape[-1] == 3:
            low, high = float(images.min()), float(images.max())
            return (images - low) / (high - low) if high > low else np.zeros_like(images)
    raise ValueError(
        f"The {name} have shape {images.shape}; pass images of shape (n, h, w), (n, 1, h, w), "
        "(n, 3, h, w), (n, h, w, 3) or flat rows (n, s*s)."
    )


def proponents_figure(
    query_images: np.ndarray,
    train_images: np.ndarray,
    scores: np.ndarray,
    path: str | Path,
    *,
    k: int = 5,
    query_titles: Sequence[str] | None = None,
    train_labels: Sequence[int] | np.ndarray | None = None,
) -> Path:
    """Draw each query image beside its top-k proponents and opponents, and save a PNG.

    Parameters
    ----------
    query_images : array of shape (n_queries, h, w), (n_queries, c, h, w) or (n_queries, d)
        Images as arrays or tensors: grey (h, w), PyTorch's channels-first (1, h, w) or
        (3, h, w), channels-last (h, w, 3), or flat rows of d = s² pixels (shown as s x s).
    train_images : array of shape (n_train, ...)
        The training images, in any of the same forms.
    scores : array of shape (n_queries, n_train)
        An attributor's scores for these queries.
    path : str or Path
        Where to write the PNG (parent directories are created).
    k : int
        Proponents and opponents per query.
    query_titles : list of str, optional
        A title per query row (e.g. its label and prediction).
    train_labels : array of int, optional
        Shown above each training image with its score.

    Returns
    -------
    Path
        The path written.

    Examples
    --------
    >>> import numpy as np, tempfile, pathlib
    >>> from sourcekit.plotting import proponents_figure
    >>> rng = np.random.default_rng(0)
    >>> out = proponents_figure(rng.random((2, 8, 8)), rng.random((20, 8, 8)),
    ...                         rng.normal(size=(2, 20)), pathlib.Path(tempfile.mkdtemp()) / "f.png", k=2)
    >>> out.exists()
    True
    """
    plt = _pyplot()
    scores = np.asarray(scores)
    n_queries = scores.shape[0]
    query_images = _as_images(query_images, "query_images")
    train_images = _as_images(train_images, "train_images")
    if len(query_images) < n_queries or len(train_images) < scores.shape[1]:
        raise ValueError(
            f"The scores have shape {scores.shape}, but there are {len(query_images)} query "
            f"images and {len(train_images)} training images; pass one image per row and per "
            "column of the scores."
        )
    fig, axes = plt.subplots(
        n_queries, 2 * k + 1, figsize=(1.3 * (2 * k + 1), 1.6 * n_queries), squeeze=False
    )
    for q in range(n_queries):
        order = np.argsort(-scores[q], kind="stable")
        columns = [("query", None, query_images[q])]
        columns += [("+", m, train_images[m]) for m in order[:k]]
        columns += [("-", m, train_images[m]) for m in order[::-1][:k]]
        for ax, (kind, m, image) in zip(axes[q], columns, strict=True):
            ax.imshow(image, cmap="gray_r" if image.ndim == 2 else None)
            ax.set_xticks([])
            ax.set_yticks([])
            if m is None:
                ax.set_title(query_titles[q] if query_titles else f"query {q}", fontsize=8)
                continue
            label = "" if train_labels is None else f"{int(train_labels[m])}: "
            color = "tab:green" if kind == "+" else "tab:red"
            ax.set_title(f"{label}{scores[q, m]:+.1e}", fontsize=7, color=color)
    fig.suptitle(
        f"each query, its {k} strongest proponents (green) and opponents (red)", fontsize=9
    )
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
