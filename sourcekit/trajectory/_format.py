"""The saved form of a trajectory: its layout, its version, its writer and its reader.

A saved trajectory is a directory:

- ``manifest.json``: the format name and version, the architecture factory and the
  shapes of its parameters and buffers, the loss and measurement names, the stages,
  the checkpoint steps, every file with its sha256, and the content fingerprint;
- ``data.pt``: the training inputs and targets;
- ``schedule.pt``: the learning rate of every step, each stage's examples, the batch
  indices of every step, and where the run had them the per-step settings of each
  parameter group, the clipping of every step and the generator states of random
  forward passes (:func:`schedule_payload`, also what the fingerprint hashes);
- ``checkpoints/step_XXXXXXXX.pt``: one file per stored state.

Tensor files are read with ``torch.load(weights_only=True)`` after their sha256 is
checked (:func:`~sourcekit.trajectory._storage.load_tensors`); checkpoints are read when
used, through a :class:`~sourcekit.trajectory._storage.DirectoryStore`.

:func:`write_trajectory` and :func:`read_trajectory` are the two ends
(:meth:`Trajectory.save <sourcekit.Trajectory.save>` and
:meth:`Trajectory.load <sourcekit.Trajectory.load>` call them). The reader returns the
constructor arguments of the run it found, never a trajectory: this module imports
nothing of ``Trajectory`` and the class imports it, in one direction.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from ..exceptions import TrajectoryError
from ..objectives import LOSSES, MEASUREMENTS, function_spec
from ._architecture import Architecture
from ._examples import Examples
from ._optimizer import OptimizerSpec
from ._settings import GradientClipping, ParameterGroup, RandomStates
from ._stages import Stage
from ._storage import Checkpoint, DirectoryStore, load_tensors, sha256_file

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "MANIFEST",
    "SavedRun",
    "is_saved_trajectory",
    "read_trajectory",
    "schedule_payload",
    "write_trajectory",
]

FORMAT = "sourcekit.trajectory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


_CLIPPING = ("max_norm", "norm_type", "coefficient")


def schedule_payload(
    learning_rates: np.ndarray,
    stages: Sequence[Stage],
    batches: Sequence[np.ndarray] | None,
    clipping: GradientClipping | None = None,
    random_states: RandomStates | None = None,
) -> dict[str, torch.Tensor]:
    """The schedule as tensors: learning rates, each stage's examples, the batch indices,
    and the per-step records a run may hold (group settings, clipping, random states)."""
    payload = {"learning_rates": torch.from_numpy(learning_rates.copy())}
    for i, stage in enumerate(stages):
        payload[f"stage_examples.{i}"] = torch.from_numpy(stage.examples.copy())
    if batches is not None:
        lengths = np.array([b.size for b in batches], dtype=np.int64)
        payload["batch_offsets"] = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]))
        payload["batch_indices"] = torch.from_numpy(np.concatenate(batches))
    for i, stage in enumerate(stages):
        for j, group in enumerate(stage.groups or ()):
            for key, values in group.schedule.items():
                payload[f"stage.{i}.group.{j}.{key}"] = torch.from_numpy(values.copy())
    if clipping is not None:
        for name in _CLIPPING:
            payload[f"clipping.{name}"] = torch.from_numpy(getattr(clipping, name).copy())
    if random_states is not None:
        payload["random.steps"] = torch.from_numpy(random_states.steps.copy())
        payload["random.states"] = random_states.states.clone()
    return payload


def _stage_groups(
    description: dict[str, Any], schedule: dict[str, torch.Tensor], index: int
) -> tuple[ParameterGroup, ...] | None:
    """The parameter groups of saved stage ``index``: the manifest's description and the
    per-step settings from the schedule file."""
    if description.get("groups") is None:
        return None
    return tuple(
        ParameterGroup(
            tuple(g["parameters"]),
            OptimizerSpec.from_dict(g["optimizer"]),
            {key: schedule[f"stage.{index}.group.{j}.{key}"].numpy() for key in g["scheduled"]},
        )
        for j, g in enumerate(description["groups"])
    )


def _step_records(schedule: dict[str, torch.Tensor], random_device: str | None) -> dict[str, Any]:
    """The clipping and random states of a saved schedule (None where it holds none)."""
    clipping = None
    if "clipping.coefficient" in schedule:
        clipping = GradientClipping(*(schedule[f"clipping.{n}"].numpy() for n in _CLIPPING))
    random_states = None
    if "random.steps" in schedule:
        random_states = RandomStates(
            str(random_device or "cpu"),
            schedule["random.steps"].numpy(),
            schedule["random.states"],
        )
    return {"clipping": clipping, "random_states": random_states}


class _Store(Protocol):
    def steps(self) -> list[int]: ...
    def get(self, step: int) -> Checkpoint: ...
    def digest(self, step: int) -> str: ...


class _Run(Protocol):
    """What the writer reads of a trajectory (all public attributes of ``Trajectory``)."""

    architecture: Architecture
    train: Examples
    stages: tuple[Stage, ...]
    learning_rates: np.ndarray
    batches: tuple[np.ndarray, ...] | None
    checkpoint_steps: tuple[int, ...]
    loss_spec: str | Callable
    measurement_spec: str | Callable
    train_mode: bool
    n_steps: int
    clipping: GradientClipping | None
    random_states: RandomStates | None

    @property
    def n_train(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...


def is_saved_trajectory(directory: Path) -> bool:
    """Whether ``directory`` holds a manifest of this format (of any version)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _check_target(target: Path, overwrite: bool) -> None:
    """Refuse to write over anything but an empty directory or, with ``overwrite``, a
    previous save."""
    if not target.exists() and not target.is_symlink():
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    if not overwrite:
        what = "directory" if target.is_dir() else "path"
        raise FileExistsError(
            f"The {what} {str(target)!r} already exists and is not empty; Trajectory.save "
            "never replaces it silently. Choose a new directory, or pass overwrite=True to "
            "replace a trajectory saved there before."
        )
    if not target.is_dir() or target.is_symlink() or not is_saved_trajectory(target):
        found = "a file" if not target.is_dir() else "a directory without a trajectory manifest"
        raise FileExistsError(
            f"{str(target)!r} is {found}. Trajectory.save(overwrite=True) replaces only a "
            f"directory written by Trajectory.save (one holding a {MANIFEST} of a sourcekit "
            "trajectory), never other files. Choose a new directory, or remove it yourself."
        )


def _fresh_directory(parent: Path, prefix: str) -> Path:
    """A new, empty directory in ``parent``, with the permissions the umask gives."""
    while True:
        path = parent / f"{prefix}{secrets.token_hex(4)}"
        try:
            os.mkdir(path)  # mode 0o777 less the umask, like any directory the user makes
        except FileExistsError:
            continue
        return path


def _importable_specs(run: _Run) -> tuple[dict[str, Any], dict[str, Any]]:
    architecture = run.architecture.spec()
    if architecture is None:
        raise TrajectoryError(
            f"This trajectory cannot be saved: its architecture ({run.architecture.describe()}) "
            "has no importable name. Record it with architecture='package.module:factory' "
            "(a function returning the model, with JSON keyword arguments)."
        )
    functions = {}
    for what, spec, registry in (
        ("loss", run.loss_spec, LOSSES),
        ("measurement", run.measurement_spec, MEASUREMENTS),
    ):
        name = function_spec(spec, registry)
        if name is None:
            raise TrajectoryError(
                f"This trajectory cannot be saved: its {what} function has no importable name. "
                f"Use a built-in name or a module-level function for {what}=..."
            )
        functions[what] = name
    return architecture, functions


def write_trajectory(
    run: _Run,
    store: _Store,
    parameter_shapes: dict[str, tuple[int, ...]],
    directory: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> DirectoryStore:
    """Write ``run`` (its checkpoints read from ``store``) to ``directory``.

    The content is written to a new directory beside the target first and renamed into
    place, so a failed save leaves what was there intact. Returns the store of the
    written checkpoints (see :meth:`Trajectory.save <sourcekit.Trajectory.save>`).
    """
    target = Path(directory)
    _check_target(target, overwrite)
    architecture, functions = _importable_specs(run)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _fresh_directory(target.parent, f".{target.name}.")
    try:
        files: dict[str, dict[str, str]] = {}
        for name, payload in (
            ("data", {"inputs": run.train.inputs, "targets": run.train.targets}),
            (
                "schedule",
                schedule_payload(
                    run.learning_rates, run.stages, run.batches, run.clipping, run.random_states
                ),
            ),
        ):
            path = staging / f"{name}.pt"
            torch.save(payload, path)
            files[name] = {"file": path.name, "sha256": sha256_file(path)}
        (staging / "checkpoints").mkdir()
        checkpoints: list[dict[str, Any]] = []
        for step in store.steps():
            rel = f"checkpoints/step_{step:08d}.pt"
            torch.save(store.get(step).to_payload(), staging / rel)
            checkpoints.append(
                {
                    "step": step,
                    "file": rel,
                    "sha256": sha256_file(staging / rel),
                    "digest": store.digest(step),
                }
            )
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "architecture": architecture,
            "param_shapes": {k: list(v) for k, v in parameter_shapes.items()},
            "loss": functions["loss"],
            "measurement": functions["measurement"],
            "train_mode": run.train_mode,
            **({} if run.random_states is None else {"random_device": run.random_states.device}),
            "n_train": run.n_train,
            "n_steps": run.n_steps,
            "has_batches": run.batches is not None,
            "stages": [s.describe() for s in run.stages],
            "checkpoint_steps": list(run.checkpoint_steps),
            "checkpoints": checkpoints,
            "files": files,
            "fingerprint": run.fingerprint,
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if target.exists():  # an empty directory, or a previous save (overwrite=True)
            backup = _fresh_directory(target.parent, f".{target.name}.old.")
            backup.rmdir()
            target.rename(backup)
            staging.rename(target)
            shutil.rmtree(backup)
        else:
            staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return _checkpoint_store(target, checkpoints, parameter_shapes)


def _checkpoint_store(
    root: Path, checkpoints: list[dict[str, Any]], shapes: dict[str, Any]
) -> DirectoryStore:
    files = {
        int(c["step"]): (str(c["file"]), str(c["sha256"]), str(c["digest"])) for c in checkpoints
    }
    return DirectoryStore(root, files, shapes)


@dataclass
class SavedRun:
    """What :func:`read_trajectory` found: the ``Trajectory`` constructor arguments, and
    the fingerprint the manifest records (None when an override makes it another run)."""

    arguments: dict[str, Any]
    fingerprint: str | None


def _read_manifest(root: Path) -> dict[str, Any]:
    manifest_path = root / MANIFEST
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
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise TrajectoryError(
            f"The manifest {str(manifest_path)!r} is not a sourcekit trajectory manifest."
        )
    if manifest.get("version") != FORMAT_VERSION:
        raise TrajectoryError(
            f"The trajectory at {str(root)!r} has format version {manifest.get('version')!r}; "
            f"this sourcekit reads version {FORMAT_VERSION}."
        )
    return manifest


def read_trajectory(
    directory: str | os.PathLike,
    *,
    architecture: Any = None,
    loss: str | Callable | None = None,
    measurement: str | Callable | None = None,
) -> SavedRun:
    """Read the manifest, the training data and the schedule of a saved trajectory.

    The directory's path is made absolute here, so that the checkpoints, read later,
    are found whatever the working directory is then. ``architecture``, ``loss`` and
    ``measurement`` replace what the manifest names.
    """
    root = Path(directory).resolve()
    manifest = _read_manifest(root)
    try:
        files = manifest["files"]
        data = load_tensors(root / files["data"]["file"], files["data"]["sha256"], "training data")
        schedule = load_tensors(
            root / files["schedule"]["file"], files["schedule"]["sha256"], "schedule"
        )
        stages = [
            Stage.from_description(
                desc, schedule[f"stage_examples.{i}"].numpy(), _stage_groups(desc, schedule, i)
            )
            for i, desc in enumerate(manifest["stages"])
        ]
        batches = None
        if manifest.get("has_batches"):
            offsets = schedule["batch_offsets"].numpy()
            indices = schedule["batch_indices"].numpy()
            batches = [indices[offsets[k] : offsets[k + 1]] for k in range(len(offsets) - 1)]
        store = _checkpoint_store(root, manifest["checkpoints"], manifest["param_shapes"])
        if architecture is None:
            architecture = Architecture(
                manifest["architecture"]["factory"], manifest["architecture"]["kwargs"]
            )
            recorded = manifest["fingerprint"] if loss is None and measurement is None else None
        else:
            recorded = None
        arguments = {
            "architecture": architecture,
            "train": Examples(data["inputs"], data["targets"]),
            "stages": stages,
            "learning_rates": schedule["learning_rates"].numpy(),
            "batches": batches,
            "checkpoints": store,
            "checkpoint_steps": manifest["checkpoint_steps"],
            "loss": manifest["loss"] if loss is None else loss,
            "measurement": manifest["measurement"] if measurement is None else measurement,
            "train_mode": manifest.get("train_mode", True),
            **_step_records(schedule, manifest.get("random_device")),
        }
    except (KeyError, TypeError) as err:
        raise TrajectoryError(
            f"The manifest {str(root / MANIFEST)!r} is incomplete or malformed (missing {err}). "
            "Restore the directory from the original save."
        ) from err
    return SavedRun(arguments, recorded)
