"""Stage 1 (quadrant triage, baselines) and stage 2 (token pruning) on hand-built inputs."""

import math

import numpy as np
import pytest
import torch

from qtuning.config import PruningConfig
from qtuning.pruning import prune_tokens
from qtuning.rules import SAMPLE_RULES, PoolStats, Selection, context_scores
from qtuning.triage import Q1_NOISE, Q2_MISCONCEPTION, Q3_MASTERED, Q4_CALIBRATION, triage
from qtuning.data import IGNORE_INDEX as IGNORE


def _plane(n_per_quadrant: int = 4, seed: int = 0):
    """Samples placed in known quadrants: Q1 (hi, hi), Q2 (hi, lo), Q3 (lo, lo), Q4 (lo, hi)."""
    rng = np.random.default_rng(seed)
    ppl, ent, truth = [], [], []
    for q, (p, e) in {Q1_NOISE: (100, 5), Q2_MISCONCEPTION: (100, 1), Q3_MASTERED: (2, 1), Q4_CALIBRATION: (2, 5)}.items():
        ppl += list(p + rng.uniform(0, 1, n_per_quadrant))
        ent += list(e + rng.uniform(0, 0.1, n_per_quadrant))
        truth += [q] * n_per_quadrant
    return np.array(ppl), np.array(ent), np.array(truth)


def test_triage_keeps_misconception_and_calibration_quadrants():
    ppl, ent, truth = _plane(4)
    t = triage(ppl, ent, ratio=0.5)
    assert set(np.flatnonzero(t.keep)) == set(np.flatnonzero((truth == Q2_MISCONCEPTION) | (truth == Q4_CALIBRATION)))
    assert np.array_equal(t.q2, truth == Q2_MISCONCEPTION)
    assert t.filled == 0
    assert np.array_equal(t.quadrant[t.keep], truth[t.keep])


@pytest.mark.parametrize("ratio", [0.125, 0.25, 0.5])
def test_bisection_lands_within_tolerance(ratio):
    rng = np.random.default_rng(1)
    # anti-correlated error and uncertainty: Q2 and Q4 are well populated, so the bisection can hit the target
    x = rng.normal(size=256)
    ppl, ent = np.exp(x + 0.3 * rng.normal(size=256)), -x + 0.3 * rng.normal(size=256)
    t = triage(ppl, ent, ratio, iters=30, tol=0.01)
    assert t.filled == 0  # the bisection alone reached the target
    assert abs(t.keep.mean() - ratio) <= 0.01
    assert 0 <= t.alpha <= 0.49


def test_fill_in_ranks_by_distance_from_diagonal_and_assigns_quadrant():
    # error and uncertainty agree on every sample but two mid-plane ones: no quadrant is populated,
    # so the fill-in must take the two furthest from the diagonal of the normalised plane
    ppl = np.arange(1.0, 9.0)
    ent = ppl.copy()
    ent[3] = 8.0  # mid error, high uncertainty: counts as calibration (Q4)
    ent[4] = 1.0  # mid error, low uncertainty: counts as misconception (Q2)
    t = triage(ppl, ent, ratio=0.25, iters=1)
    assert t.filled == 2
    assert set(np.flatnonzero(t.keep)) == {3, 4}
    # issue 10: `quadrant` is the geometric quadrant before fill-in (neither row lies in one); what a fill-in
    # counts as is `q2` (token-pruned) or not (trained whole, as Q4), and `role` says so
    assert t.fill_in.tolist() == [False, False, False, True, True, False, False, False]
    assert t.quadrant[3] == t.quadrant[4] == 0
    assert t.role[4] == Q2_MISCONCEPTION and t.q2[4]
    assert t.role[3] == Q4_CALIBRATION and not t.q2[3]


def test_kept_set_larger_than_k_is_not_cut():
    ppl = np.arange(1.0, 17.0)
    ent = ppl[::-1].copy()  # perfectly anti-correlated: at alpha = 0.245 the top and bottom 4 are Q2 and Q4
    t = triage(ppl, ent, ratio=0.25, iters=1)
    assert t.keep.sum() == 8 > round(16 * 0.25)
    assert t.filled == 0


def _pool_batch():
    """Two rows: 3 prompt tokens then response tokens, with right padding on row 1."""
    labels = torch.tensor(
        [
            [IGNORE, IGNORE, IGNORE, 10, 11, 12, 13, 14, 15, 16, 17],
            [IGNORE, IGNORE, IGNORE, 20, 21, 22, 23, IGNORE, IGNORE, IGNORE, IGNORE],
        ]
    )
    attention = torch.tensor([[1] * 11, [1] * 7 + [0] * 4])
    nll = torch.tensor(
        [
            [0, 0, 0, 0.1, 5.0, 4.0, 0.2, 0.3, 3.0, 0.1, 0.1],
            [0, 0, 0, 2.0, 0.5, 0.6, 0.7, 0, 0, 0, 0],
        ]
    )
    return labels, attention, nll


def _selection(keep, prune):
    keep = torch.tensor(keep)
    return Selection(keep=keep, prune_tokens=torch.tensor(prune), weight=keep.float())


def test_per_sample_pruning_drops_highest_context_scores_of_q2_rows_only():
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(token_ratio=0.5, lam=0.5)
    sel = _selection([True, True], [True, False])  # row 0 is Q2, row 1 is Q4
    out = prune_tokens(labels, nll, attention, sel, cfg, torch.Generator())
    assert torch.equal(out[1], labels[1])  # Q4 keeps every token
    assert (out[0, :3] == IGNORE).all()  # prompt stays out of the loss
    resp = labels[0] != IGNORE
    kept = (out[0] != IGNORE) & resp
    assert kept.sum() == math.ceil(0.5 * 8)
    scores = context_scores(nll, labels != IGNORE, 0.5)[0]
    dropped = resp & ~kept
    assert scores[dropped].min() >= scores[kept].max()  # the highest-scoring tokens are the ones pruned


def test_lambda_zero_is_plain_token_perplexity():
    labels, attention, nll = _pool_batch()
    s = context_scores(nll, labels != IGNORE, 0.0)
    assert torch.allclose(s, torch.exp(nll) * (labels != IGNORE))
    cfg = PruningConfig(token_ratio=0.5, lam=0.0)
    out = prune_tokens(labels, nll, attention, _selection([True, False], [True, False]), cfg, torch.Generator())
    dropped = (labels[0] != IGNORE) & (out[0] == IGNORE)
    assert set(dropped.nonzero().flatten().tolist()) == set(torch.topk(nll[0], 4).indices.tolist())


def test_neighbours_off_the_response_count_zero_and_are_summed():
    labels, _, nll = _pool_batch()
    s = context_scores(nll, labels != IGNORE, 0.5)
    p = torch.exp(nll[0])
    assert torch.isclose(s[0, 3], 0.5 * p[3] + 0.5 * (0 + p[4]))  # left neighbour is a prompt token
    assert torch.isclose(s[0, 5], 0.5 * p[5] + 0.5 * (p[4] + p[6]))
    assert torch.isclose(s[1, 6], 0.5 * torch.exp(nll[1, 6]) + 0.5 * torch.exp(nll[1, 5]))  # right is padding


def test_batch_global_budget_counts_dropped_rows():
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(sample_ratio=0.5, token_ratio=0.5, token_budget="batch_global")
    # row 1 dropped by stage 1: its 7 real tokens count toward the drop
    sel = _selection([True, False], [True, False])
    out = prune_tokens(labels, nll, attention, sel, cfg, torch.Generator())
    n_real = 18
    target_drop = n_real - round(n_real * 0.5 * 0.5) - 7  # 18 - 4 (round half to even) - 7 = 7
    dropped = ((labels != IGNORE) & (out == IGNORE)).sum()
    assert dropped == target_drop
    assert torch.equal(out[1], labels[1])


def test_ppl_token_rule_keeps_the_highest_loss_tokens():
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(sample="random", token="ppl", token_ratio=0.5)
    out = prune_tokens(labels, nll, attention, _selection([True, False], [True, False]), cfg, torch.Generator())
    kept = ((out[0] != IGNORE)).nonzero().flatten().tolist()
    assert set(kept) == set(torch.topk(nll[0], 4).indices.tolist())


def test_random_token_rule_is_seeded():
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(sample="random", token="random", token_ratio=0.5)
    sel = _selection([True, True], [True, True])
    a = prune_tokens(labels, None, attention, sel, cfg, torch.Generator().manual_seed(3))
    b = prune_tokens(labels, None, attention, sel, cfg, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert ((a != IGNORE).sum(1) == torch.tensor([4, 2])).all()


def _stats(b=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return PoolStats(
        lengths=torch.randint(10, 100, (b,), generator=g),
        response_lengths=torch.randint(5, 50, (b,), generator=g),
        ppl=torch.exp(torch.rand(b, generator=g) * 3),
        ent=torch.rand(b, generator=g) * 4,
    )


@pytest.mark.parametrize("rule", ["random", "longest", "ppl", "entropy", "infobatch_fixed"])
def test_baselines_keep_exactly_k(rule):  # published infobatch keeps a random number of rows (its own test below)
    stats = _stats()
    cfg = PruningConfig(sample=rule, token="random")
    sel = SAMPLE_RULES[rule].fn(stats, 0.25, cfg, torch.Generator().manual_seed(0))
    assert int(sel.keep.sum()) == 4
    assert torch.equal(sel.prune_tokens, sel.keep)  # the token rule applies to every kept row


def test_longest_ppl_entropy_pick_the_top():
    stats = _stats()
    cfg = PruningConfig(sample="longest", token="random")
    g = torch.Generator()
    assert set(SAMPLE_RULES["longest"].fn(stats, 0.25, cfg, g).keep.nonzero().flatten().tolist()) == set(
        torch.topk(stats.lengths, 4).indices.tolist()
    )
    assert set(SAMPLE_RULES["ppl"].fn(stats, 0.25, cfg, g).keep.nonzero().flatten().tolist()) == set(
        torch.topk(stats.ppl, 4).indices.tolist()
    )
    assert set(SAMPLE_RULES["entropy"].fn(stats, 0.25, cfg, g).keep.nonzero().flatten().tolist()) == set(
        torch.topk(stats.ent, 4).indices.tolist()
    )


def test_infobatch_fixed_fills_k_with_rescaled_low_loss_rows():
    """The fixed-budget variant (qtuning's infobatch before issue 10): K rows, high-loss first."""
    b = 16
    ppl = torch.exp(torch.cat([torch.full((2,), 3.0), torch.full((14,), 0.5)]))  # 2 high-loss, 14 low-loss rows
    stats = PoolStats(lengths=torch.full((b,), 20), response_lengths=torch.full((b,), 10), ppl=ppl, ent=torch.ones(b))
    cfg = PruningConfig(sample="infobatch_fixed", token="random")
    sel = SAMPLE_RULES["infobatch_fixed"].fn(stats, 0.25, cfg, torch.Generator().manual_seed(0))
    assert sel.keep[:2].all()  # every high-loss row survives, weight 1
    assert torch.allclose(sel.weight[:2], torch.ones(2))
    low_kept = sel.keep[2:]
    assert int(low_kept.sum()) == 2
    assert torch.allclose(sel.weight[2:][low_kept], torch.full((2,), 14 / 2))  # 1 / survival probability
    assert (sel.weight[~sel.keep] == 0).all()


def test_every_registered_rule_is_a_working_config_choice():
    """Each registered rule is a choice the config accepts, describes and reads needs_scores from, and its function
    runs on a pool: a sample rule keeps at least K = round(b * r_s) rows, a token rule gives one priority per
    token. A name outside the registry is refused with every registered name in the message."""
    from pydantic import ValidationError

    from qtuning.rules import TOKEN_RULES, keep_count

    b, t = 8, 6
    gen = torch.Generator().manual_seed(0)
    stats = PoolStats(lengths=torch.full((b,), 20), response_lengths=torch.full((b,), 10),
                      ppl=torch.linspace(2, 50, b), ent=torch.linspace(5, 1, b))
    for name, rule in SAMPLE_RULES.items():
        ratio = 1.0 if name == "all" else 0.5
        cfg = PruningConfig(sample=name, token="random", sample_ratio=ratio)
        assert cfg.needs_scores == rule.needs_scores and rule.doc.rstrip(".") in PruningConfig.model_fields["sample"].description
        sel = rule.fn(stats, ratio, cfg, gen)
        assert sel.keep.shape == (b,) and int(sel.keep.sum()) >= (keep_count(b, ratio) if name != "infobatch" else 1), name
    nll, mask = torch.rand(b, t) * 5, torch.ones(b, t)
    for name, rule in TOKEN_RULES.items():
        cfg = PruningConfig(sample="random", token=name, token_ratio=1.0 if name == "all" else 0.5)
        assert cfg.needs_scores == rule.needs_scores and rule.doc.rstrip(".") in PruningConfig.model_fields["token"].description
        if rule.fn is not None:
            assert rule.fn(nll, mask, cfg, gen).shape == (b, t), name
    for field, table in (("sample", SAMPLE_RULES), ("token", TOKEN_RULES)):
        with pytest.raises(ValidationError) as err:
            PruningConfig(**{field: "no_such_rule"})
        assert all(repr(n) in str(err.value) for n in table), str(err.value)


def test_a_new_rule_is_one_function():
    """Registering a function (as one more function in qtuning/rules.py would) is all it takes: the config accepts
    the name, describes it and reads its needs_scores. In a fresh interpreter: the config reads the registry at import."""
    import subprocess
    import sys

    code = "\n".join([
        "import torch",
        "import qtuning.rules as rules",
        "@rules.sample_rule('shortest', needs_scores=False)",
        "def _shortest(pool, ratio, cfg, gen):",
        "    'The shortest examples.'",
        "    return rules.Selection.top_k(-pool.lengths.float(), rules.keep_count(pool.size, ratio))",
        "from qtuning.config import PruningConfig",
        "cfg = PruningConfig(sample='shortest', token='random')",
        "assert not cfg.needs_scores",
        "assert 'shortest: The shortest examples' in PruningConfig.model_fields['sample'].description",
        "stats = rules.PoolStats(lengths=torch.tensor([5, 2, 9]), response_lengths=torch.tensor([1, 1, 1]))",
        "print(rules.SAMPLE_RULES[cfg.sample].fn(stats, 0.3, cfg, None).keep.tolist())",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "[False, True, False]"


# --------------------------------------------------------------------------- issue 10: budgets the rules claim
def test_published_infobatch_keeps_high_loss_rows_and_rescales_random_low_loss_survivors():
    b = 16
    loss = torch.tensor([3.0, 2.5] + [0.5] * 14)  # 2 rows above the pool mean, 14 below
    stats = PoolStats(lengths=torch.full((b,), 20), response_lengths=torch.full((b,), 10), ppl=torch.exp(loss), ent=torch.ones(b))
    cfg = PruningConfig(sample="infobatch", token="random")
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(1.0, b + 1)  # any per-row quantity (a row's loss sum, a gradient component)
    estimates, low_kept = [], []
    for _ in range(4000):
        sel = SAMPLE_RULES["infobatch"].fn(stats, 0.25, cfg, gen)
        assert sel.keep[:2].all() and torch.equal(sel.weight[:2], torch.ones(2))  # high-loss rows: always, weight 1
        assert torch.allclose(sel.weight[2:][sel.keep[2:]], torch.full((int(sel.keep[2:].sum()),), 4.0))  # 1 / r_s
        assert (sel.weight[~sel.keep] == 0).all()
        estimates.append(float((sel.weight * x).sum()))
        low_kept.append(float(sel.keep[2:].float().mean()))
    # low-loss rows survive with probability r_s = 0.25 (not "only when high-loss rows leave room")
    assert np.mean(low_kept) == pytest.approx(0.25, abs=0.01)
    # the weighted sum of the kept rows is an unbiased estimate of the whole pool's sum (the published claim)
    assert np.mean(estimates) == pytest.approx(float(x.sum()), abs=5 * 1.06)  # 5 sd of the mean of 4000 draws


def test_published_infobatch_prunes_against_the_data_sets_mean_and_trains_every_row_when_annealing():
    """The threshold is the loop's running mean of last-seen losses (pool.threshold), not the pool's own mean; in
    the annealing phase every row trains with weight 1. infobatch_pool keeps the pool-local rule."""
    b = 8
    loss = torch.tensor([3.0, 2.5, 2.0, 1.5, 1.0, 0.8, 0.6, 0.4])  # pool mean 1.475
    base = dict(lengths=torch.full((b,), 20), response_lengths=torch.full((b,), 10), ppl=torch.exp(loss), ent=torch.ones(b))
    cfg = PruningConfig(sample="infobatch", token="random")
    always = lambda sel: set(torch.nonzero(sel.keep & (sel.weight == 1)).flatten().tolist())  # noqa: E731
    for _ in range(50):  # whatever the draw, rows at or above the threshold are kept with weight 1
        low = SAMPLE_RULES["infobatch"].fn(PoolStats(**base, threshold=0.7), 0.25, cfg, torch.Generator().manual_seed(_))
        high = SAMPLE_RULES["infobatch"].fn(PoolStats(**base, threshold=2.2), 0.25, cfg, torch.Generator().manual_seed(_))
        pooled = SAMPLE_RULES["infobatch_pool"].fn(PoolStats(**base, threshold=0.7), 0.25, cfg, torch.Generator().manual_seed(_))
        assert {0, 1, 2, 3, 4, 5} <= always(low)  # only the two rows below 0.7 may go
        assert {0, 1} <= always(high) and not high.keep[2:].all() or high.keep.all()
        assert {0, 1, 2, 3} <= always(pooled) and (pooled.weight[4:][pooled.keep[4:]] == 4.0).all()  # the pool's mean
    annealed = SAMPLE_RULES["infobatch"].fn(PoolStats(**base, threshold=2.2, anneal=True), 0.25, cfg, torch.Generator())
    assert annealed.keep.all() and torch.equal(annealed.weight, torch.ones(b))
    # rows below the threshold survive with probability r_s, weighted 1 / r_s
    kept = [SAMPLE_RULES["infobatch"].fn(PoolStats(**base, threshold=2.2), 0.25, cfg, torch.Generator().manual_seed(s))
            for s in range(2000)]
    assert np.mean([float(k.keep[2:].float().mean()) for k in kept]) == pytest.approx(0.25, abs=0.02)
    assert all((k.weight[2:][k.keep[2:]] == 4.0).all() for k in kept)


def test_infobatch_fixed_weights_cancel_when_high_loss_rows_fill_k():
    """The finding behind the published rule: at b=8, r_s=0.25 and n_high >= K, no low-loss row is kept and every
    kept weight is the same, so the rescaling cancels in the weighted denominator."""
    stats = _stats(b=8, seed=3)
    cfg = PruningConfig(sample="infobatch_fixed", token="random")
    sel = SAMPLE_RULES["infobatch_fixed"].fn(stats, 0.25, cfg, torch.Generator().manual_seed(0))
    loss = torch.log(stats.ppl)
    high = loss >= loss.mean()
    assert int(high.sum()) >= 2 and bool(high[sel.keep].all())
    assert len(set(sel.weight[sel.keep].tolist())) == 1


@pytest.mark.parametrize("budget", ["per_sample", "batch_global"])
def test_token_ratio_one_prunes_no_token(budget):
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(sample_ratio=0.5, token_ratio=1.0, token_budget=budget)
    # row 0 kept as Q2 while more rows are kept than round(N r_s) would allow: batch_global used to prune it
    sel = _selection([True, True], [True, False])
    assert torch.equal(prune_tokens(labels, nll, attention, sel, cfg, torch.Generator()), labels)


def test_batch_global_is_allowed_for_every_sample_rule_with_the_same_pool_budget():
    labels, attention, nll = _pool_batch()
    cfg = PruningConfig(sample="random", token="random", sample_ratio=0.5, token_ratio=0.5, token_budget="batch_global")
    sel = _selection([True, False], [True, False])
    out = prune_tokens(labels, None, attention, sel, cfg, torch.Generator().manual_seed(0))
    assert ((labels != IGNORE) & (out == IGNORE)).sum() == 18 - round(18 * 0.25) - 7  # as Q-Tuning's budget


def _eu_pool():
    """8 rows with the batch of `_pool_batch` shapes: prompt 3, response 8 or 4 tokens; scores in known quadrants."""
    labels, attention, nll = _pool_batch()
    labels, attention, nll = labels.repeat(4, 1), attention.repeat(4, 1), nll.repeat(4, 1)
    ppl = torch.tensor([100.0, 100.0, 2.0, 2.0, 100.0, 100.0, 2.0, 2.0])
    ent = torch.tensor([1.0, 5.0, 1.0, 5.0, 1.1, 5.1, 1.1, 5.1])  # Q2, Q1, Q3, Q4, Q2, Q1, Q3, Q4
    stats = PoolStats(lengths=attention.sum(1), response_lengths=(labels[:, 1:] != IGNORE).sum(1), ppl=ppl, ent=ent)
    return stats, labels, attention, nll


def test_equal_tokens_gives_a_baseline_the_loss_tokens_qtuning_trains():
    from qtuning.pruning import prune_pool, qtuning_loss_tokens

    stats, labels, attention, nll = _eu_pool()
    qt = PruningConfig(sample_ratio=0.25, token_ratio=0.5)
    own_qt = prune_pool(stats, labels, nll, attention, qt, torch.Generator())
    trained = lambda d: int(((d.labels[:, 1:] != IGNORE) & d.sel.keep[:, None]).sum())  # noqa: E731
    budget = qtuning_loss_tokens(stats, labels, nll, attention, qt)
    assert budget == trained(own_qt)
    # Q2 rows keep ceil(r_t T), Q4 rows stay whole: more than r_t of the kept rows' response tokens
    resp, s = stats.response_lengths, own_qt.sel
    assert s.prune_tokens.any() and (s.keep & ~s.prune_tokens).any()  # a Q2 row and a Q4 row
    assert budget == sum(math.ceil(0.5 * int(resp[i])) for i in s.prune_tokens.nonzero().flatten()) + int(resp[s.keep & ~s.prune_tokens].sum())
    assert budget > 0.5 * int(resp[s.keep].sum())

    rnd = PruningConfig(sample="random", token="random", sample_ratio=0.25, token_ratio=0.5)
    for seed in range(5):
        own = prune_pool(stats, labels, nll, attention, rnd, torch.Generator().manual_seed(seed))
        eq = prune_pool(stats, labels, nll, attention, rnd.model_copy(update={"budget": "equal_tokens"}),
                        torch.Generator().manual_seed(seed))
        assert torch.equal(own.sel.keep, eq.sel.keep)  # same rows: only the token stage differs
        assert eq.budget_tokens == budget
        kept_resp = int(resp[eq.sel.keep].sum())
        assert trained(eq) == min(budget, kept_resp)
        assert trained(own) == sum(math.ceil(0.5 * int(r)) for r in resp[own.sel.keep])  # every kept row halved
    # Q-Tuning under equal_tokens is Q-Tuning: its own per-sample decisions
    eq_qt = prune_pool(stats, labels, nll, attention, qt.model_copy(update={"budget": "equal_tokens"}), torch.Generator())
    assert torch.equal(eq_qt.labels, own_qt.labels)


def test_equal_tokens_holds_at_token_ratio_one():
    """At r_t = 1 Q-Tuning keeps its rows whole; a baseline whose kept rows hold more tokens is cut to that count
    (token pruning used to return early at r_t = 1, and the baseline trained above Q-Tuning's budget)."""
    from qtuning.pruning import prune_pool, qtuning_loss_tokens

    stats, labels, attention, nll = _eu_pool()
    trained = lambda d: int(((d.labels[:, 1:] != IGNORE) & d.sel.keep[:, None]).sum())  # noqa: E731
    qt = PruningConfig(sample_ratio=0.25, token_ratio=1.0)
    budget = qtuning_loss_tokens(stats, labels, nll, attention, qt)
    rnd = PruningConfig(sample="random", token="random", sample_ratio=0.25, token_ratio=1.0, budget="equal_tokens")
    above = 0
    for seed in range(20):
        own = prune_pool(stats, labels, nll, attention, rnd.model_copy(update={"budget": "own"}), torch.Generator().manual_seed(seed))
        eq = prune_pool(stats, labels, nll, attention, rnd, torch.Generator().manual_seed(seed))
        above += trained(own) > budget
        assert trained(eq) == min(budget, trained(own))
    assert above  # some seeds kept rows with more tokens than Q-Tuning's: the case that was not equalised


def test_equal_tokens_config_needs_a_token_rule_and_scores():
    cfg = PruningConfig(sample="random", token="random", budget="equal_tokens")
    assert cfg.needs_scores  # Q-Tuning's count needs the EU plane
    with pytest.raises(ValueError, match="pruning.budget: equal_tokens.*pruning.token"):
        PruningConfig(sample="random", token="all", token_ratio=1.0, budget="equal_tokens")


def test_nonfinite_scores_stop_the_run_naming_the_rows_by_default():
    from qtuning.pruning import NonFiniteScores, select_samples

    stats, *_ = _eu_pool()
    stats.ppl[2], stats.ent[5] = float("nan"), float("inf")
    with pytest.raises(NonFiniteScores) as err:
        select_samples(stats, PruningConfig(), torch.Generator())
    assert err.value.rows == [2, 5]
    assert "pool row 2" in str(err.value) and "on_nonfinite: exclude" in str(err.value)
    assert "row-7" in str(err.value.with_names(["row-7", "row-9"]))


def test_nonfinite_scores_excluded_are_counted_and_never_kept():
    from qtuning.pruning import select_samples

    stats, *_ = _eu_pool()
    stats.ppl[0] = float("nan")  # a Q2 row
    sel, excluded = select_samples(stats, PruningConfig(on_nonfinite="exclude", sample_ratio=0.25), torch.Generator())
    assert excluded == 1
    assert not sel.keep[0] and sel.weight[0] == 0 and sel.quadrant[0] == 0
    assert bool(sel.keep[4]) and bool(sel.prune_tokens[4])  # the other Q2 row is still triaged as Q2
    assert len(sel.keep) == 8


def test_selection_carries_geometric_quadrant_and_fill_in_flag():
    # the fill-in case of test_fill_in_ranks_by_distance_from_diagonal_and_assigns_quadrant, through the rule
    ppl = torch.arange(1.0, 9.0)
    ent = ppl.clone()
    ent[3], ent[4] = 8.0, 1.0
    stats = PoolStats(lengths=torch.full((8,), 10), response_lengths=torch.full((8,), 5), ppl=ppl, ent=ent)
    sel = SAMPLE_RULES["qtuning"].fn(stats, 0.25, PruningConfig(bisect_iters=1), torch.Generator())
    assert sel.fill_in.tolist() == [False, False, False, True, True, False, False, False] and sel.filled == 2
    assert sel.quadrant[3] == sel.quadrant[4] == 0  # where they lie: between the thresholds
    assert bool(sel.prune_tokens[4]) and not bool(sel.prune_tokens[3])  # what they count as: Q2, Q4
