"""The on-disk cache of counterfactual retrainings: one file per (subset, seed).

A file holds the measurements (and, for classifiers, the predicted classes) of the
queries at the final model of one retraining. Its name is a sha256 of what determines
the result: the run (the trajectory's fingerprint, or the name of a user's retraining
function), the kept examples (the mask's bits), the seed and the queries' fingerprint.
Files are written to a temporary name and renamed into place, so an interrupted run
leaves only complete files and a rerun resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

__all__ = ["CACHE_VERSION", "RetrainingCache"]

CACHE_VERSION = 1


class RetrainingCache:
    """Finished retrainings under ``directory`` (created when first written)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.directory = Path(directory)

    @staticmethod
    def key(run: str, keep: np.ndarray, seed: int, queries: str) -> str:
        """The file stem of one retraining."""
        header = {"version": CACHE_VERSION, "run": run, "n_train": int(keep.size)}
        header.update({"seed": int(seed), "queries": queries})
        digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
        digest.update(np.packbits(keep.astype(bool)).tobytes())
        return digest.hexdigest()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.npz"

    def load(
        self, key: str, keep: np.ndarray, seed: int
    ) -> tuple[np.ndarray, np.ndarray | None] | None:
        """The cached (measurements, predictions) of ``key``, or None if absent or unreadable."""
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as data:
                if int(data["seed"]) != int(seed) or not np.array_equal(data["keep"], keep):
                    return None
                measurements = data["measurements"]
                predictions = data["predictions"] if "predictions" in data.files else None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
            return None  # a damaged file is recomputed and replaced
        return measurements, predictions

    def save(
        self,
        key: str,
        keep: np.ndarray,
        seed: int,
        measurements: np.ndarray,
        predictions: np.ndarray | None,
    ) -> None:
        """Write one retraining's results atomically (temporary file, then rename)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        arrays = {"keep": keep, "seed": np.int64(seed), "measurements": measurements}
        if predictions is not None:
            arrays["predictions"] = predictions
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, **arrays)
            os.replace(tmp, self.path(key))
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
