"""Saving and loading trajectories, and every way a saved directory can be wrong."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from sourcekit import OptimizerSpec, TrainingStage, Trajectory, TrajectoryRecorder, train
from sourcekit.exceptions import TrajectoryError
from sourcekit.gradients import cross_entropy
from sourcekit.trajectory._storage import sha256_file

from .. import _cases


def _assert_same_run(a: Trajectory, b: Trajectory) -> None:
    """Two trajectories hold the same record (checkpoints compared tensor by tensor)."""
    assert a.fingerprint == b.fingerprint
    assert a.n_train == b.n_train and a.n_steps == b.n_steps
    assert torch.equal(a.train.inputs, b.train.inputs)
    assert torch.equal(a.train.targets, b.train.targets)
    np.testing.assert_array_equal(a.learning_rates, b.learning_rates)
    assert a.has_batches == b.has_batches
    if a.batches is not None and b.batches is not None:
        assert len(a.batches) == len(b.batches)
        for x, y in zip(a.batches, b.batches, strict=True):
            np.testing.assert_array_equal(x, y)
    assert a.checkpoint_steps == b.checkpoint_steps
    assert a.stored_steps == b.stored_steps
    assert [s.describe() for s in a.stages] == [s.describe() for s in b.stages]
    for sa, sb in zip(a.stages, b.stages, strict=True):
        assert sa.optimizer == sb.optimizer
        np.testing.assert_array_equal(sa.examples, sb.examples)
    assert a.train_mode == b.train_mode
    for step in a.stored_steps:
        ca, cb = a.checkpoint(step), b.checkpoint(step)
        assert ca.step == cb.step == step
        for part in ("params", "buffers"):
            da, db = getattr(ca, part), getattr(cb, part)
            assert da.keys() == db.keys()
            for name in da:
                assert torch.equal(da[name], db[name]), (step, name)
        assert ca.digest() == cb.digest()


def _saved(tmp_path: Path, name: str = "mlp_two_stage") -> Path:
    return _cases.record(name).save(tmp_path / "run")


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def _write_manifest(directory: Path, manifest: dict) -> None:
    (directory / "manifest.json").write_text(json.dumps(manifest))


def _checkpoint_entry(manifest: dict, step: int) -> dict:
    return next(c for c in manifest["checkpoints"] if c["step"] == step)


def _replace_checkpoint_file(directory: Path, step: int, payload: object) -> Path:
    """Overwrite a checkpoint file and record its new sha256 in the manifest, so that
    whatever refuses it is not the checksum."""
    manifest = _manifest(directory)
    entry = _checkpoint_entry(manifest, step)
    path = directory / entry["file"]
    torch.save(payload, path)
    entry["sha256"] = sha256_file(path)
    _write_manifest(directory, manifest)
    return path


# --- round trip ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["linear_gd", "mlp_adamw", "mlp_two_stage"])
def test_round_trip(tmp_path: Path, name: str) -> None:
    original = _cases.record(name)
    path = original.save(tmp_path / "run")
    assert path == tmp_path / "run"
    assert (path / "manifest.json").is_file()
    loaded = Trajectory.load(path)
    _assert_same_run(original, loaded)
    assert loaded.loss is original.loss and loaded.measurement is original.measurement
    # The stored fingerprint is the content's: recomputing it from the files agrees.
    assert loaded._compute_fingerprint() == original.fingerprint
    # The optimiser state kept at the checkpoints survives as well.
    for step in original.checkpoint_steps:
        a, b = original.checkpoint(step).optimizer, loaded.checkpoint(step).optimizer
        assert a.keys() == b.keys()


def test_round_trip_of_a_loaded_trajectory(tmp_path: Path) -> None:
    loaded = Trajectory.load(_saved(tmp_path))
    again = Trajectory.load(loaded.save(tmp_path / "copy"))
    _assert_same_run(loaded, again)


def test_the_digits_trajectory_round_trips(tmp_path: Path, digits_early: Trajectory) -> None:
    loaded = Trajectory.load(digits_early.save(tmp_path / "digits"))
    _assert_same_run(digits_early, loaded)


def test_a_callable_factory_is_saved_by_its_import_name(tmp_path: Path) -> None:
    stage = TrainingStage(OptimizerSpec("sgd", lr=0.1), epochs=2, batch_size=4, n_checkpoints=1)
    trajectory = train(
        _cases.make_linear,
        _cases.train_examples("linear_gd"),
        [stage],
        loss="squared_error",
        measurement="output",
        architecture_kwargs={"n_features": 3},
        progress=False,
    )
    path = trajectory.save(tmp_path / "run")
    assert _manifest(path)["architecture"] == {
        "factory": "tests._cases:make_linear",
        "kwargs": {"n_features": 3},
    }
    _assert_same_run(trajectory, Trajectory.load(path))


def test_a_recorded_user_loop_round_trips(tmp_path: Path) -> None:
    data = _cases.train_examples("mlp_sgd")
    model = _cases.make_tanh_mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    recorder = TrajectoryRecorder(
        model, data, architecture="tests._cases:make_tanh_mlp", checkpoint_every=2
    )
    with recorder.stage(optimizer):
        for start in range(0, 12, 3):
            idx = np.arange(start, start + 3)
            optimizer.zero_grad()
            cross_entropy(model(data.inputs[idx]), data.targets[idx]).mean().backward()
            optimizer.step()
            recorder.step(idx)
    trajectory = recorder.finish()
    loaded = Trajectory.load(trajectory.save(tmp_path / "run"))
    _assert_same_run(trajectory, loaded)
    assert loaded.stages[0].recipe is None
    exp_avg_sq = loaded.checkpoint(2).optimizer["exp_avg_sq"]
    assert torch.equal(
        exp_avg_sq["0.weight"], trajectory.checkpoint(2).optimizer["exp_avg_sq"]["0.weight"]
    )


def test_loading_is_lazy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _saved(tmp_path)
    read: list[str] = []
    real_load = torch.load

    def counting_load(f, *args, **kwargs):  # type: ignore[no-untyped-def]
        read.append(Path(f).name)
        return real_load(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    trajectory = Trajectory.load(path)
    assert sorted(read) == ["data.pt", "schedule.pt"]
    _ = trajectory.fingerprint  # read from the manifest, no checkpoint needed
    assert sorted(read) == ["data.pt", "schedule.pt"]
    step = trajectory.checkpoint_steps[1]
    trajectory.checkpoint(step)
    assert read[2:] == [f"step_{step:08d}.pt"]


def test_fingerprint_is_computed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    trajectory = _cases.record("mlp_sgd")
    calls = []
    real = Trajectory._compute_fingerprint

    def counting(self: Trajectory) -> str:
        calls.append(1)
        return real(self)

    monkeypatch.setattr(Trajectory, "_compute_fingerprint", counting)
    first = trajectory.fingerprint
    assert trajectory.fingerprint == first
    assert len(calls) == 1


def test_fingerprint_is_taken_from_the_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = _cases.record("mlp_sgd")
    path = original.save(tmp_path / "run")
    monkeypatch.setattr(Trajectory, "_compute_fingerprint", lambda self: pytest.fail("recomputed"))
    assert Trajectory.load(path).fingerprint == original.fingerprint


def test_fingerprint_tells_runs_apart() -> None:
    a = _cases.record("mlp_sgd")
    assert a.fingerprint == _cases.record("mlp_sgd").fingerprint
    assert a.fingerprint != _cases.record("mlp_sgd", random_state=1).fingerprint
    assert a.fingerprint != _cases.record("mlp_momentum").fingerprint
    assert len(a.fingerprint) == 64


def test_overrides_on_load(tmp_path: Path) -> None:
    original = _cases.record("mlp_sgd")
    path = original.save(tmp_path / "run")
    loaded = Trajectory.load(path, measurement="cross_entropy")
    assert loaded.measurement_spec == "cross_entropy"
    assert loaded.fingerprint != original.fingerprint  # another measurement, another content
    same = Trajectory.load(path, architecture="tests._cases:make_tanh_mlp")
    assert same.fingerprint == original.fingerprint


# --- saving never destroys ----------------------------------------------------------------
def test_save_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"already exists and is not empty.*overwrite=True"):
        _cases.record("linear_gd").save(target)
    assert sorted(os.listdir(target)) == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory left behind


def test_save_refuses_an_existing_file(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match="pass overwrite=True"):
        _cases.record("linear_gd").save(target)
    assert target.read_text() == "mine"


def test_overwrite_never_replaces_a_file(tmp_path: Path) -> None:
    target = tmp_path / "run"
    target.write_text("mine")
    with pytest.raises(FileExistsError, match=r"is a file\. .*replaces only a directory written"):
        _cases.record("linear_gd").save(target, overwrite=True)
    assert target.read_text() == "mine"
    assert sorted(os.listdir(tmp_path)) == ["run"]  # no staging directory left behind


@pytest.mark.parametrize("content", ["unrelated", "other manifest", "corrupt manifest"])
def test_overwrite_never_replaces_a_directory_of_other_files(tmp_path: Path, content: str) -> None:
    target = tmp_path / "run"
    target.mkdir()
    if content == "unrelated":
        (target / "notes.txt").write_text("mine")
    elif content == "other manifest":
        (target / "manifest.json").write_text(json.dumps({"format": "something.else"}))
    else:
        (target / "manifest.json").write_text("{not json")
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(FileExistsError, match="a directory without a trajectory manifest"):
        _cases.record("linear_gd").save(target, overwrite=True)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_the_saved_directory_follows_the_umask(tmp_path: Path) -> None:
    previous = os.umask(0o022)
    try:
        path = _cases.record("linear_gd").save(tmp_path / "run")
        replaced = _cases.record("linear_sgd").save(tmp_path / "run", overwrite=True)
    finally:
        os.umask(previous)
    # 0o777 less the umask, as for any directory the user makes (not mkdtemp's 0o700)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE(replaced.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "checkpoints").stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "manifest.json").stat().st_mode) == 0o644


def test_save_refuses_a_previous_save(tmp_path: Path) -> None:
    first = _cases.record("linear_gd")
    path = first.save(tmp_path / "run")
    before = {p.name: sha256_file(p) for p in path.rglob("*") if p.is_file()}
    with pytest.raises(FileExistsError, match="never replaces it silently"):
        _cases.record("linear_sgd").save(path)
    after = {p.name: sha256_file(p) for p in path.rglob("*") if p.is_file()}
    assert after == before


def test_save_into_an_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    path = _cases.record("linear_gd").save(tmp_path / "run")
    assert Trajectory.load(path).n_steps == 6


def test_overwrite_replaces_the_directory(tmp_path: Path) -> None:
    target = tmp_path / "run"
    _cases.record("linear_gd").save(target)
    (target / "stale.txt").write_text("old")
    replacement = _cases.record("linear_sgd")
    replacement.save(target, overwrite=True)
    assert not (target / "stale.txt").exists()
    _assert_same_run(replacement, Trajectory.load(target))
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_a_loaded_trajectory_can_overwrite_its_own_directory(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    loaded = Trajectory.load(path)
    fingerprint = loaded.fingerprint
    loaded.save(path, overwrite=True)
    # The trajectory now reads the new files (the old ones were removed).
    assert loaded.checkpoint(loaded.n_steps).step == loaded.n_steps
    assert Trajectory.load(path).fingerprint == fingerprint


def test_save_needs_an_importable_architecture(tmp_path: Path) -> None:
    trajectory = _cases.rebuild(_cases.trajectory("linear_gd"), architecture=_cases.make_linear())
    with pytest.raises(
        TrajectoryError, match=r"cannot be saved.*architecture='package.module:factory'"
    ):
        trajectory.save(tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_save_needs_importable_functions(tmp_path: Path) -> None:
    trajectory = _cases.rebuild(
        _cases.trajectory("linear_gd"), measurement=lambda outputs, targets: outputs[:, 0]
    )
    with pytest.raises(
        TrajectoryError, match=r"measurement function has no importable name.*measurement=\.\.\."
    ):
        trajectory.save(tmp_path / "run")


# --- bad directories ----------------------------------------------------------------------
def test_missing_checkpoint_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    step = 3
    missing = path / _checkpoint_entry(_manifest(path), step)["file"]
    missing.unlink()
    trajectory = Trajectory.load(path)  # lazy: the other checkpoints stay usable
    trajectory.checkpoint(0)
    with pytest.raises(
        TrajectoryError,
        match=r"checkpoint \(step 3\) file .*step_00000003\.pt.* is missing.*copy the whole directory",
    ):
        trajectory.checkpoint(step)


def test_missing_data_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "data.pt").unlink()
    with pytest.raises(
        TrajectoryError,
        match=r"training data file .*data\.pt.* is missing.*record and save the run again",
    ):
        Trajectory.load(path)


def test_modified_checkpoint_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    entry = _checkpoint_entry(_manifest(path), 5)
    with open(path / entry["file"], "ab") as fh:
        fh.write(b"\0")
    trajectory = Trajectory.load(path)
    with pytest.raises(
        TrajectoryError,
        match=rf"step_00000005\.pt.* has sha256 [0-9a-f]{{12}}\.\.\., but the manifest records {entry['sha256'][:12]}\.\.\.: the file was modified or corrupted\. Restore it",
    ):
        trajectory.checkpoint(5)


def test_modified_schedule_file(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    schedule = torch.load(path / "schedule.pt", weights_only=True)
    schedule["learning_rates"] = schedule["learning_rates"] * 2
    torch.save(schedule, path / "schedule.pt")
    with pytest.raises(TrajectoryError, match=r"schedule file .* modified or corrupted"):
        Trajectory.load(path)


def test_loading_with_another_architecture(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    with pytest.raises(
        TrajectoryError,
        match=r"do not fit the architecture 'tests\._cases:make_linear'.*0\.weight\[5, 3\].*Pass the architecture the run was recorded with",
    ):
        Trajectory.load(path, architecture="tests._cases:make_linear")
    with pytest.raises(TrajectoryError, match=r"do not fit the architecture"):
        Trajectory.load(path, architecture=lambda: _cases.make_tanh_mlp(hidden=6))


def test_checkpoint_of_another_model(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    foreign = _cases.record("linear_gd").checkpoint(0)
    _replace_checkpoint_file(path, 3, foreign.to_payload())
    trajectory = Trajectory.load(path)
    with pytest.raises(
        TrajectoryError,
        match=r"checkpoint at step 3 does not fit the architecture .*holds \{bias\[1\], weight\[1, 3\]\}.*record and save the run again",
    ):
        trajectory.checkpoint(3)


def test_file_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _replace_checkpoint_file(path, 3, {"weights": torch.zeros(2)})
    with pytest.raises(
        TrajectoryError, match=r"does not hold a sourcekit checkpoint.*Trajectory\.save"
    ):
        Trajectory.load(path).checkpoint(3)


class _Payload:
    """An object whose unpickling would run code: it must never be unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (_touch, (str(self.marker),))


def _touch(path: str) -> None:
    Path(path).write_text("executed")


@pytest.mark.parametrize("kind", ["custom class", "os-level callable"])
def test_checkpoint_needing_arbitrary_unpickling_is_refused(tmp_path: Path, kind: str) -> None:
    path = _saved(tmp_path)
    marker = tmp_path / "executed"
    payload = _cases.record("mlp_two_stage").checkpoint(3).to_payload()
    if kind == "custom class":
        payload["optimizer"]["extra"] = _Payload(marker)
    else:

        class Mkdir:
            def __reduce__(self):  # type: ignore[no-untyped-def]
                return (os.mkdir, (str(marker),))

        payload["optimizer"]["extra"] = Mkdir()
    file = _replace_checkpoint_file(path, 3, payload)
    assert b"mkdir" in file.read_bytes() or b"_touch" in file.read_bytes()  # really crafted
    trajectory = Trajectory.load(path)
    with pytest.raises(
        TrajectoryError,
        match=r"checkpoint \(step 3\) file .* was refused: it cannot be read as plain tensors without unpickling arbitrary objects.*never load files from untrusted sources",
    ):
        trajectory.checkpoint(3)
    assert not marker.exists()


def test_data_file_needing_arbitrary_unpickling_is_refused(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    marker = tmp_path / "executed"
    with open(path / "data.pt", "wb") as fh:
        pickle.dump({"inputs": _Payload(marker)}, fh, protocol=2)
    manifest = _manifest(path)
    manifest["files"]["data"]["sha256"] = sha256_file(path / "data.pt")
    _write_manifest(path, manifest)
    with pytest.raises(TrajectoryError, match=r"training data file .* was refused"):
        Trajectory.load(path)
    assert not marker.exists()


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(
        TrajectoryError,
        match=r"directory '.*nowhere' does not exist\. Pass the directory given to Trajectory\.save",
    ):
        Trajectory.load(tmp_path / "nowhere")


def test_directory_without_manifest(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(
        TrajectoryError,
        match=r"has no manifest\.json.*Pass the directory given to Trajectory\.save",
    ):
        Trajectory.load(path)


def test_manifest_that_is_not_json(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    text = (path / "manifest.json").read_text()
    (path / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(
        TrajectoryError, match=r"manifest .* is not valid JSON .*Restore it from the original save"
    ):
        Trajectory.load(path)


def test_manifest_of_something_else(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    _write_manifest(path, {"format": "other"})
    with pytest.raises(TrajectoryError, match="is not a sourcekit trajectory manifest"):
        Trajectory.load(path)


def test_manifest_of_another_version(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["version"] = 99
    _write_manifest(path, manifest)
    with pytest.raises(
        TrajectoryError, match=r"format version 99; this sourcekit reads version 1"
    ):
        Trajectory.load(path)


@pytest.mark.parametrize("key", ["files", "stages", "checkpoints", "param_shapes", "fingerprint"])
def test_incomplete_manifest(tmp_path: Path, key: str) -> None:
    path = _saved(tmp_path)
    manifest = _manifest(path)
    del manifest[key]
    _write_manifest(path, manifest)
    with pytest.raises(
        TrajectoryError,
        match=rf"incomplete or malformed \(missing '{key}'\)\. Restore the directory",
    ):
        Trajectory.load(path)


def test_manifest_without_the_final_checkpoint(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["checkpoints"] = [
        c for c in manifest["checkpoints"] if c["step"] != manifest["n_steps"]
    ]
    _write_manifest(path, manifest)
    with pytest.raises(
        TrajectoryError,
        match=r"no checkpoint at step 10; the initial \(step 0\) and final \(step 10\) states must always be recorded",
    ):
        Trajectory.load(path)


def test_unimportable_architecture(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    manifest = _manifest(path)
    manifest["architecture"]["factory"] = "tests._cases:no_such_factory"
    _write_manifest(path, manifest)
    with pytest.raises(
        TrajectoryError,
        match=r"'tests\._cases:no_such_factory' cannot be imported.*pass architecture=\.\.\. to Trajectory\.load",
    ):
        Trajectory.load(path)


def test_a_trajectory_loaded_from_a_relative_path_survives_a_change_of_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _saved(tmp_path)
    monkeypatch.chdir(tmp_path)
    trajectory = Trajectory.load("run")
    pickled = pickle.dumps(trajectory)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # "run" names nothing here
    assert trajectory.checkpoint(3).step == 3
    assert pickle.loads(pickled).build_model(3) is not None  # as in another process


def test_a_moved_directory_is_reported_as_moved(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    trajectory = Trajectory.load(path)
    shutil.move(path, tmp_path / "moved")
    with pytest.raises(
        TrajectoryError, match=r"'.*run' no longer exists: it was moved or deleted.*Load it again"
    ):
        trajectory.checkpoint(3)
    with pytest.raises(TrajectoryError, match="moved or deleted"):
        trajectory.verify()


def test_verify_names_every_missing_or_modified_checkpoint(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    trajectory = Trajectory.load(path)
    trajectory.verify()  # intact
    _cases.trajectory("linear_gd").verify()  # in memory: nothing to check
    manifest = _manifest(path)
    (path / _checkpoint_entry(manifest, 3)["file"]).unlink()
    with open(path / _checkpoint_entry(manifest, 5)["file"], "ab") as f:
        f.write(b"\0")
    with pytest.raises(
        TrajectoryError,
        match=r"2 checkpoint file\(s\) .* fail verification: step 3: .*step_00000003\.pt is missing; "
        r"step 5: .*step_00000005\.pt was modified",
    ):
        trajectory.verify()


def test_loading_never_modifies_the_files(tmp_path: Path) -> None:
    path = _saved(tmp_path)
    before = {p: sha256_file(p) for p in path.rglob("*") if p.is_file()}
    trajectory = Trajectory.load(path)
    for step in trajectory.stored_steps:
        trajectory.checkpoint(step)
    trajectory.build_model()
    after = {p: sha256_file(p) for p in path.rglob("*") if p.is_file()}
    assert after == before
