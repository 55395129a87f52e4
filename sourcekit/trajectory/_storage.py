"""Where a trajectory's checkpoints live: in memory, or in the files of a saved directory.

A checkpoint is a plain dict of tensors saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``: loading never runs code from the file. Every file of
a saved trajectory has its sha256 in the manifest and is verified when read
(:func:`load_tensors`). The layout of a saved directory, and the code that writes it and
reads its manifest, are in :mod:`sourcekit.trajectory._format`; the stores here read
its checkpoint files one at a time, when they are used.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..exceptions import TrajectoryError
from ._architecture import check_fits, shape_summary, state_shapes

__all__ = ["Checkpoint", "DirectoryStore", "MemoryStore", "load_tensors", "sha256_file"]


@dataclass
class Checkpoint:
    """The state of training just before the update of global step ``step``.

    ``params`` and ``buffers`` map the model's names to tensors; ``optimizer`` holds what
    the optimiser had accumulated: for Adam and AdamW ``"step"`` and the moments
    ``"exp_avg"`` and ``"exp_avg_sq"``, for SGD with momentum ``"momentum_buffer"``,
    nothing for plain SGD.


    Examples
    --------
    >>> import torch
    >>> from sourcekit import Examples, OptimizerSpec, TrainingStage, train
    >>> data = Examples(torch.randn(20, 3), torch.randint(0, 2, (20,)))
    >>> stage = TrainingStage(OptimizerSpec("sgd", lr=0.1, momentum=0.9), epochs=2, batch_size=5)
    >>> trajectory = train(torch.nn.Linear(3, 2), data, [stage], progress=False)
    >>> checkpoint = trajectory.checkpoint(trajectory.checkpoint_steps[-1])
    >>> checkpoint.step, sorted(checkpoint.params), sorted(checkpoint.optimizer)
    (7, ['bias', 'weight'], ['momentum_buffer'])
    """

    step: int
    params: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)
    optimizer: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "params": self.params,
            "buffers": self.buffers,
            "optimizer": self.optimizer,
        }

    @classmethod
    def from_payload(cls, payload: Any, where: str) -> Checkpoint:
        if not isinstance(payload, dict) or not isinstance(payload.get("params"), dict):
            raise TrajectoryError(
                f"The checkpoint file {where} does not hold a sourcekit checkpoint (a dict with "
                "'params'). Save trajectories with Trajectory.save."
            )
        return cls(
            step=int(payload.get("step", -1)),
            params=dict(payload["params"]),
            buffers=dict(payload.get("buffers", {})),
            optimizer=dict(payload.get("optimizer", {})),
        )

    def digest(self) -> str:
        """A sha256 of every tensor and value in the checkpoint, in name order."""
        h = hashlib.sha256()
        _hash_into(h, self.to_payload())
        return h.hexdigest()


def _hash_into(h: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{tuple(t.shape)}{t.dtype}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            h.update(f"K{key}".encode())
            _hash_into(h, value[key])
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)}".encode())
        for item in value:
            _hash_into(h, item)
    else:
        h.update(f"V{value!r}".encode())


def hash_value(value: Any) -> str:
    """sha256 of nested dicts/lists of tensors and plain values."""
    h = hashlib.sha256()
    _hash_into(h, value)
    return h.hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_tensors(path: Path, expected_sha256: str | None, what: str) -> Any:
    """Read a tensor file after checking it exists and matches its manifest hash.

    Refuses files that would need arbitrary objects unpickled.
    """
    if not path.is_file():
        raise TrajectoryError(
            f"The {what} file {str(path)!r} is missing. The trajectory directory is incomplete: "
            "copy the whole directory, or record and save the run again."
        )
    if expected_sha256 is not None:
        actual = sha256_file(path)
        if actual != expected_sha256:
            raise TrajectoryError(
                f"The {what} file {str(path)!r} has sha256 {actual[:12]}..., but the manifest "
                f"records {expected_sha256[:12]}...: the file was modified or corrupted. Restore "
                "it from the original save, or record the run again."
            )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError) as err:
        raise TrajectoryError(
            f"The {what} file {str(path)!r} was refused: it cannot be read as plain tensors "
            f"without unpickling arbitrary objects ({type(err).__name__}). sourcekit only loads "
            "files written by Trajectory.save; never load files from untrusted sources."
        ) from err


class MemoryStore:
    """Checkpoints held in memory (CPU tensors), as recorded."""

    def __init__(self, checkpoints: dict[int, Checkpoint] | None = None) -> None:
        self._checkpoints: dict[int, Checkpoint] = dict(checkpoints or {})

    def steps(self) -> list[int]:
        return sorted(self._checkpoints)

    def put(self, checkpoint: Checkpoint) -> None:
        self._checkpoints[checkpoint.step] = checkpoint

    def get(self, step: int) -> Checkpoint:
        return self._checkpoints[step]

    def digest(self, step: int) -> str:
        return self._checkpoints[step].digest()

    def check_fits(self, model: nn.Module, architecture: str) -> None:
        """Raise unless the initial state fits ``model`` (the architecture described)."""
        initial = self.get(0)
        check_fits(initial.params, initial.buffers, model, "at step 0")

    def verify(self) -> list[str]:
        """Problems of the stored files: none in memory."""
        return []

    def located_at(self, directory: Path) -> bool:
        """Whether the checkpoints are the files of ``directory`` (never in memory)."""
        return False


class DirectoryStore:
    """Checkpoints in files under a saved trajectory's directory, read one at a time.

    ``root`` is made absolute, so that a trajectory loaded from a relative path keeps
    working after the working directory changes (or in another process, once pickled).
    ``shapes`` are the parameter and buffer shapes the manifest records.
    """

    def __init__(
        self,
        root: Path,
        files: dict[int, tuple[str, str, str]],
        shapes: dict[str, tuple[int, ...]],
    ) -> None:
        self.root = Path(root).resolve()
        self._files = dict(files)  # step -> (relative path, file sha256, content digest)
        self.shapes = {name: tuple(int(d) for d in shape) for name, shape in shapes.items()}

    def steps(self) -> list[int]:
        return sorted(self._files)

    def _check_root(self) -> None:
        if not self.root.is_dir():
            raise TrajectoryError(
                f"The trajectory directory {str(self.root)!r} no longer exists: it was moved or "
                "deleted after the trajectory was loaded. Load it again from where it is now "
                "(Trajectory.load), and fit the attributor to that trajectory."
            )

    def get(self, step: int) -> Checkpoint:
        self._check_root()
        rel, sha, _ = self._files[step]
        payload = load_tensors(self.root / rel, sha, f"checkpoint (step {step})")
        checkpoint = Checkpoint.from_payload(payload, repr(str(self.root / rel)))
        checkpoint.step = step
        return checkpoint

    def digest(self, step: int) -> str:
        return self._files[step][2]

    def check_fits(self, model: nn.Module, architecture: str) -> None:
        """Raise unless the recorded shapes are those of ``model`` (the architecture described)."""
        expected = state_shapes(model)
        if self.shapes != expected:
            raise TrajectoryError(
                f"The checkpoints of this trajectory do not fit the architecture {architecture}: "
                f"the manifest records parameters {shape_summary(self.shapes)} but the model has "
                f"{shape_summary(expected)}. Pass the architecture the run was recorded with."
            )

    def verify(self) -> list[str]:
        """Every checkpoint file that is missing or differs from its recorded sha256."""
        self._check_root()
        problems = []
        for step in self.steps():
            rel, sha, _ = self._files[step]
            path = self.root / rel
            if not path.is_file():
                problems.append(f"step {step}: {rel} is missing")
            elif sha256_file(path) != sha:
                problems.append(f"step {step}: {rel} was modified (its sha256 differs)")
        return problems

    def located_at(self, directory: Path) -> bool:
        """Whether the checkpoints are the files of ``directory``."""
        return self.root == Path(directory).resolve()
