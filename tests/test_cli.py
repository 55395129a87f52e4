"""The ``sourcekit`` command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import sourcekit
from sourcekit import InfluenceAttributor, SourceAttributor, Trajectory
from sourcekit.cli import build_parser, main

from . import _cases

SCORE = r"#\d+ \(label \d\) [+-]\d\.\d\de[+-]\d\d"


def test_demo_prints_proponents_opponents_and_agreement(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["demo", "--quiet", "--queries", "1", "--out", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Trajectory: 1437 training examples, 184 steps" in out  # the early recipe
    assert out.count("Test digit ") == 1
    assert len(re.findall(rf"top 5 proponents: ({SCORE}(, )?){{5}}$", out, re.M)) == 1
    assert len(re.findall(rf"top 5 opponents: ({SCORE}(, )?){{5}}$", out, re.M)) == 1
    assert re.search(
        r"agreement with exact unrolling .*: SOURCE -?\d\.\d\d, influence -?\d\.\d\d", out
    )
    figure = tmp_path / "proponents.png"
    assert f"Figure: {figure}" in out and figure.stat().st_size > 1000
    assert captured.err == ""  # --quiet hides the progress bars


def test_demo_options(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = [
        "demo",
        "--quiet",
        "--recipe",
        "standard",
        "--queries",
        "2",
        "--top",
        "2",
        "--seed",
        "1",
    ]
    assert main([*argv, "--out", str(tmp_path), "--no-figure"]) == 0
    out = capsys.readouterr().out
    assert "736 steps" in out
    assert out.count("Test digit ") == 2
    proponents = re.findall(r"top 2 proponents: (.*)$", out, re.M)
    assert len(proponents) == 2 and all(p.count("#") == 2 for p in proponents)
    assert "Figure:" not in out and not list(tmp_path.iterdir())


def test_help_via_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sourcekit", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: sourcekit")
    for command in ("demo", "attribute", "info"):
        assert command in result.stdout


@pytest.mark.parametrize("command", ["demo", "attribute", "info"])
def test_every_command_explains_its_options(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    options = re.findall(r"^  (--[a-z-]+)", text, re.M)
    assert options, text
    for option in options:  # every option line carries an explanation
        line = next(line for line in text.splitlines() if line.strip().startswith(option))
        rest = line.strip()[len(option) :].strip()
        assert rest or option == "--help", f"{option} has no help text"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--queries", "0"], "--queries must be at least 1; got 0"),
        (["demo", "--top", "-1"], "--top must be at least 1; got -1"),
        (["demo", "--queries", "two"], "argument --queries: invalid int value: 'two'"),
        (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["train"], "invalid choice: 'train'"),
        (
            ["attribute", "dir", "--queries", "q.npz", "--method", "magic"],
            "invalid choice: 'magic'",
        ),
        (["info", "dir", "--segments", "0"], "--segments must be at least 1; got 0"),
    ],
)
def test_bad_options_exit_with_code_2(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_unknown_recipe_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--recipe", "long"]) == 2
    assert (
        "unknown recipe 'long'; choose from standard, early, two_stage" in capsys.readouterr().err
    )


def test_no_command_prints_help_and_exits_with_code_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: sourcekit")


def test_parser_defaults() -> None:
    args = build_parser().parse_args(["demo"])
    assert (args.recipe, args.queries, args.top, args.seed, args.quiet, args.evaluate) == (
        "early",
        3,
        5,
        0,
        False,
        False,
    )


# --- attribute and info on a saved run ----------------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("run") / "trajectory"
    _cases.trajectory("mlp_momentum").save(directory)
    return directory


def _queries_file(tmp_path: Path, suffix: str) -> Path:
    queries = _cases.queries("mlp_momentum")
    path = tmp_path / f"queries{suffix}"
    if suffix == ".npz":
        np.savez(path, inputs=queries.inputs.numpy(), targets=queries.targets.numpy())
    else:
        torch.save({"inputs": queries.inputs, "targets": queries.targets}, path)
    return path


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
def test_attribute_writes_the_score_matrix(
    saved: Path, tmp_path: Path, suffix: str, capsys
) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "scores.npy"
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, suffix))]
    assert (
        main([*argv, "--method", "source", "--damping", "0.01", "--out", str(out), "--quiet"]) == 0
    )
    assert "scores of shape (4, 12)" in capsys.readouterr().out
    expected = (
        SourceAttributor(damping=0.01, device="cpu")
        .fit(Trajectory.load(saved))
        .transform(_cases.queries("mlp_momentum"))
    )
    np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.parametrize("method", ["influence", "tracin", "trak", "unrolled"])
def test_attribute_with_every_method(saved: Path, tmp_path: Path, method: str) -> None:
    out = tmp_path / f"{method}.npy"
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz"))]
    assert main([*argv, "--method", method, "--out", str(out), "--quiet"]) == 0
    scores = np.load(out)
    assert scores.shape == (4, 12) and np.isfinite(scores).all()


def test_attribute_passes_the_precision_and_the_curvature_subset(
    saved: Path, tmp_path: Path
) -> None:
    out = tmp_path / "scores.npy"
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz"))]
    options = ["--gradient-dtype", "bfloat16", "--curvature-examples", "5", "--quiet"]
    assert main([*argv, *options, "--method", "influence", "--out", str(out)]) == 0
    expected = (
        InfluenceAttributor(gradient_dtype="bfloat16", curvature_examples=5, device="cpu")
        .fit(Trajectory.load(saved))
        .transform(_cases.queries("mlp_momentum"))
    )
    np.testing.assert_array_equal(np.load(out), expected)


def test_attribute_passes_the_refinement(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.npy"
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz"))]
    options = ["--refine-steps", "2", "--refine-examples", "8", "--refine-weight", "0.5"]
    options += ["--refine-rank", "3"]
    assert main([*argv, *options, "--quiet", "--out", str(out)]) == 0
    expected = (
        SourceAttributor(
            refine_steps=2, refine_examples=8, refine_weight=0.5, refine_rank=3, device="cpu"
        )
        .fit(Trajectory.load(saved))
        .transform(_cases.queries("mlp_momentum"))
    )
    np.testing.assert_array_equal(np.load(out), expected)
    plain = SourceAttributor(device="cpu").fit(Trajectory.load(saved))
    assert not np.array_equal(plain.transform(_cases.queries("mlp_momentum")), expected)


def test_attribute_runs_sources_fast_variant(saved: Path, tmp_path: Path) -> None:
    out = tmp_path / "scores.npy"
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz"))]
    options = ["--average-checkpoints", "--n-segments", "1", "--quiet", "--out", str(out)]
    assert main([*argv, *options]) == 0
    expected = (
        SourceAttributor(n_segments=1, average_checkpoints=True, device="cpu")
        .fit(Trajectory.load(saved))
        .transform(_cases.queries("mlp_momentum"))
    )
    np.testing.assert_array_equal(np.load(out), expected)


@pytest.mark.parametrize(
    ("method", "option", "match"),
    [
        (
            "tracin",
            ["--curvature-examples", "5"],
            "--curvature-examples does not apply to --method tracin; it applies to --method "
            "source, influence.",
        ),
        (
            "influence",
            ["--average-checkpoints"],
            "--average-checkpoints does not apply to --method influence; it applies to "
            "--method source.",
        ),
        ("unrolled", ["--gradient-dtype", "bfloat16"], "--gradient-dtype does not apply"),
        ("trak", ["--n-segments", "2"], "--n-segments does not apply to --method trak"),
        ("tracin", ["--damping", "1"], "--damping does not apply to --method tracin"),
    ],
)
def test_attribute_refuses_options_the_method_lacks(  # type: ignore[no-untyped-def]
    saved: Path, tmp_path: Path, capsys, method: str, option: list, match: str
) -> None:
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz"))]
    assert main([*argv, "--method", method, *option, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


def test_attribute_reports_bad_input(saved: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    queries = _queries_file(tmp_path, ".npz")
    assert main(["attribute", str(tmp_path / "nowhere"), "--queries", str(queries)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["attribute", str(saved), "--queries", str(tmp_path / "missing.npz")]) == 2
    assert "queries file" in capsys.readouterr().err
    np.savez(tmp_path / "bad.npz", inputs=np.zeros((2, 3), dtype=np.float32))
    assert main(["attribute", str(saved), "--queries", str(tmp_path / "bad.npz")]) == 2
    assert "lacks the array(s) ['targets']" in capsys.readouterr().err
    np.savez(
        tmp_path / "wide.npz",
        inputs=np.zeros((2, 5), dtype=np.float32),
        targets=np.zeros(2, dtype=np.int64),
    )
    assert main(["attribute", str(saved), "--queries", str(tmp_path / "wide.npz")]) == 2
    assert "query inputs have shape (n, 5)" in capsys.readouterr().err


def _one_line_error(capsys, command: str = "attribute") -> str:  # type: ignore[no-untyped-def]
    err = capsys.readouterr().err
    assert err.startswith(f"sourcekit {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("method", ["source", "unrolled"])
def test_attribute_reports_queries_that_do_not_fit_the_model(  # type: ignore[no-untyped-def]
    saved: Path, tmp_path: Path, capsys, method: str
) -> None:
    queries = _cases.queries("mlp_momentum")
    inputs, targets = queries.inputs.numpy(), queries.targets.numpy()
    argv = ["attribute", str(saved), "--method", method, "--quiet", "--queries"]
    np.savez(tmp_path / "ints.npz", inputs=inputs.astype(np.int64), targets=targets)
    assert main([*argv, str(tmp_path / "ints.npz"), "--out", str(tmp_path / "a")]) == 2
    assert "query inputs have dtype torch.int64 but the training inputs" in _one_line_error(capsys)
    labels = targets.copy()
    labels[2] = 7  # the model has 3 classes
    np.savez(tmp_path / "labels.npz", inputs=inputs, targets=labels)
    assert main([*argv, str(tmp_path / "labels.npz"), "--out", str(tmp_path / "b")]) == 2
    assert "class target is 7, outside [0, 3)" in _one_line_error(capsys)
    assert not list(tmp_path.glob("*.npy"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("method", ["source", "unrolled"])
def test_attribute_on_cuda_without_it_is_a_one_line_error(  # type: ignore[no-untyped-def]
    saved: Path, tmp_path: Path, capsys, method: str
) -> None:
    queries = str(_queries_file(tmp_path, ".npz"))
    argv = ["attribute", str(saved), "--queries", queries, "--method", method, "--quiet"]
    assert main([*argv, "--device", "cuda", "--out", str(tmp_path / "s.npy")]) == 2
    assert "'device' parameter must be a device that this torch build can use" in (
        _one_line_error(capsys)
    )


def test_attribute_prints_the_file_it_writes_and_never_replaces_one(  # type: ignore[no-untyped-def]
    saved: Path, tmp_path: Path, capsys
) -> None:
    argv = ["attribute", str(saved), "--queries", str(_queries_file(tmp_path, ".npz")), "--quiet"]
    assert main([*argv, "--method", "tracin", "--out", str(tmp_path / "scores")]) == 0
    written = tmp_path / "scores.npy"  # np.save adds the extension: say so
    assert f"Wrote {written}:" in capsys.readouterr().out
    first = np.load(written)
    assert main([*argv, "--method", "trak", "--out", str(tmp_path / "scores")]) == 2
    assert "already exists; sourcekit attribute never replaces it" in _one_line_error(capsys)
    np.testing.assert_array_equal(np.load(written), first)
    assert main([*argv, "--method", "trak", "--out", str(written), "--overwrite"]) == 0
    assert not np.array_equal(np.load(written), first)


def test_attribute_options_come_from_the_attributors() -> None:
    from sourcekit.cli import METHODS, OPTIONS

    text = build_parser().parse_args(["attribute", "d", "--queries", "q"])
    for name in OPTIONS:
        assert getattr(text, name) is None  # unset: the attributor's own default applies
        takers = {m for m, cls in METHODS.items() if name in cls().get_params()}
        assert takers, name
    # the choices are the constraint tables'
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["attribute"]
    curvature = next(a for a in sub._actions if a.dest == "curvature")
    assert curvature.choices == list(sourcekit.curvature.CURVATURES)


def test_an_option_whose_default_is_none_says_what_none_stands_for() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command").choices["attribute"]
    helps = {a.dest: a.help for a in sub._actions}
    assert helps["n_segments"].endswith("(default: 3)")  # SourceAttributor(n_segments=None)
    assert helps["curvature_examples"].endswith("(default: all of them)")


@pytest.mark.parametrize("method", ["source", "influence", "tracin", "trak", "unrolled"])
def test_attribute_passes_the_options_it_is_given_and_quiet_to_every_method(
    method: str,
) -> None:
    from sourcekit.cli import _attributor

    args = build_parser().parse_args(
        ["attribute", "d", "--queries", "q", "--method", method, "--device", "cpu", "--quiet"]
    )
    attributor = _attributor(args)
    defaults = type(attributor)().get_params()
    assert attributor.get_params() == {**defaults, "device": "cpu", "progress": False}


@pytest.mark.parametrize(
    ("method", "value", "expected"),
    [("source", "auto", "auto"), ("source", "0.01", 0.01), ("influence", "0.5", 0.5)],
)
def test_damping_takes_a_number_or_sources_auto(method: str, value: str, expected: object) -> None:
    from sourcekit.cli import _attributor

    args = build_parser().parse_args(
        ["attribute", "d", "--queries", "q", "--method", method, "--damping", value]
    )
    assert _attributor(args).damping == expected


def test_damping_auto_is_refused_where_the_method_has_no_such_default() -> None:
    from sourcekit.cli import _attributor

    args = build_parser().parse_args(
        ["attribute", "d", "--queries", "q", "--method", "influence", "--damping", "auto"]
    )
    with pytest.raises(ValueError, match="'damping' parameter of InfluenceAttributor"):
        _attributor(args)


def test_the_console_script_imports_a_factory_from_the_working_directory(  # type: ignore[no-untyped-def]
    tmp_path: Path, monkeypatch, capsys
) -> None:
    (tmp_path / "local_models.py").write_text(
        "import torch\n\n\ndef make_net():\n    return torch.nn.Linear(3, 3)\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _cases.classification_data(8, 0)
    stage = sourcekit.TrainingStage(sourcekit.OptimizerSpec("sgd", lr=0.1), epochs=1, batch_size=4)
    sourcekit.train("local_models:make_net", data, [stage], progress=False).save(tmp_path / "run")
    # The console script's sys.path: no working directory, and the module not yet imported.
    monkeypatch.delitem(sys.modules, "local_models")
    path = [p for p in sys.path if p not in ("", str(tmp_path))]
    monkeypatch.setattr(sys, "path", path)
    monkeypatch.chdir(tmp_path)
    assert main(["info", "run"]) == 0
    assert "architecture 'local_models:make_net'" in capsys.readouterr().out
    assert sys.path == path  # restored after the command


def test_info_summarises_a_saved_run(saved: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", str(saved)]) == 0
    out = capsys.readouterr().out
    assert "Trajectory: 12 training examples, 9 steps, 1 stage(s)" in out
    assert "with n_segments=3:" in out and out.count("    segment ") == 3
    assert re.search(
        r"\d+ files, [\d.]+ MB on disk \(every checkpoint verified\); fingerprint [0-9a-f]{16}",
        out,
    )


def test_info_verifies_every_checkpoint_file(saved: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(saved, copy)
    assert main(["info", str(copy)]) == 0
    assert "every checkpoint verified" in capsys.readouterr().out
    files = sorted((copy / "checkpoints").iterdir())
    files[1].unlink()
    with open(files[2], "ab") as f:
        f.write(b"\0")
    assert main(["info", str(copy)]) == 2
    err = _one_line_error(capsys, "info")
    assert "2 checkpoint file(s) of the saved trajectory fail verification" in err
    assert f"{files[1].name} is missing" in err and f"{files[2].name} was modified" in err
    assert main(["info", str(copy), "--no-verify"]) == 0
    assert "checkpoints not verified" in capsys.readouterr().out


def test_info_reports_a_corrupt_directory(saved: Path, tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["info", str(tmp_path)]) == 2
    assert "has no manifest.json" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{not json")
    assert main(["info", str(broken)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_demo_evaluate_prints_an_lds_table(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    import sourcekit.cli

    monkeypatch.setitem(sourcekit.cli.QUICK_EVALUATION, "queries", 8)
    monkeypatch.setitem(sourcekit.cli.QUICK_EVALUATION, "subsets", 6)
    monkeypatch.setitem(sourcekit.cli.QUICK_EVALUATION, "seeds", (0,))
    argv = [
        "demo",
        "--quiet",
        "--queries",
        "1",
        "--no-figure",
        "--evaluate",
        "--out",
        str(tmp_path),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    for method in (
        "SOURCE",
        "influence",
        "TracIn",
        "TRAK",
        "gradient similarity",
        "exact unrolling",
    ):
        assert re.search(
            rf"^{method}.* [+-]\d\.\d{{3}}   \[[+-]\d\.\d{{3}}, [+-]\d\.\d{{3}}\]$", out, re.M
        ), method
    assert list((tmp_path / "cache").iterdir())  # the retrainings were cached
