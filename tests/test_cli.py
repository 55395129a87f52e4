"""The ``sourcekit`` command."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from sourcekit.cli import build_parser, main


def test_demo_prints_proponents_and_opponents(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--quiet", "--queries", "1"]) == 0
    captured = capsys.readouterr()
    out = captured.out
    assert "Trajectory: 1437 training examples, 736 steps" in out
    assert out.count("Test digit ") == 1
    assert (
        len(
            re.findall(
                r"top 5 proponents: (#\d+ \(label \d\) [+-]\d\.\d\de[+-]\d\d(, )?){5}$", out, re.M
            )
        )
        == 1
    )
    assert (
        len(
            re.findall(
                r"top 5 opponents: (#\d+ \(label \d\) [+-]\d\.\d\de[+-]\d\d(, )?){5}$", out, re.M
            )
        )
        == 1
    )
    assert captured.err == ""  # --quiet hides the progress bars


def test_demo_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            ["demo", "--quiet", "--recipe", "early", "--queries", "2", "--top", "2", "--seed", "1"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "184 steps" in out
    assert out.count("Test digit ") == 2
    proponents = re.findall(r"top 2 proponents: (.*)$", out, re.M)
    assert len(proponents) == 2 and all(p.count("#") == 2 for p in proponents)


def test_help_via_python_m() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sourcekit", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0
    assert result.stdout.startswith("usage: sourcekit")
    assert "demo" in result.stdout


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    assert "--recipe" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--queries", "0"], "--queries must be at least 1; got 0"),
        (["demo", "--top", "-1"], "--top must be at least 1; got -1"),
        (["demo", "--queries", "two"], "argument --queries: invalid int value: 'two'"),
        (["demo", "--no-such-option"], "unrecognized arguments: --no-such-option"),
        (["train"], "invalid choice: 'train'"),
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
    assert (args.recipe, args.queries, args.top, args.seed, args.quiet) == (
        "standard",
        3,
        5,
        0,
        False,
    )
