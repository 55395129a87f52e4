"""Saving and loading trajectories: the only trajectory code that touches disk.

A saved trajectory is a directory: ``manifest.json`` (format version, architecture
factory and parameter shapes, loss and measurement names, stages, checkpoint steps,
every file with its sha256, the content fingerprint), ``data.pt`` (training inputs and
targets), ``schedule.pt`` (learning rates, stage examples, batch indices) and one file
per checkpoint under ``checkpoints/``. Tensor files are read with
``torch.load(weights_only=True)`` after their sha256 is checked.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..exceptions import TrajectoryError
from ..objectives import LOSSES, MEASUREMENTS, function_spec
from ._architecture import Architecture
from ._examples import Examples
from ._storage import DirectoryStore, load_tensors, sha256_file
from ._trajectory import FORMAT_VERSION, Stage, Trajectory

__all__ = ["load_trajectory", "save_trajectory"]

_MANIFEST = "manifest.json"


def save_trajectory(
    trajectory: Trajectory, directory: str | os.PathLike, *, overwrite: bool = False
) -> Path:
    """Write ``trajectory`` to ``directory`` (see :meth:`Trajectory.save`)."""
    target = Path(directory)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not overwrite:
        raise FileExistsError(
            f"The directory {str(target)!r} already exists and is not empty; Trajectory.save "
            "never replaces it silently. Choose a new directory or pass overwrite=True."
        )
    architecture = trajectory.architecture.spec()
    if architecture is None:
        raise TrajectoryError(
            f"This trajectory cannot be saved: its architecture ({trajectory.architecture.describe()}) "
            "has no importable name. Record it with architecture='package.module:factory' "
            "(a function returning the model, with JSON keyword arguments)."
        )
    functions = {}
    for what, spec, registry in (
        ("loss", trajectory.loss_spec, LOSSES),
        ("measurement", trajectory.measurement_spec, MEASUREMENTS),
    ):
        functions[what] = function_spec(spec, registry)
        if functions[what] is None:
            raise TrajectoryError(
                f"This trajectory cannot be saved: its {what} function has no importable name. "
                f"Use a built-in name or a module-level function for {what}=..."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        files: dict[str, dict[str, str]] = {}
        for name, payload in (
            ("data", {"inputs": trajectory.train.inputs, "targets": trajectory.train.targets}),
            ("schedule", trajectory._schedule_payload()),
        ):
            path = staging / f"{name}.pt"
            torch.save(payload, path)
            files[name] = {"file": path.name, "sha256": sha256_file(path)}
        (staging / "checkpoints").mkdir()
        checkpoints: list[dict[str, Any]] = []
        for step in trajectory.stored_steps:
            state = trajectory.checkpoint(step)
            rel = f"checkpoints/step_{step:08d}.pt"
            torch.save(state.to_payload(), staging / rel)
            checkpoints.append(
                {
                    "step": step,
                    "file": rel,
                    "sha256": sha256_file(staging / rel),
                    "digest": trajectory._store.digest(step),
                }
            )
        manifest = {
            "format": "sourcekit.trajectory",
            "version": FORMAT_VERSION,
            "architecture": architecture,
            "param_shapes": {k: list(v) for k, v in trajectory._param_shapes.items()},
            "loss": functions["loss"],
            "measurement": functions["measurement"],
            "train_mode": trajectory.train_mode,
            **(
                {}
                if trajectory.random_states is None
                else {"random_device": trajectory.random_states.device}
            ),
            "n_train": trajectory.n_train,
            "n_steps": trajectory.n_steps,
            "has_batches": trajectory.has_batches,
            "stages": [s.describe() for s in trajectory.stages],
            "checkpoint_steps": list(trajectory.checkpoint_steps),
            "checkpoints": checkpoints,
            "files": files,
            "fingerprint": trajectory.fingerprint,
        }
        (staging / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():
            backup = Path(tempfile.mkdtemp(prefix=f".{target.name}.old.", dir=target.parent))
            backup.rmdir()
            target.rename(backup)
            staging.rename(target)
            if backup.is_dir():
                shutil.rmtree(backup)
            else:  # overwrite=True replaces a file as well
                backup.unlink()
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if (
        isinstance(trajectory._store, DirectoryStore)
        and trajectory._store.root.resolve() == target.resolve()
    ):
        trajectory._store = DirectoryStore(
            target,
            {
                int(c["step"]): (str(c["file"]), str(c["sha256"]), str(c["digest"]))
                for c in checkpoints
            },
        )
    return target


def load_trajectory(
    directory: str | os.PathLike,
    *,
    architecture: Any = None,
    loss: str | Callable | None = None,
    measurement: str | Callable | None = None,
) -> Trajectory:
    """Read a trajectory saved with :func:`save_trajectory` (see :meth:`Trajectory.load`)."""
    root = Path(directory)
    manifest_path = root / _MANIFEST
    if not root.is_dir():
        raise TrajectoryError(
            f"The trajectory directory {str(root)!r} does not exist. Pass the directory given "
            "to Trajectory.save (it holds manifest.json)."
        )
    if not manifest_path.is_file():
        raise TrajectoryError(
            f"The directory {str(root)!r} has no manifest.json, so it is not a saved trajectory "
            "(or it is incomplete). Pass the directory given to Trajectory.save."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise TrajectoryError(
            f"The manifest {str(manifest_path)!r} is not valid JSON ({err}); the directory is "
            "corrupt. Restore it from the original save."
        ) from err
    if not isinstance(manifest, dict) or manifest.get("format") != "sourcekit.trajectory":
        raise TrajectoryError(
            f"The manifest {str(manifest_path)!r} is not a sourcekit trajectory manifest."
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise TrajectoryError(
            f"The trajectory at {str(root)!r} has format version {manifest.get('version')!r}; "
            f"this sourcekit reads version {FORMAT_VERSION}."
        )
    try:
        files = manifest["files"]
        data = load_tensors(root / files["data"]["file"], files["data"]["sha256"], "training data")
        schedule = load_tensors(
            root / files["schedule"]["file"], files["schedule"]["sha256"], "schedule"
        )
        stages = [
            Stage.from_description(desc, schedule, i) for i, desc in enumerate(manifest["stages"])
        ]
        batches = None
        if manifest.get("has_batches"):
            offsets = schedule["batch_offsets"].numpy()
            indices = schedule["batch_indices"].numpy()
            batches = [indices[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]
        store = DirectoryStore(
            root,
            {
                int(c["step"]): (c["file"], c["sha256"], c["digest"])
                for c in manifest["checkpoints"]
            },
        )
        arch = architecture
        if arch is None:
            arch = Architecture(
                manifest["architecture"]["factory"], manifest["architecture"]["kwargs"]
            )
        return Trajectory(
            architecture=arch,
            train=Examples(data["inputs"], data["targets"]),
            stages=stages,
            learning_rates=schedule["learning_rates"].numpy(),
            batches=batches,
            checkpoints=store,
            checkpoint_steps=manifest["checkpoint_steps"],
            loss=manifest["loss"] if loss is None else loss,
            measurement=manifest["measurement"] if measurement is None else measurement,
            train_mode=manifest.get("train_mode", True),
            **Trajectory._step_records(schedule, manifest.get("random_device")),
            _fingerprint=manifest["fingerprint"]
            if architecture is None and loss is None and measurement is None
            else None,
            _param_shapes=manifest["param_shapes"],
        )
    except (KeyError, TypeError) as err:
        raise TrajectoryError(
            f"The manifest {str(manifest_path)!r} is incomplete or malformed (missing {err}). "
            "Restore the directory from the original save."
        ) from err
