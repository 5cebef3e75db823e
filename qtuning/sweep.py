"""What a sweep shows: per arm the mean and spread over seeds, and score against tokens trained.

Framework-free (pandas, matplotlib); the sweep flow logs these to MLflow and Prefect.

- `sweep_table(rows, baseline)`: one row per arm: each benchmark's mean, `average` mean and standard
  deviation over seeds, `ratio_to_full` (mean average / the baseline's mean average), mean loss tokens,
  mean training seconds, the number of seeds.
- `format_sweep_table(table)`: aligned text (or Markdown) with `mean ± sd` where there are several seeds.
- `sweep_figure(table, baseline)`: average score against tokens that carried loss, one point per arm (error
  bars over seeds), the full-data baseline marked.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from qtuning.report import BENCHMARKS


def sweep_table(rows: Sequence[Mapping[str, Any]], baseline: str = "full") -> pd.DataFrame:
    """`rows`: one per (arm, seed) with name, seed, scores (dict), average, loss_tokens, train_seconds."""
    flat = pd.DataFrame(
        [
            {"arm": r["name"], "seed": r["seed"], **dict(r["scores"]), "average": r["average"],
             "loss_tokens": r["loss_tokens"], "train_seconds": r["train_seconds"]}
            for r in rows
        ]
    )
    order = list(dict.fromkeys(flat["arm"]))  # first-seen order: the baseline, then the sweep's arms
    benchmarks = [b for b in BENCHMARKS if b in flat] + [c for c in flat if c not in (*BENCHMARKS, "arm", "seed", "average", "loss_tokens", "train_seconds")]
    g = flat.groupby("arm", sort=False)
    table = g[benchmarks + ["average", "loss_tokens", "train_seconds"]].mean()
    table["average_sd"] = g["average"].std(ddof=1).fillna(0.0) if len(flat) > len(order) else 0.0
    table["seeds"] = g["seed"].nunique()
    base = table.loc[baseline, "average"] if baseline in table.index else float("nan")
    table["ratio_to_full"] = table["average"] / base if base else float("nan")
    cols = benchmarks + ["average", "average_sd", "ratio_to_full", "loss_tokens", "train_seconds", "seeds"]
    return table.loc[order, cols]


def format_sweep_table(table: pd.DataFrame, markdown: bool = False) -> str:
    several = int(table["seeds"].max()) > 1
    header = ["arm", *[c for c in table.columns if c not in ("average_sd", "seeds")], "seeds"]
    lines = []
    for arm, r in table.iterrows():
        cells = [str(arm)]
        for c in header[1:-1]:
            v = r[c]
            if c == "average" and several:
                cells.append(f"{v:.2f} ± {r['average_sd']:.2f}")
            elif c == "ratio_to_full":
                cells.append("" if pd.isna(v) else f"{v:.3f}")
            elif c == "loss_tokens":
                cells.append(f"{v:,.0f}")
            elif c == "train_seconds":
                cells.append(f"{v:.1f}")
            else:
                cells.append(f"{v:.2f}")
        cells.append(str(int(r["seeds"])))
        lines.append(cells)
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        return "\n".join(out + ["| " + " | ".join(c) + " |" for c in lines])
    widths = [max(len(h), *(len(c[i]) for c in lines)) for i, h in enumerate(header)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    return "\n".join([fmt(header), *(fmt(c) for c in lines)])


def sweep_figure(table: pd.DataFrame, baseline: str = "full"):
    """Average score against tokens that carried loss; the baseline is a star with a dashed level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for arm, r in table.iterrows():
        is_base = arm == baseline
        ax.errorbar(
            r["loss_tokens"], r["average"], yerr=r["average_sd"] if r["seeds"] > 1 else None,
            fmt="*" if is_base else "o", ms=14 if is_base else 7, capsize=3,
            color="black" if is_base else None, label=f"{arm} (full data)" if is_base else arm,
        )
        if is_base:
            ax.axhline(r["average"], color="black", ls="--", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("tokens that carried loss (log)")
    ax.set_ylabel("average benchmark score (%)")
    ax.set_title("Score against training tokens, one point per arm")
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig
