"""What a comparison shows a reader: the EU plane, the comparison table, the pruned tokens of a few samples.

Framework-free (matplotlib, pandas, numpy): the pipeline's tasks log these files to MLflow, and anything
else can call them on a scores table or a list of arm results.

- `eu_plane_figure(scores, ratio)`: PPL x Ent on log axes, the quadrant thresholds that triage at `ratio`
  gives on the whole set, points coloured by quadrant; returns the figure and the quadrant shares.
- `comparison_table(arms)` / `format_table(table)`: per arm the benchmarks, their average, the ratio of the
  average to full-data SFT, the tokens that carried loss and the training wall time.
- `pruned_tokens_html(samples)`: prompt, kept and pruned response tokens of a few samples, readable in a
  browser (and in MLflow's artifact viewer).
- `sweep_table(rows)` / `format_sweep_table(table)` / `sweep_figure(table)`: a sweep's arms with the mean and
  spread over seeds of each benchmark and of the average, and the average against the tokens that carried loss.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from qtuning.triage import Q1_NOISE, Q2_MISCONCEPTION, Q3_MASTERED, Q4_CALIBRATION, Triage, triage

QUADRANTS = {
    Q1_NOISE: ("Q1 harmful noise", "#d62728"),
    Q2_MISCONCEPTION: ("Q2 misconception", "#ff7f0e"),
    Q3_MASTERED: ("Q3 mastered", "#7f7f7f"),
    Q4_CALIBRATION: ("Q4 calibration", "#1f77b4"),
    0: ("between thresholds", "#c7c7c7"),
}
BENCHMARKS = ("arc_easy", "arc_challenge", "gsm8k", "squad", "triviaqa")  # the paper's five, in its order


# --------------------------------------------------------------------------- the EU plane
def eu_triage(scores: pd.DataFrame, ratio: float, iters: int = 10, tol: float = 0.01) -> Triage:
    """Quadrant triage of the whole scored set as one pool (what a static pass keeps at `ratio`)."""
    return triage(scores["ppl"].to_numpy(), scores["ent"].to_numpy(), ratio, iters=iters, tol=tol)


def quadrant_shares(t: Triage) -> dict[str, float]:
    """Share of rows per quadrant (fill-ins counted where they count), kept share, fill-ins, alpha = beta reached."""
    n = len(t.keep)
    shares = {f"q{q}": float((t.quadrant == q).sum() / n) for q in (1, 2, 3, 4)}
    shares.update(
        none=float((t.quadrant == 0).sum() / n),
        kept=float(t.keep.sum() / n),
        kept_q2=float((t.keep & (t.quadrant == Q2_MISCONCEPTION)).sum() / n),
        kept_q4=float((t.keep & (t.quadrant == Q4_CALIBRATION)).sum() / n),
        filled=float(t.filled / n),
        alpha=float(t.alpha),
    )
    return shares


def eu_thresholds(scores: pd.DataFrame, alpha: float) -> dict[str, float]:
    """The four quantile thresholds of the triage at alpha = beta (numpy's linear interpolation)."""
    ppl, ent = scores["ppl"].to_numpy(), scores["ent"].to_numpy()
    return {
        "ppl_high": float(np.quantile(ppl, 1 - alpha)),
        "ppl_low": float(np.quantile(ppl, alpha)),
        "ent_low": float(np.quantile(ent, alpha)),
        "ent_high": float(np.quantile(ent, 1 - alpha)),
    }


def eu_plane_figure(
    scores: pd.DataFrame, ratio: float | None = None, title: str = "EU plane", iters: int = 10, tol: float = 0.01
):
    """Scatter of sample PPL (x) against mean entropy (y), log axes; with `ratio`, coloured by quadrant.

    Returns (matplotlib Figure, shares): shares is `quadrant_shares` of the triage at `ratio`, or {} when
    `ratio` is None (full data: every row trains, no thresholds drawn).
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 5.5), dpi=110)
    ppl = scores["ppl"].to_numpy(dtype=float)
    ent = np.clip(scores["ent"].to_numpy(dtype=float), 1e-6, None)  # log axis: entropy of 0 is clipped
    shares: dict[str, float] = {}
    if ratio is None:
        ax.scatter(ppl, ent, s=14, c="#1f77b4", alpha=0.7, label=f"all rows train (n={len(ppl)})")
    else:
        t = eu_triage(scores, ratio, iters, tol)
        shares = quadrant_shares(t)
        for q in (0, Q1_NOISE, Q3_MASTERED, Q2_MISCONCEPTION, Q4_CALIBRATION):
            in_q = t.quadrant == q
            if not in_q.any():
                continue
            name, colour = QUADRANTS[q]
            kept = in_q & t.keep
            ax.scatter(ppl[in_q & ~t.keep], ent[in_q & ~t.keep], s=14, c=colour, alpha=0.55, marker="o",
                       label=f"{name}: {int(in_q.sum())}" + (f" ({int(kept.sum())} kept)" if kept.any() else ""))
            if kept.any():
                ax.scatter(ppl[kept], ent[kept], s=26, c=colour, edgecolors="black", linewidths=0.7, marker="D")
        th = eu_thresholds(scores, t.alpha)
        for x in (th["ppl_low"], th["ppl_high"]):
            ax.axvline(x, color="black", lw=0.8, ls="--")
        for y in (th["ent_low"], th["ent_high"]):
            ax.axhline(max(y, 1e-6), color="black", lw=0.8, ls=":")
        title = (f"{title} - keep ratio {ratio:g}, alpha=beta={t.alpha:.3f}, kept {int(t.keep.sum())}/{len(t.keep)}"
                 + (f" ({t.filled} filled in by distance from the diagonal)" if t.filled else ""))
    # log axes, unless the values span less than a factor of 3 (log ticks then all read the same)
    for values, set_scale in ((ppl, ax.set_xscale), (ent, ax.set_yscale)):
        if len(values) and values.max() / max(values.min(), 1e-12) >= 3:
            set_scale("log")
    ax.set_xlabel("sample perplexity PPL (error)")
    ax.set_ylabel("mean predictive entropy Ent, nats (uncertainty)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="best")
    ax.grid(True, which="both", alpha=0.2)
    fig.tight_layout()
    return fig, shares


# --------------------------------------------------------------------------- the comparison table
def comparison_table(arms: Sequence[Mapping[str, Any]], baseline: str | None = None) -> pd.DataFrame:
    """One row per arm: benchmark scores (percent), average, ratio_to_full, loss_tokens, loop_seconds.

    Each arm is a mapping with `name`, `scores` ({benchmark: percent}), `average`, `loss_tokens` and
    `loop_seconds`. `baseline` names the full-data arm (default: the arm named 'full', else the first);
    ratio_to_full = average / the baseline's average.
    """
    names = [a["name"] for a in arms]
    if baseline is None:
        baseline = "full" if "full" in names else names[0]
    if baseline not in names:
        raise ValueError(f"baseline arm {baseline!r} is not among the arms {names}")
    benches = [b for b in BENCHMARKS if any(b in a["scores"] for a in arms)]
    benches += sorted({b for a in arms for b in a["scores"]} - set(benches))
    base_avg = next(float(a["average"]) for a in arms if a["name"] == baseline)
    rows = []
    for a in arms:
        row: dict[str, Any] = {"arm": a["name"]}
        row.update({b: float(a["scores"].get(b, math.nan)) for b in benches})
        avg = float(a["average"])
        row["average"] = avg
        row["ratio_to_full"] = avg / base_avg if base_avg else math.nan
        row["loss_tokens"] = int(a.get("loss_tokens") or 0)
        row["loop_seconds"] = float(a.get("loop_seconds") or 0.0)
        rows.append(row)
    return pd.DataFrame(rows).set_index("arm")


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """The table as aligned text (terminal) or as a Markdown table (README, MLflow)."""
    cols = list(table.columns)

    def cell(col: str, v: Any) -> str:
        if isinstance(v, float) and math.isnan(v):
            return "-"
        if col == "ratio_to_full":
            return f"{v:.3f}"
        if col == "loss_tokens":
            return f"{int(v):,}"
        if col == "loop_seconds":
            return f"{v:.1f}"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ["arm", *cols]
    body = [[str(arm), *(cell(c, table.at[arm, c]) for c in cols)] for arm in table.index]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(cols)) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(r[i]) for r in body)) for i, h in enumerate(header)]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))  # noqa: E731
    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *(fmt(r) for r in body)])


# --------------------------------------------------------------------------- pruned tokens, readable
_CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; max-width: 70em; }
.sample { border: 1px solid #ddd; border-radius: 6px; padding: 0.8em 1em; margin-bottom: 1.2em; }
.meta { color: #555; font-size: 0.85em; margin-bottom: 0.5em; }
.text { font-family: ui-monospace, monospace; font-size: 0.85em; white-space: pre-wrap; line-height: 1.6; }
.prompt { color: #999; }
.kept { background: #e3f4e1; }
.pruned { background: #f9d6d5; text-decoration: line-through; color: #a33; }
.legend span { padding: 0 0.4em; margin-right: 0.6em; }
"""


def pruned_tokens_html(samples: Sequence[Mapping[str, Any]], title: str = "Pruned tokens", note: str = "") -> str:
    """An HTML page of samples with prompt, kept and pruned response tokens.

    Each sample: `sample_id`, `tokens` (decoded strings), `roles` ('prompt' | 'kept' | 'pruned' per token),
    optional `token_ppl` (per token, None off the response) and sample fields `ppl`, `ent`, `quadrant`.
    """
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h2>{html.escape(title)}</h2>",
        f"<p>{html.escape(note)}</p>" if note else "",
        "<p class='legend'><span class='prompt'>prompt (no loss)</span><span class='kept'>kept response token</span>"
        "<span class='pruned'>pruned from the loss</span> (hover a response token for its perplexity)</p>",
    ]
    for s in samples:
        roles = list(s["roles"])
        n_kept, n_pruned = roles.count("kept"), roles.count("pruned")
        quadrant = QUADRANTS.get(int(s.get("quadrant", 0) or 0), ("", ""))[0]
        meta = (
            f"<b>{html.escape(str(s['sample_id']))}</b> &middot; {html.escape(quadrant)} &middot; "
            f"PPL {float(s.get('ppl', math.nan)):.2f} &middot; Ent {float(s.get('ent', math.nan)):.3f} &middot; "
            f"response tokens kept {n_kept} / {n_kept + n_pruned}"
        )
        token_ppl = s.get("token_ppl") or [None] * len(roles)
        spans = []
        for tok, role, p in zip(s["tokens"], roles, token_ppl):
            tip = f" title='ppl {p:.2f}'" if p is not None else ""
            spans.append(f"<span class='{role}'{tip}>{html.escape(tok)}</span>")
        parts.append(f"<div class='sample'><div class='meta'>{meta}</div><div class='text'>{''.join(spans)}</div></div>")
    parts.append("</body></html>")
    return "\n".join(p for p in parts if p)


# --------------------------------------------------------------------------- sweeps: arms over seeds
def sweep_table(rows: Sequence[Mapping[str, Any]], baseline: str = "full") -> pd.DataFrame:
    """`rows`: one per (arm, seed) with name, seed, scores (dict), average, loss_tokens, loop_seconds."""
    flat = pd.DataFrame(
        [
            {"arm": r["name"], "seed": r["seed"], **dict(r["scores"]), "average": r["average"],
             "loss_tokens": r["loss_tokens"], "loop_seconds": r["loop_seconds"]}
            for r in rows
        ]
    )
    order = list(dict.fromkeys(flat["arm"]))  # first-seen order: the baseline, then the sweep's arms
    benchmarks = [b for b in BENCHMARKS if b in flat] + [c for c in flat if c not in (*BENCHMARKS, "arm", "seed", "average", "loss_tokens", "loop_seconds")]
    g = flat.groupby("arm", sort=False)
    table = g[benchmarks + ["average", "loss_tokens", "loop_seconds"]].mean()
    table["average_sd"] = g["average"].std(ddof=1).fillna(0.0) if len(flat) > len(order) else 0.0
    table["seeds"] = g["seed"].nunique()
    base = table.loc[baseline, "average"] if baseline in table.index else float("nan")
    table["ratio_to_full"] = table["average"] / base if base else float("nan")
    cols = benchmarks + ["average", "average_sd", "ratio_to_full", "loss_tokens", "loop_seconds", "seeds"]
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
            elif c == "loop_seconds":
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
