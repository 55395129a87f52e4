"""Draw the LDS table of docs/benchmarks.md as a bar chart with its confidence intervals.

The numbers are read from the table printed by ``benchmarks/evaluate_lds.py`` as it is
pasted in docs/benchmarks.md (the ``text`` block under "Linear datamodeling score"), so
the figure always shows what the page says; nothing is hard-coded here. Rerun after
updating the table:

    python benchmarks/plot_lds.py                   # writes docs/img/lds.png
    python benchmarks/plot_lds.py --out lds.png
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "benchmarks.md"
OUT = ROOT / "docs" / "img" / "lds.png"

SECTION = "## Linear datamodeling score"
BLOCK = re.compile(r"^```text\n(.*?)^```", re.DOTALL | re.MULTILINE)
NUMBER = r"[+-]?\d+(?:\.\d+)?"
ROW = re.compile(
    rf"^(?P<recipe>\S+)\s+(?P<method>\S.*?)\s+(?P<lds>{NUMBER})\s+"
    rf"\[(?P<low>{NUMBER}),\s*(?P<high>{NUMBER})\]"
)


@dataclass(frozen=True)
class Row:
    """One line of the table: a method's mean LDS on a recipe and its interval."""

    recipe: str
    method: str
    lds: float
    low: float
    high: float


def parse_lds_table(page: str) -> list[Row]:
    """The rows of the first ``text`` block after the LDS heading of ``page``."""
    start = page.find(SECTION)
    if start < 0:
        raise ValueError(f"No section {SECTION!r} in the page.")
    block = BLOCK.search(page, start)
    if block is None:
        raise ValueError(f"No ```text block after {SECTION!r}.")
    rows = [
        Row(m["recipe"], m["method"], float(m["lds"]), float(m["low"]), float(m["high"]))
        for m in map(ROW.match, block.group(1).splitlines())
        if m is not None
    ]
    if not rows:
        raise ValueError(f"The table under {SECTION!r} has no rows of the expected form.")
    return rows


def plot(rows: list[Row], out: Path) -> None:
    """A grouped bar chart: one group per recipe, one bar per method, 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recipes = list(dict.fromkeys(r.recipe for r in rows))
    methods = list(dict.fromkeys(r.method for r in rows))
    by_key = {(r.recipe, r.method): r for r in rows}
    width = 0.8 / len(methods)
    colors = plt.get_cmap("tab10").colors
    fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
    for j, method in enumerate(methods):
        xs, heights, errors = [], [], [[], []]
        for i, recipe in enumerate(recipes):
            row = by_key.get((recipe, method))
            if row is None:
                continue
            xs.append(i - 0.4 + (j + 0.5) * width)
            heights.append(row.lds)
            errors[0].append(row.lds - row.low)
            errors[1].append(row.high - row.lds)
        ax.bar(
            xs,
            heights,
            width,
            yerr=errors,
            capsize=2,
            label=method,
            color=colors[j % len(colors)],
            error_kw={"elinewidth": 0.8},
        )
    ax.set_xticks(range(len(recipes)), recipes)
    ax.set_ylabel("LDS (mean Spearman, 95% interval)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize="small")
    ax.set_title("Linear datamodeling score on the digits recipes")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--page", type=Path, default=PAGE, help="the Markdown page to read")
    parser.add_argument("--out", type=Path, default=OUT, help="the PNG file to write")
    args = parser.parse_args()
    rows = parse_lds_table(args.page.read_text())
    plot(rows, args.out)
    print(f"{len(rows)} rows from {args.page} -> {args.out}")


if __name__ == "__main__":
    main()
