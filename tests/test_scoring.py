"""EU scoring: chunked NLL/entropy equal the textbook computation from full logits."""

import pytest
import torch
import torch.nn.functional as F

from qtuning.data import IGNORE_INDEX as IGNORE
from qtuning.scoring import score_tokens


def _reference(model, ids, mask, labels):
    """Full fp32 logits, the way the spec defines the quantities."""
    logits = model(input_ids=ids, attention_mask=mask).logits.float()[:, :-1]  # predicts positions 1..T-1
    logp = F.log_softmax(logits, -1)
    nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)
    ent = -(logp.exp() * logp).sum(-1)
    pad = torch.zeros(ids.shape[0], 1)
    return torch.cat([pad, nll], 1), torch.cat([pad, ent], 1)


def _batch(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0  # right padding
    mask[2, 6:] = 0
    labels = ids.clone()
    labels[:, :4] = IGNORE  # prompt
    labels[mask == 0] = IGNORE
    return ids, mask, labels


@pytest.mark.numerics
def test_chunked_scores_match_full_logits(tiny_model):
    model = tiny_model.eval()
    ids, mask, labels = _batch(model.config.vocab_size)
    ref_nll, ref_ent = _reference(model, ids, mask, labels)
    for chunk in (1, 5, 4096):
        s = score_tokens(model, ids, mask, labels, chunk_tokens=chunk)
        resp = labels != IGNORE
        assert torch.equal(s.response_mask, resp)
        torch.testing.assert_close(s.nll[resp], ref_nll[resp], rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(s.ent[resp], ref_ent[resp], rtol=1e-4, atol=1e-4)
        assert (s.nll[~resp] == 0).all()
        ppl = torch.exp((ref_nll * resp).sum(1) / resp.sum(1))
        torch.testing.assert_close(s.sample_ppl(), ppl, rtol=1e-4, atol=1e-4)


@pytest.mark.numerics
def test_entropy_scope_all_averages_every_real_position(tiny_model):
    model = tiny_model.eval()
    with torch.no_grad():  # a fresh init predicts ~uniformly (entropy ln V everywhere); sharpen it so scopes differ
        model.get_output_embeddings().weight.mul_(40)
    ids, mask, labels = _batch(model.config.vocab_size, seed=1)
    _, ref_ent = _reference(model, ids, mask, labels)
    s = score_tokens(model, ids, mask, labels, entropy_scope="all")
    scope = mask.bool().clone()
    scope[:, 0] = False
    expect = (ref_ent * scope).sum(1) / scope.sum(1)
    torch.testing.assert_close(s.sample_ent(), expect, rtol=1e-4, atol=1e-4)
    resp_only = score_tokens(model, ids, mask, labels, entropy_scope="response").sample_ent()
    assert not torch.allclose(resp_only, expect)  # the prompt changes the average


@pytest.mark.numerics
def test_scores_do_not_depend_on_padding_or_batch_mates(tiny_model):
    model = tiny_model.eval()
    ids, mask, labels = _batch(model.config.vocab_size, seed=2)
    together = score_tokens(model, ids, mask, labels)
    alone = score_tokens(model, ids[2:, :6], mask[2:, :6], labels[2:, :6])
    torch.testing.assert_close(together.sample_ppl()[2:], alone.sample_ppl(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(together.sample_ent()[2:], alone.sample_ent(), rtol=1e-4, atol=1e-5)
