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
    assert t.quadrant[4] == Q2_MISCONCEPTION and t.q2[4]
    assert t.quadrant[3] == Q4_CALIBRATION and not t.q2[3]


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


@pytest.mark.parametrize("rule", ["random", "longest", "ppl", "entropy", "infobatch"])
def test_baselines_keep_exactly_k(rule):
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


def test_infobatch_rescales_low_loss_survivors_for_an_unbiased_gradient():
    b = 16
    ppl = torch.exp(torch.cat([torch.full((2,), 3.0), torch.full((14,), 0.5)]))  # 2 high-loss, 14 low-loss rows
    stats = PoolStats(lengths=torch.full((b,), 20), response_lengths=torch.full((b,), 10), ppl=ppl, ent=torch.ones(b))
    cfg = PruningConfig(sample="infobatch", token="random")
    sel = SAMPLE_RULES["infobatch"].fn(stats, 0.25, cfg, torch.Generator().manual_seed(0))
    assert sel.keep[:2].all()  # every high-loss row survives, weight 1
    assert torch.allclose(sel.weight[:2], torch.ones(2))
    low_kept = sel.keep[2:]
    assert int(low_kept.sum()) == 2
    assert torch.allclose(sel.weight[2:][low_kept], torch.full((2,), 14 / 2))  # 1 / survival probability
    assert (sel.weight[~sel.keep] == 0).all()


def test_every_rule_is_registered_for_the_config_choices():
    from typing import get_args

    from qtuning.config import SampleRule, TokenRule
    from qtuning.rules import TOKEN_RULES

    assert set(get_args(SampleRule)) == set(SAMPLE_RULES)
    assert set(get_args(TokenRule)) == set(TOKEN_RULES)


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
