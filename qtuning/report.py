"""What a comparison shows a reader: the EU plane, the comparison table, the pruned tokens of a few samples.

Framework-free (matplotlib, pandas, numpy): the pipeline's tasks log these files to MLflow, and anything
else can call them on a scores table or a list of arm results.

- `eu_plane_figure(scores, ratio)`: PPL x Ent on log axes, the quadrant thresholds that triage at `ratio`
  gives on the whole set, points coloured by quadrant; returns the figure and the quadrant shares.
- `comparison_table(arms)` / `format_table(table)`: per arm the benchmarks (with lm-eval's standard error),
  their average, the ratio of the average to full-data SFT, the tokens that carried loss and the training wall
  time; with per-item results, each arm's paired-bootstrap difference to full data with its test
  (`paired_bootstrap`: exact McNemar on right/wrong items, sign-flip on the average), marked only where it
  survives Holm's correction across the table (`holm`), and plain notes on what the item counts can separate.
- `pruned_tokens_html(samples)`: prompt, kept and pruned response tokens of a few samples, readable in a
  browser (and in MLflow's artifact viewer).
- `sweep_table(rows)` / `format_sweep_table(table)` / `sweep_figure(table)`: a sweep's arms with the mean and
  spread over seeds of each benchmark and of the average, and the average against the tokens that carried loss.
- from a run's selection log (`qtuning.selection`, one row per step, pool and sample): `quadrant_transitions(log)`
  and `migration_figure(log)` (how samples move between quadrants from one epoch to the next: shares per epoch
  and the transition matrix, e.g. how many Q2 samples became Q3), `eu_plane_at_steps(log, steps)` (the EU plane
  of the model as it was at those steps) and `kept_ids(log, which)` (the rows a dynamic arm trained on, as a
  `data.subset` file's ids).
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
    """Shares of the rows: where the triage's final thresholds put them, and what it kept.

    q1..q4, none: geometric quadrants at the final thresholds, before fill-in (they sum to 1);
    kept: kept rows; kept_q2 / kept_q4: kept rows treated as Q2 (token-pruned) / as Q4 (trained whole),
    fill-ins included; filled: rows the fill-in added, and filled_from_q1 / filled_from_q3 / filled_from_none
    by the quadrant they lie in (a fill-in never lies in Q2 or Q4: those are kept already); alpha = beta reached.
    """
    n = len(t.keep)
    shares = {f"q{q}": float((t.quadrant == q).sum() / n) for q in (1, 2, 3, 4)}
    shares.update(
        none=float((t.quadrant == 0).sum() / n),
        kept=float(t.keep.sum() / n),
        kept_q2=float((t.keep & t.q2).sum() / n),
        kept_q4=float((t.keep & ~t.q2).sum() / n),
        filled=float(t.fill_in.sum() / n),
        filled_from_q1=float((t.fill_in & (t.quadrant == Q1_NOISE)).sum() / n),
        filled_from_q3=float((t.fill_in & (t.quadrant == Q3_MASTERED)).sum() / n),
        filled_from_none=float((t.fill_in & (t.quadrant == 0)).sum() / n),
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

    Colours are the geometric quadrants at the final thresholds (before fill-in); rows the quadrants keep are
    diamonds; rows the fill-in added are stars, filled with the colour of what they count as (Q2 or Q4) and
    edged with the colour of the quadrant they lie in, with their own legend entries.

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
            kept = in_q & t.keep & ~t.fill_in
            rest = in_q & ~kept & ~t.fill_in
            n_fill = int((in_q & t.fill_in).sum())
            ax.scatter(ppl[rest], ent[rest], s=14, c=colour, alpha=0.55, marker="o",
                       label=f"{name}: {int(in_q.sum())}" + (f" ({int(kept.sum())} kept)" if kept.any() else "")
                       + (f" ({n_fill} filled in)" if n_fill else ""))
            if kept.any():
                ax.scatter(ppl[kept], ent[kept], s=26, c=colour, edgecolors="black", linewidths=0.7, marker="D")
        for as_q2, role in ((True, Q2_MISCONCEPTION), (False, Q4_CALIBRATION)):
            fill = t.fill_in & (t.q2 == as_q2)
            if fill.any():
                edges = [QUADRANTS[int(q)][1] for q in t.quadrant[fill]]
                ax.scatter(ppl[fill], ent[fill], s=90, c=QUADRANTS[role][1], edgecolors=edges, linewidths=1.5, marker="*",
                           label=f"filled in as {QUADRANTS[role][0].split()[0]}: {int(fill.sum())} (edge: where it lies)")
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


# --------------------------------------------------------------------------- differences with their noise
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_LEVEL = 0.95


def paired_bootstrap(
    arm: pd.DataFrame, base: pd.DataFrame, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
) -> pd.DataFrame:
    """Paired bootstrap of `arm` minus `base`, in points, per benchmark and on their average.

    `arm`, `base`: one row per evaluated item with columns task, doc_id, correct (0/1, or a score in [0, 1]),
    as each evaluation's samples.jsonl holds them. Items are paired on (task, doc_id); an item only one side
    scored is left out. Each resample draws every benchmark's items with replacement, the same draw for both
    arms, independently per benchmark (seeded: the same inputs give the same intervals). The average is the
    unweighted mean of the benchmarks, as the table's average.

    Returns one row per benchmark, then `average`: diff (the mean paired difference x 100, exact), lo and hi
    (the percentile interval at `level`), n_items (pairs), p (the two-sided p-value of "no difference": on a
    benchmark of right/wrong items the exact McNemar test, a binomial test on the discordant pairs, where the
    percentile bootstrap is anti-conservative (5 wins to 0 gives an interval above 0 but p = 0.0625); on
    graded items and on the average a paired sign-flip randomization test), and outside_noise (p < 1 - level;
    uncorrected: `comparison_table` corrects across the tests of a table).
    """
    cols = ["task", "doc_id", "correct"]
    pairs = pd.merge(_items(arm)[cols], _items(base)[cols], on=["task", "doc_id"], suffixes=("_arm", "_base"))
    if pairs.empty:
        raise ValueError("paired_bootstrap: the two arms share no evaluated item (task, doc_id)")
    rng = np.random.default_rng(seed)
    tail = (1 - level) / 2 * 100
    flips = np.random.default_rng([seed, 1])  # the randomization test's own stream: the intervals stay as they were
    rows, draws, flipped, diffs = [], [], [], []
    for task, g in pairs.groupby("task", sort=False):
        a, b = g["correct_arm"].to_numpy(float), g["correct_base"].to_numpy(float)
        d = (a - b) * 100  # (n,) points
        means = d[rng.integers(0, len(d), size=(n_resamples, len(d)))].mean(1)  # (R,)
        draws.append(means)
        signs = flips.choice([-1.0, 1.0], size=(n_resamples, len(d)))
        flipped.append((signs * d).mean(1))  # (R,) the benchmark's mean difference with random arm labels
        diffs.append(d.mean())
        if np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all():
            p = mcnemar_exact(int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum()))
        else:
            p = _randomization_p(d.mean(), flipped[-1])
        rows.append({"benchmark": task, "diff": float(d.mean()), "lo": float(np.percentile(means, tail)),
                     "hi": float(np.percentile(means, 100 - tail)), "n_items": len(d), "p": p})
    benches = [r["benchmark"] for r in rows]
    avg = np.mean(draws, axis=0)  # (R,) the average over benchmarks of each resample
    rows.append({"benchmark": "average", "diff": float(np.mean([r["diff"] for r in rows])),
                 "lo": float(np.percentile(avg, tail)), "hi": float(np.percentile(avg, 100 - tail)),
                 "n_items": int(sum(r["n_items"] for r in rows)),
                 "p": _randomization_p(float(np.mean(diffs)), np.mean(flipped, axis=0))})
    out = pd.DataFrame(rows).set_index("benchmark")
    out["outside_noise"] = out["p"] < 1 - level
    order = [b for b in BENCHMARKS if b in benches] + [b for b in benches if b not in BENCHMARKS] + ["average"]
    return out.loc[order]


def mcnemar_exact(wins: int, losses: int) -> float:
    """Two-sided exact McNemar p-value: the discordant pairs (arm right and base wrong: `wins`; the reverse:
    `losses`) as a binomial test against 1/2. No discordant pair: 1."""
    n = wins + losses
    if n == 0:
        return 1.0
    from scipy.stats import binomtest

    return float(binomtest(wins, n, 0.5).pvalue)


def _randomization_p(observed: float, null: np.ndarray) -> float:
    """Two-sided p-value of `observed` against its sign-flip null draws, (1 + as extreme) / (1 + draws): never 0,
    valid at any number of items."""
    extreme = np.abs(null) >= abs(observed) - 1e-9
    return float((1 + extreme.sum()) / (1 + len(null)))


def holm(pvalues: Mapping[Any, float]) -> dict[Any, float]:
    """Holm's step-down adjustment of a family of p-values (controls the chance of any false mark at the level)."""
    keys = sorted(pvalues, key=lambda k: pvalues[k])
    m, out, running = len(keys), {}, 0.0
    for i, k in enumerate(keys):
        running = max(running, min(1.0, (m - i) * pvalues[k]))
        out[k] = running
    return out


def _items(samples: Any) -> pd.DataFrame:
    """Per-item correctness as a frame (from a frame or a list of rows); items without a verdict are dropped."""
    df = samples if isinstance(samples, pd.DataFrame) else pd.DataFrame(list(samples))
    df = df.dropna(subset=["correct"]).copy()
    df["correct"] = df["correct"].astype(float)
    return df


# --------------------------------------------------------------------------- the comparison table
def comparison_table(
    arms: Sequence[Mapping[str, Any]], baseline: str | None = None, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
) -> pd.DataFrame:
    """One row per arm: benchmark scores (percent), average, ratio_to_full, loss_tokens, loop_seconds.

    Each arm is a mapping with `name`, `scores` ({benchmark: percent}), `average`, `loss_tokens` and
    `loop_seconds`. `baseline` names the full-data arm (default: the arm named 'full', else the first);
    ratio_to_full = average / the baseline's average. Optional, and added as columns when an arm has them:
    `budget` (the arm's pruning.budget: a `budget` column), `kept_rows` (the share of its pools' rows it trained:
    its sample budget as spent), `rules` ("sample/token": with a Q-Tuning arm among three or more, a
    `tokens_vs_qtuning` column, each arm's loss tokens over Q-Tuning's), `heldout_loss` (mean NLL per response token of the
    rows held out of training, measured after training: a `heldout_loss` column, lower is better), `stderr` ({benchmark: lm-eval's standard error,
    points}: `<benchmark>_stderr` columns) and `samples` (per-item correctness, see `paired_bootstrap`): when
    the baseline and an arm both have them, `<benchmark>_diff/_lo/_hi` and `diff/diff_lo/diff_hi` (the
    average) and `outside_noise`, the paired bootstrap of the arm minus the baseline, and `items` per benchmark.
    """
    names = [a["name"] for a in arms]
    if baseline is None:
        baseline = "full" if "full" in names else names[0]
    if baseline not in names:
        raise ValueError(f"baseline arm {baseline!r} is not among the arms {names}")
    benches = [b for b in BENCHMARKS if any(b in a["scores"] for a in arms)]
    benches += sorted({b for a in arms for b in a["scores"]} - set(benches))
    base = next(a for a in arms if a["name"] == baseline)
    base_avg = float(base["average"])
    with_budget = any(a.get("budget") for a in arms)
    with_stderr = any(a.get("stderr") for a in arms)
    with_heldout = any(a.get("heldout_loss") is not None for a in arms)
    base_samples = base.get("samples")
    with_kept = any(a.get("kept_rows") is not None for a in arms)
    qt = next((a for a in arms if a.get("rules") == "qtuning/qtuning" and a.get("loss_tokens")), None)
    qt_tokens = int(qt["loss_tokens"]) if qt is not None and len(arms) > 2 else 0  # worth a column beside other pruned arms
    rows = []
    for a in arms:
        row: dict[str, Any] = {"arm": a["name"]}
        if with_budget:
            row["budget"] = a.get("budget") or "-"
        row.update({b: float(a["scores"].get(b, math.nan)) for b in benches})
        if with_stderr:
            row.update({f"{b}_stderr": float((a.get("stderr") or {}).get(b, math.nan)) for b in benches})
        avg = float(a["average"])
        row["average"] = avg
        if with_stderr:  # the benchmarks' errors, independent, through the unweighted mean
            se = [row[f"{b}_stderr"] for b in benches if b in a["scores"]]
            row["average_stderr"] = math.sqrt(sum(x * x for x in se)) / len(se) if se else math.nan
        row["ratio_to_full"] = avg / base_avg if base_avg else math.nan
        row["loss_tokens"] = int(a.get("loss_tokens") or 0)
        row["loop_seconds"] = float(a.get("loop_seconds") or 0.0)
        if with_heldout:
            row["heldout_loss"] = float(a["heldout_loss"]) if a.get("heldout_loss") is not None else math.nan
        if a.get("budget_tokens"):  # equal_tokens: the share of its budget the arm reached
            row["budget_share"] = row["loss_tokens"] / int(a["budget_tokens"])
        if with_kept:  # the sample budget each arm spent, and its loss tokens against Q-Tuning's
            row["kept_rows"] = float(a["kept_rows"]) if a.get("kept_rows") is not None else math.nan
        if qt_tokens:
            row["tokens_vs_qtuning"] = row["loss_tokens"] / qt_tokens if row["loss_tokens"] else math.nan
        if base_samples is not None and a.get("samples") is not None and a["name"] != baseline:
            boot = paired_bootstrap(a["samples"], base_samples, n_resamples=n_resamples, seed=seed)
            for b, r in boot.iterrows():
                prefix = "" if b == "average" else f"{b}_"
                row.update({f"{prefix}diff": r["diff"], f"{prefix}diff_lo": r["lo"], f"{prefix}diff_hi": r["hi"],
                            f"{prefix}diff_p": r["p"]})
                if b != "average":
                    row[f"{b}_items"] = int(r["n_items"])
        rows.append(row)
    table = pd.DataFrame(rows).set_index("arm")
    if "diff_p" in table.columns:  # one family: every arm's difference on every benchmark and on the average
        family = {(arm, col): p for col in table.columns if col.endswith("diff_p")
                  for arm, p in table[col].items() if not math.isnan(p)}
        adjusted = holm(family)
        for (arm, col), p in adjusted.items():
            table.loc[arm, col.replace("diff_p", "diff_p_holm")] = p
        table["outside_noise"] = table["diff_p_holm"] < 1 - BOOTSTRAP_LEVEL
        table.loc[table["diff_p_holm"].isna(), "outside_noise"] = False
        table.attrs["tests"] = len(family)
    table.attrs.update(baseline=baseline, benchmarks=benches, n_resamples=n_resamples)
    return table


def marked(table: pd.DataFrame, arm: Any, prefix: str = "") -> bool:
    """Whether the arm's difference (on benchmark `prefix` or the average) survives Holm's correction."""
    p = table.at[arm, f"{prefix}diff_p_holm"] if f"{prefix}diff_p_holm" in table.columns else math.nan
    return not math.isnan(p) and p < 1 - BOOTSTRAP_LEVEL


def _signed(v: float, digits: int = 2) -> str:
    return f"{v:+.{digits}f}"


def _interval(table: pd.DataFrame, arm: Any, prefix: str, digits: int = 2) -> str:
    """'+1.25 [-3.00, +5.50]*' (the * when the difference's test survives Holm's correction across the table),
    or '' where the arm has none."""
    d = table.at[arm, f"{prefix}diff"]
    if isinstance(d, float) and math.isnan(d):
        return ""
    lo, hi = table.at[arm, f"{prefix}diff_lo"], table.at[arm, f"{prefix}diff_hi"]
    return (f"{_signed(d, digits)} [{_signed(lo, digits)}, {_signed(hi, digits)}]"
            + ("*" if marked(table, arm, prefix) else ""))


def budget_notes(table: pd.DataFrame, tolerance: float = 0.005) -> list[str]:
    """One sentence per equal_tokens arm that trained fewer loss tokens than Q-Tuning would have on its pools."""
    if "budget_share" not in table.columns:
        return []
    return [f"{arm} (budget equal_tokens) trained {share:.0%} of the loss tokens Q-Tuning would have trained on its "
            "pools: where a pool's kept rows hold fewer response tokens than Q-Tuning keeps, token pruning cannot add "
            "any, so the arm is compared at a smaller budget than its name says."
            for arm, share in table["budget_share"].items() if not math.isnan(share) and share < 1 - tolerance]


def noise_notes(table: pd.DataFrame) -> list[str]:
    """Plain sentences on what the table can and cannot tell apart (empty without paired differences)."""
    if "diff" not in table.columns:
        return []
    base = table.attrs.get("baseline", "the baseline")
    benches = [b for b in table.attrs.get("benchmarks", []) if f"{b}_diff" in table.columns]
    pruned = table[table["diff"].notna()]
    if pruned.empty:
        return []
    items = {b: int(pruned[f"{b}_items"].max()) for b in benches if f"{b}_items" in pruned}
    sizes = sorted(set(items.values()))
    per = f"{sizes[0]} item{'s' if sizes[0] != 1 else ''} per benchmark" if len(sizes) == 1 else "items per benchmark: " + ", ".join(f"{b} {n}" for b, n in items.items())
    # the widest interval seen, but never less than one item's worth (arms that agree on every item give a
    # zero-width interval, which says nothing about what a few more items would do)
    one_item = 100.0 / min(items.values()) if items else math.nan
    half_b = max([one_item] + [((pruned[f"{b}_diff_hi"] - pruned[f"{b}_diff_lo"]) / 2).max() for b in benches])
    half_a = max(one_item / max(len(benches), 1), float(((pruned["diff_hi"] - pruned["diff_lo"]) / 2).max()))
    n_res = table.attrs.get("n_resamples", BOOTSTRAP_RESAMPLES)
    tests = table.attrs.get("tests", 0)
    notes = [
        f"Differences to {base}: paired bootstrap over the same items ({n_res} resamples, {BOOTSTRAP_LEVEL:.0%} "
        f"interval); * marks a difference whose test (exact McNemar on a benchmark's right/wrong items, a sign-flip "
        f"test on graded items and on the average) stays under {1 - BOOTSTRAP_LEVEL:.0%} after Holm's correction "
        f"across the {tests} tests of this table.",
        f"{per} (one item = {one_item:.1f} points): differences under ±{half_b:.1f} points on a benchmark, or "
        f"±{half_a:.1f} on the average, are noise.",
    ]
    if not pruned["outside_noise"].any():
        notes.append(f"No arm's average differs from {base} beyond the noise: the items are too few to separate the arms.")
    if any(c.endswith("_stderr") for c in table.columns):
        notes.append("± after a score: lm-eval's standard error of that score.")
    return notes


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """The table as aligned text (terminal) or as a Markdown table (README, MLflow).

    A score with its standard error reads '52.00 ± 3.10'; with paired differences, the average's difference
    to the baseline and its interval follow the average, the per-benchmark differences come in a second
    table, and `noise_notes` end the text.
    """
    benches = table.attrs.get("benchmarks") or [c for c in table.columns if c in BENCHMARKS]
    shown = [c for c in table.columns if not c.endswith(("_stderr", "_diff", "_diff_lo", "_diff_hi", "_diff_p", "_diff_p_holm", "_items"))
             and c not in ("diff", "diff_lo", "diff_hi", "diff_p", "diff_p_holm", "outside_noise", "budget_share")]
    has_diff = "diff" in table.columns
    cols = list(shown)
    if has_diff:
        cols.insert(cols.index("average") + 1, "diff_average")

    def cell(arm: Any, col: str) -> str:
        if col == "diff_average":
            return _interval(table, arm, "") or "-"
        v = table.at[arm, col]
        if isinstance(v, float) and math.isnan(v):
            return "-"
        if col == "ratio_to_full":
            return f"{v:.3f}"
        if col == "loss_tokens":
            return f"{int(v):,}"
        if col in ("kept_rows", "tokens_vs_qtuning"):
            return f"{v:.0%}"
        if col == "loop_seconds":
            return f"{v:.1f}"
        if col == "heldout_loss":
            return f"{v:.4f}"
        se = table.at[arm, f"{col}_stderr"] if f"{col}_stderr" in table.columns else math.nan
        if isinstance(v, float) and not math.isnan(se):
            return f"{v:.2f} ± {se:.2f}"
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    header = ["arm", *(f"average - {table.attrs.get('baseline', 'full')} [95%]" if c == "diff_average" else c for c in cols)]
    body = [[str(arm), *(cell(arm, c) for c in cols)] for arm in table.index]
    blocks = [_render(header, body, markdown)]
    if has_diff and benches:
        diff_rows = [[str(arm), *(_interval(table, arm, f"{b}_") or "-" for b in benches)]
                     for arm in table.index if not math.isnan(table.at[arm, "diff"])]
        blocks.append(_render([f"arm - {table.attrs.get('baseline', 'full')}", *benches], diff_rows, markdown))
    notes = noise_notes(table) + budget_notes(table)
    if notes:
        blocks.append("\n".join(("- " if markdown else "") + n for n in notes))
    return "\n\n".join(blocks)


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    """Cells already formatted as strings -> tabulate's aligned text (arm left, figures right) or a Markdown pipe table."""
    from tabulate import tabulate

    align = ("left", *["right"] * (len(header) - 1))
    return tabulate(body, headers=header, tablefmt="pipe" if markdown else "simple", colalign=align, disable_numparse=True)


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
def _shared(runs: Sequence[pd.Series | pd.DataFrame], empty: str) -> pd.Index:
    """The index every run holds (the items or rows all of them measured), sorted; ValueError(`empty`) if none."""
    common = runs[0].index
    for r in runs[1:]:
        common = common.intersection(r.index)
    if common.empty:
        raise ValueError(empty)
    return common.sort_values()


def seeded_difference(
    arm: Sequence[Any], base: Sequence[Any], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, float]:
    """An arm's difference to the baseline on the average of the benchmarks, in points, with both sources of
    noise: `arm` and `base` hold one per-item table per training seed (task, doc_id, correct; as in
    `paired_bootstrap`). Each resample draws the seeds of each side with replacement and every benchmark's
    items with replacement (the same items for every run: the runs answered the same questions), so the
    interval widens with the spread between seeds as well as with the item count.

    Returns diff (the mean over seeds of each side, exact), lo, hi (percentile interval), p (two-sided: twice
    the smaller share of resamples on either side of 0, at least 1 / (resamples + 1)), seeds (the fewer of the
    two sides') and n_items. With 3 seeds a side, the seed draw has only 10 distinct outcomes: the interval
    is wider than an item-only one, but still an estimate from few runs."""
    runs = [_items(x).set_index(["task", "doc_id"])["correct"] for x in (*arm, *base)]
    common = _shared(runs, "seeded_difference: the runs share no evaluated item (task, doc_id)")
    matrix = np.stack([r.loc[common].to_numpy(float) for r in runs]) * 100  # (runs, items) points
    tasks = common.get_level_values("task")
    k_arm = len(arm)
    rng = np.random.default_rng(seed)
    draws, exact = [], []
    for task in pd.unique(tasks):
        m = matrix[:, np.asarray(tasks == task)]  # (runs, n)
        n = m.shape[1]
        counts = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples)  # (R, n): the item draw
        per_run = m @ counts.T / n  # (runs, R): each run's mean on each resample's items
        pick_a = rng.integers(0, k_arm, size=(n_resamples, k_arm))
        pick_b = k_arm + rng.integers(0, len(base), size=(n_resamples, len(base)))
        cols = np.arange(n_resamples)[:, None]
        draws.append(per_run[pick_a, cols].mean(1) - per_run[pick_b, cols].mean(1))  # (R,)
        exact.append(m[:k_arm].mean() - m[k_arm:].mean())
    d = np.mean(draws, axis=0)
    tail = (1 - level) / 2 * 100
    p = max(1 / (n_resamples + 1), min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return {"diff": float(np.mean(exact)), "lo": float(np.percentile(d, tail)), "hi": float(np.percentile(d, 100 - tail)),
            "p": float(p), "seeds": min(k_arm, len(base)), "n_items": len(common)}


def seeded_loss_difference(
    arm: Sequence[pd.DataFrame], base: Sequence[pd.DataFrame], n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
    level: float = BOOTSTRAP_LEVEL,
) -> dict[str, float]:
    """An arm's held-out loss minus the baseline's (negative: the arm fits the held-out rows better), with the
    same two sources of noise as `seeded_difference`: `arm` and `base` hold one table per training seed of the
    final held-out measurement row by row (sample_id, nll: summed over the row's response tokens, tokens). Each
    resample draws the seeds of each side with replacement and the held-out rows with replacement (the same
    rows for every run: each run measured the same rows); a run's loss on a resample is its NLL over its
    tokens on the drawn rows, as the loss itself is (a mean per token, not per row).

    Returns diff (mean over seeds of each side, exact), lo, hi (percentile interval), p (two-sided, as in
    `seeded_difference`), seeds and n_rows."""
    runs = [x.set_index("sample_id")[["nll", "tokens"]] for x in (*arm, *base)]
    common = _shared(runs, "seeded_loss_difference: the runs share no held-out row (sample_id)")
    nll = np.stack([r.loc[common, "nll"].to_numpy(float) for r in runs])  # (runs, rows)
    tokens = np.stack([r.loc[common, "tokens"].to_numpy(float) for r in runs])
    n, k_arm = len(common), len(arm)
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1 / n), size=n_resamples)  # (R, n): the row draw
    per_run = (nll @ counts.T) / (tokens @ counts.T)  # (runs, R): each run's loss on each resample's rows
    cols = np.arange(n_resamples)[:, None]
    pick_a = rng.integers(0, k_arm, size=(n_resamples, k_arm))
    pick_b = k_arm + rng.integers(0, len(base), size=(n_resamples, len(base)))
    d = per_run[pick_a, cols].mean(1) - per_run[pick_b, cols].mean(1)
    loss = nll.sum(1) / tokens.sum(1)
    tail = (1 - level) / 2 * 100
    p = max(1 / (n_resamples + 1), min(1.0, 2 * min((d <= 0).mean(), (d >= 0).mean())))
    return {"diff": float(loss[:k_arm].mean() - loss[k_arm:].mean()), "lo": float(np.percentile(d, tail)),
            "hi": float(np.percentile(d, 100 - tail)), "p": float(p), "seeds": min(k_arm, len(base)), "n_rows": n}


def sweep_table(rows: Sequence[Mapping[str, Any]], baseline: str = "full", n_resamples: int = BOOTSTRAP_RESAMPLES,
                seed: int = 0) -> pd.DataFrame:
    """`rows`: one per (arm, seed) with name, seed, scores (dict), average, loss_tokens, loop_seconds, and
    optionally `samples` (per-item correctness), `heldout_loss` and `heldout` (the held-out rows' sample_id, nll,
    tokens). With per-item results, each arm's difference to the baseline on the average over seeds and items
    together (`seeded_difference`: diff, diff_lo, diff_hi, diff_p); with held-out rows, its held-out loss
    difference over seeds and rows (`seeded_loss_difference`: heldout_diff, heldout_diff_lo, ...). Both measures
    of every arm form one family, corrected with Holm (`*_p_holm`): a difference is marked only where that stays
    under 5%."""
    flat = pd.DataFrame(
        [
            {"arm": r["name"], "seed": r["seed"], **dict(r["scores"]), "average": r["average"],
             "loss_tokens": r["loss_tokens"], "loop_seconds": r["loop_seconds"],
             "heldout_loss": math.nan if r.get("heldout_loss") is None else float(r["heldout_loss"])}
            for r in rows
        ]
    )
    order = list(dict.fromkeys(flat["arm"]))  # first-seen order: the baseline, then the sweep's arms
    extra = ("arm", "seed", "average", "loss_tokens", "loop_seconds", "heldout_loss")
    benchmarks = [b for b in BENCHMARKS if b in flat] + [c for c in flat if c not in (*BENCHMARKS, *extra)]
    with_heldout = bool(flat["heldout_loss"].notna().any())
    g = flat.groupby("arm", sort=False)
    measures = ["average", "loss_tokens", "loop_seconds"] + (["heldout_loss"] if with_heldout else [])
    table = g[benchmarks + measures].mean()
    several = len(flat) > len(order)
    table["average_sd"] = g["average"].std(ddof=1).fillna(0.0) if several else 0.0
    if with_heldout:
        table["heldout_loss_sd"] = g["heldout_loss"].std(ddof=1).fillna(0.0) if several else 0.0
    table["seeds"] = g["seed"].nunique()
    base = table.loc[baseline, "average"] if baseline in table.index else float("nan")
    table["ratio_to_full"] = table["average"] / base if base else float("nan")
    cols = benchmarks + ["average", "average_sd", "ratio_to_full", "loss_tokens", "loop_seconds", "seeds"]
    if with_heldout:
        cols.insert(cols.index("ratio_to_full") + 1, "heldout_loss")
        cols.insert(cols.index("heldout_loss") + 1, "heldout_loss_sd")
    table = table.loc[order, cols]
    by_arm: dict[str, dict[str, list]] = {"samples": {}, "heldout": {}}
    for r in rows:
        for key in by_arm:
            if r.get(key) is not None:
                by_arm[key].setdefault(r["name"], []).append(r[key])
    family: dict[tuple[str, str], float] = {}
    for key, prefix, difference in (("samples", "", seeded_difference), ("heldout", "heldout_", seeded_loss_difference)):
        runs = by_arm[key]
        if baseline not in runs:
            continue
        for arm in order:
            if arm != baseline and arm in runs:
                d = difference(runs[arm], runs[baseline], n_resamples=n_resamples, seed=seed)
                for k in ("diff", "lo", "hi", "p"):
                    table.loc[arm, f"{prefix}diff" if k == "diff" else f"{prefix}diff_{k}"] = d[k]
                family[(arm, prefix)] = d["p"]
    for (arm, prefix), p in holm(family).items():
        table.loc[arm, f"{prefix}diff_p_holm"] = p
    table.attrs.update(baseline=baseline, n_resamples=n_resamples, tests=len(family))
    return table


def format_sweep_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """The sweep's table; with per-item results, a `vs <baseline>` column (the difference over seeds and items,
    its interval, * where it survives Holm's correction); with per-row held-out losses, a `heldout vs
    <baseline>` column the same way; and a note on how they were made."""
    several = int(table["seeds"].max()) > 1
    base = table.attrs.get("baseline", "full")
    hidden = ("average_sd", "heldout_loss_sd", "seeds", "diff", "diff_lo", "diff_hi", "diff_p", "diff_p_holm",
              "heldout_diff", "heldout_diff_lo", "heldout_diff_hi", "heldout_diff_p", "heldout_diff_p_holm")
    header = ["arm", *[c for c in table.columns if c not in hidden], "seeds"]
    if "diff" in table.columns:
        header.insert(header.index("average") + 1, f"vs {base}")
    if "heldout_diff" in table.columns:
        header.insert(header.index("heldout_loss") + 1, f"heldout vs {base}")
    lines = []
    for arm, r in table.iterrows():
        cells = [str(arm)]
        for c in header[1:-1]:
            v = r[c] if c in r.index else None
            if c == f"vs {base}":
                cells.append("-" if pd.isna(r["diff"]) else _interval(table, arm, ""))
            elif c == f"heldout vs {base}":
                cells.append("-" if pd.isna(r["heldout_diff"]) else _interval(table, arm, "heldout_", digits=3))
            elif c == "average" and several:
                cells.append(f"{v:.2f} ± {r['average_sd']:.2f}")
            elif c == "heldout_loss":
                cells.append("" if pd.isna(v) else f"{v:.3f} ± {r['heldout_loss_sd']:.3f}" if several else f"{v:.3f}")
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
    text = _render(header, lines, markdown)
    notes = []
    if "diff" in table.columns:
        notes.append(f"vs {base}: the difference of the average, resampled over training seeds and items together")
    if "heldout_diff" in table.columns:
        notes.append(f"heldout vs {base}: the difference of the held-out loss (per response token; negative: the arm "
                     "fits the held-out rows better), resampled over training seeds and held-out rows together")
    if notes:
        text += ("\n\n" + "; ".join(notes) + f" ({table.attrs.get('n_resamples', BOOTSTRAP_RESAMPLES)} resamples, "
                 f"{BOOTSTRAP_LEVEL:.0%} intervals); * where the difference stays under {1 - BOOTSTRAP_LEVEL:.0%} after "
                 f"Holm's correction across the {table.attrs.get('tests', '')} tests of the table (every arm, every "
                 "measure). ± after a mean: its standard deviation over seeds.")
    return text


def sweep_figure(table: pd.DataFrame, baseline: str = "full"):
    """Average score against tokens that carried loss, and beside it the held-out loss against them where the
    sweep measured one; one point per arm (± its sd over seeds), the baseline a star with a dashed level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("average", "average_sd", "average benchmark score (%)", "Score against training tokens")]
    if "heldout_loss" in table.columns and table["heldout_loss"].notna().any():
        panels.append(("heldout_loss", "heldout_loss_sd", "held-out loss (NLL per token, lower is better)",
                       "Held-out loss against training tokens"))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 4.5), squeeze=False)
    for ax, (col, sd, ylabel, title) in zip(axes[0], panels):
        for arm, r in table.iterrows():
            is_base = arm == baseline
            ax.errorbar(
                r["loss_tokens"], r[col], yerr=r[sd] if r["seeds"] > 1 else None,
                fmt="*" if is_base else "o", ms=14 if is_base else 7, capsize=3,
                color="black" if is_base else None, label=f"{arm} (full data)" if is_base else arm,
            )
            if is_base:
                ax.axhline(r[col], color="black", ls="--", lw=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("tokens that carried loss (log)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{title}, one point per arm")
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- the selection log: what the model learned
QUADRANT_ORDER = (Q1_NOISE, Q2_MISCONCEPTION, Q3_MASTERED, Q4_CALIBRATION, 0)


def _short(q: int) -> str:
    return f"Q{q}" if q else "none"


def _triaged(log: pd.DataFrame) -> pd.DataFrame:
    """Rows whose pool was scored (ppl known): the only ones a quadrant means something for."""
    return log[log["ppl"].notna()] if "ppl" in log else log.iloc[:0]


def quadrant_transitions(log: pd.DataFrame) -> pd.DataFrame:
    """Samples moving from quadrant a (rows) in one epoch to quadrant b (columns) in the next, summed over every
    pair of consecutive epochs; quadrants 1..4 and 0 (between the thresholds). A sample seen in only one epoch
    counts nowhere. Empty (all zeros) for a run without triage or with a single epoch."""
    t = _triaged(log)
    per_epoch = t.drop_duplicates(["sample_id", "epoch"], keep="last").pivot(index="sample_id", columns="epoch", values="quadrant")
    counts = pd.DataFrame(0, index=list(QUADRANT_ORDER), columns=list(QUADRANT_ORDER))
    epochs = sorted(per_epoch.columns)
    for a, b in zip(epochs, epochs[1:]):
        pair = per_epoch[[a, b]].dropna().astype(int)
        for (qa, qb), n in pair.value_counts().items():
            counts.loc[qa, qb] += int(n)
    counts.index.name, counts.columns.name = "from", "to"
    return counts


def migration_figure(log: pd.DataFrame, title: str = "quadrant migration"):
    """How samples move between the EU plane's quadrants as training goes, from a selection log.

    Left: each epoch's share of the triaged samples in Q1..Q4 (geometric, before fill-in) and between the
    thresholds, with the share kept. Right: the transition matrix between consecutive epochs (counts; row = the
    quadrant in one epoch, column = the next), with the Q2 -> Q3 count (misconceptions that became mastered) in
    the title. Quadrants are relative to each pool's quantiles: a move says where a sample stands among its pool
    mates under the model of that step.

    Returns (Figure, summary): epochs, samples, transitions (samples seen in two consecutive epochs), q2_to_q3,
    q2_seen_again (Q2 samples with a next epoch), q3_to_q2.
    """
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = _triaged(log)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 5), dpi=110, gridspec_kw={"width_ratios": [1.1, 1]})
    epochs = sorted(t["epoch"].unique()) if len(t) else []
    bottom = np.zeros(len(epochs))
    for q in QUADRANT_ORDER:
        share = np.array([float((t.loc[t["epoch"] == e, "quadrant"] == q).mean()) for e in epochs]) if epochs else np.zeros(0)
        name, colour = QUADRANTS[q]
        left.bar([str(e) for e in epochs], share, bottom=bottom, color=colour, label=name, edgecolor="white")
        bottom += share
    for x, e in enumerate(epochs):
        kept = float(t.loc[t["epoch"] == e, "kept"].mean())
        left.text(x, 1.01, f"kept {kept:.0%}", ha="center", va="bottom", fontsize=7)
    left.set_ylim(0, 1.1)
    left.set_xlabel("epoch")
    left.set_ylabel("share of the epoch's triaged samples")
    left.set_title("quadrant shares per epoch", fontsize=9)
    left.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)

    counts = quadrant_transitions(log)
    total = int(counts.values.sum())
    q2_next = int(counts.loc[Q2_MISCONCEPTION].sum())
    summary = {"epochs": len(epochs), "samples": int(t["sample_id"].nunique()) if len(t) else 0, "transitions": total,
               "q2_to_q3": int(counts.loc[Q2_MISCONCEPTION, Q3_MASTERED]), "q2_seen_again": q2_next,
               "q3_to_q2": int(counts.loc[Q3_MASTERED, Q2_MISCONCEPTION])}
    if total:
        right.imshow(counts.values, cmap="Blues")
        for i in range(len(QUADRANT_ORDER)):
            for j in range(len(QUADRANT_ORDER)):
                v = int(counts.values[i, j])
                right.text(j, i, str(v), ha="center", va="center", fontsize=8,
                           color="white" if v > counts.values.max() / 2 else "black")
        labels = [_short(q) for q in QUADRANT_ORDER]
        right.set_xticks(range(len(labels)), labels)
        right.set_yticks(range(len(labels)), labels)
        right.set_xlabel("quadrant in the next epoch")
        right.set_ylabel("quadrant in an epoch")
        right.set_title(f"transitions between consecutive epochs (n={total})\nQ2 -> Q3 (misconception mastered): "
                        f"{summary['q2_to_q3']} of {q2_next} Q2 samples", fontsize=9)
    else:
        right.axis("off")
        why = "no triage in this run (no quadrants)" if not len(t) else "one epoch: no sample was triaged twice"
        right.text(0.5, 0.5, f"no transitions\n{why}", ha="center", va="center", fontsize=10, transform=right.transAxes)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig, summary


def default_steps(log: pd.DataFrame, n: int = 3) -> list[int]:
    """`n` steps spread over the run (first, middle, last) among those whose pools were scored."""
    steps = sorted(_triaged(log)["step"].unique())
    if len(steps) <= n:
        return [int(s) for s in steps]
    return [int(steps[round(i * (len(steps) - 1) / (n - 1))]) for i in range(n)]


def _readable_linear_axis(axis, values: pd.Series, min_rel_span: float = 0.02) -> None:
    """Few plain ticks on a linear axis: no offset or scientific notation, at most 4 of them (PPL 24,000-29,000
    rendered as "2400026000280002900" without), and limits at least `min_rel_span` of the centre apart (a
    spread of 1e-5 nats rendered as "1e-5+1.079e1")."""
    from matplotlib.ticker import MaxNLocator, ScalarFormatter

    if axis.get_scale() != "linear":
        return
    formatter = ScalarFormatter(useOffset=False)
    formatter.set_scientific(False)
    axis.set_major_formatter(formatter)
    axis.set_major_locator(MaxNLocator(nbins=4))
    if len(values):
        lo, hi = float(values.min()), float(values.max())
        centre, half = (lo + hi) / 2, max(hi - lo, min_rel_span * abs((lo + hi) / 2), 1e-9) / 2 * 1.1
        (axis.axes.set_xlim if axis is axis.axes.xaxis else axis.axes.set_ylim)(centre - half, centre + half)


def eu_plane_at_steps(log: pd.DataFrame, steps: Sequence[int] | None = None, title: str = "EU plane during training"):
    """The EU plane of the model as it was at each of `steps` (default: first, middle, last): one panel per step,
    the step's pools' samples by PPL and Ent, coloured by quadrant, kept rows as diamonds."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    t = _triaged(log)
    steps = list(steps) if steps is not None else default_steps(log)
    fig, axes = plt.subplots(1, max(1, len(steps)), figsize=(4.2 * max(1, len(steps)), 4), dpi=110, squeeze=False)
    for ax, step in zip(axes[0], steps):
        rows = t[t["step"] == step]
        for q in QUADRANT_ORDER:
            name, colour = QUADRANTS[q]
            in_q = rows[rows["quadrant"] == q]
            if in_q.empty:
                continue
            rest, kept = in_q[~in_q["kept"]], in_q[in_q["kept"]]
            ax.scatter(rest["ppl"], rest["ent"].clip(lower=1e-6), s=16, c=colour, alpha=0.6, label=f"{_short(q)}: {len(in_q)}")
            ax.scatter(kept["ppl"], kept["ent"].clip(lower=1e-6), s=30, c=colour, marker="D", edgecolors="black", linewidths=0.7)
        if len(rows) and rows["ppl"].max() / max(rows["ppl"].min(), 1e-12) >= 3:
            ax.set_xscale("log")
        else:
            _readable_linear_axis(ax.xaxis, rows["ppl"])
        _readable_linear_axis(ax.yaxis, rows["ent"].clip(lower=1e-6))
        epoch = int(rows["epoch"].iloc[0]) if len(rows) else -1
        ax.set_title(f"step {step} (epoch {epoch}): {int(rows['kept'].sum())}/{len(rows)} kept", fontsize=9)
        ax.set_xlabel("PPL")
        ax.set_ylabel("Ent (nats)")
        ax.grid(True, which="both", alpha=0.2)
        if len(rows):
            ax.legend(fontsize=6, loc="best")
    if not steps:
        axes[0][0].axis("off")
        axes[0][0].text(0.5, 0.5, "no scored pools in this run", ha="center", va="center", transform=axes[0][0].transAxes)
    fig.suptitle(f"{title} (diamonds: kept)", fontsize=10)
    fig.tight_layout()
    return fig


def kept_ids(log: pd.DataFrame, which: str = "any") -> list[str]:
    """The sample ids an arm trained on, in first-seen order: `any` (kept in at least one step) or `last_epoch`
    (kept in the run's last epoch). Written one per line, they are a `data.subset` file."""
    if which not in ("any", "last_epoch"):
        raise ValueError(f"which={which!r}: use 'any' or 'last_epoch'")
    rows = log[log["kept"]]
    if which == "last_epoch" and len(log):
        rows = rows[rows["epoch"] == log["epoch"].max()]
    return list(dict.fromkeys(rows["sample_id"]))
