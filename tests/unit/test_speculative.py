"""Self-speculative decoding: greedy output equals r-loop greedy decoding token for token (every family, left
padding, EOS inside a draft, max_new_tokens mid-draft, stopping criteria, min_new_tokens), sampling keeps the
r-loop distribution, and bad settings are refused. Tiny models use the `mean` adapter so that their greedy tokens
change with r (a passthrough model ignores r and would accept every draft)."""



import pytest
import tiny_models
import torch
from tiny_models import BASE_FAMILIES as FAMILIES
from tiny_models import VOCAB, padded_batch, random_base
from transformers import StoppingCriteria, StoppingCriteriaList

from loopfit.convert import build_loopfit, plan_layers

pytestmark = pytest.mark.usefixtures("one_thread")
GREEDY = dict(do_sample=False, pad_token_id=0)


def tiny(**overrides):
    torch.manual_seed(0)
    return tiny_models.recurrent(VOCAB, adapter_init="mean", state_init="zeros", **overrides).eval()


def kept_and_rejected(cache):
    """Whether some round kept a drafted token and some round rejected one (both paths ran)."""
    return any(kept > 0 for _, _, kept in cache.drafts) and any(kept < q for q, _, kept in cache.drafts)


@pytest.mark.parametrize("family", FAMILIES)
def test_speculative_greedy_equals_plain_greedy_in_every_family(family):
    """Batch of 3 with left padding (prompts of 14, 11 and 8 tokens), r = 6, d = 1 and 4, k = 3: the same tokens
    as transformers' generate at r = 6; the d-loop tokens differ from them, so the drafts are really checked."""
    model = build_loopfit(random_base(family), plan_layers(4, (1, 2, 1)), adapter_init="mean", state_init="zeros",
                          recurrence=6).eval()
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=12, **GREEDY)
    plain = model.generate(ids, **kw)
    for d in (1, 4):
        assert torch.equal(model.generate(ids, draft_steps=d, draft_tokens=3, **kw), plain), (family, d)
    shallow = model.generate(ids, **{**kw, "num_steps": 1})
    assert (shallow[:, 14:] != plain[:, 14:]).float().mean() >= 0.2


def test_speculative_exercises_accept_and_reject_and_equals_recomputation():
    """r = 6, d = 5, k = 4, batch of 3 left padded, 20 tokens: equal to greedy decoding by full recomputation (no
    cache, no transformers) and to each row decoded alone; some rounds keep drafted tokens, some reject."""
    model = tiny()
    ids, mask = padded_batch(length=10)
    cache = model.new_cache()
    got = model.generate(ids, attention_mask=mask, num_steps=6, max_new_tokens=20, draft_steps=5, draft_tokens=4,
                         cache=cache, **GREEDY)
    seq, m = ids, mask
    with torch.no_grad():
        for _ in range(20):
            nxt = model(seq, attention_mask=m, num_steps=6).logits[:, -1].argmax(-1, keepdim=True)
            seq, m = torch.cat([seq, nxt], 1), torch.cat([m, torch.ones_like(nxt)], 1)
    assert torch.equal(got, seq)
    assert kept_and_rejected(cache), cache.drafts
    for b in range(3):
        alone = model.generate(ids[b:b + 1, mask[b].bool()], num_steps=6, max_new_tokens=20, draft_steps=5,
                               draft_tokens=4, **GREEDY)
        assert torch.equal(alone[0, -20:], got[b, -20:])


def test_eos_inside_a_draft_and_max_new_tokens_mid_draft():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, **GREEDY)
    free = model.generate(ids, max_new_tokens=16, **kw)
    eos = int(free[0, 10 + 5])  # row 0's sixth token ends it: later tokens become padding, other rows go on
    plain = model.generate(ids, max_new_tokens=16, eos_token_id=eos, **kw)
    assert (plain[0, 16:] == 0).all() and plain.shape[1] > 16
    for k in (3, 4, 8):
        cache = model.new_cache()
        got = model.generate(ids, max_new_tokens=16, eos_token_id=eos, draft_steps=4, draft_tokens=k, cache=cache, **kw)
        assert torch.equal(got, plain), k
    for n in (1, 2, 7):  # a budget that ends inside a draft cuts the draft short
        assert torch.equal(model.generate(ids, max_new_tokens=n, draft_steps=4, draft_tokens=4, **kw),
                           model.generate(ids, max_new_tokens=n, **kw)), n


def test_every_row_ending_stops_early_like_transformers():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=16, **GREEDY)
    free = model.generate(ids, **kw)
    eos = [int(free[b, 10 + 2 + b]) for b in range(3)]  # each row ends at its own token
    plain = model.generate(ids, eos_token_id=eos, **kw)
    got = model.generate(ids, eos_token_id=eos, draft_steps=2, draft_tokens=8, **kw)
    assert torch.equal(got, plain) and plain.shape[1] < 26


class StopAfter(StoppingCriteria):
    """Row b is done once token `token` appears in its continuation (stateless, as StopOnStrings)."""

    def __init__(self, token, prompt_len):
        self.token, self.prompt_len = token, prompt_len

    def __call__(self, input_ids, scores=None, **kwargs):
        return (input_ids[:, self.prompt_len:] == self.token).any(1)


def test_stopping_criteria_max_length_and_min_new_tokens_as_transformers_takes_them():
    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, **GREEDY)
    free = model.generate(ids, max_new_tokens=16, **kw)
    stop = StoppingCriteriaList([StopAfter(int(free[1, 10 + 4]), 10)])
    for extra in (dict(max_length=26, stopping_criteria=stop), dict(max_new_tokens=12, min_new_tokens=8,
                                                                      eos_token_id=int(free[0, 12]))):
        plain = model.generate(ids, **kw, **extra)
        assert torch.equal(model.generate(ids, draft_steps=3, draft_tokens=4, **kw, **extra), plain), extra


def test_speculative_sampling_keeps_the_r_loop_distribution():
    """Top-3 sampling at temperature 1, 3 new tokens: the empirical joint distribution of 6000 sampled
    continuations (one batch of one prompt repeated, d = 2, k = 2) is within total variation 0.06 of the exact
    r-loop distribution computed from forward passes (expected ~0.025 from sampling noise); the d-loop draft's own
    distribution is more than 0.15 away from it, so accepting every draft would fail."""
    model = tiny()
    prompt = padded_batch(length=6)[0][:1]
    warp = dict(do_sample=True, top_k=3, temperature=1.0)

    def exact(r):
        frontier = {(): 1.0}
        for _ in range(3):
            nxt = {}
            for prefix, p in frontier.items():
                seq = torch.cat([prompt, torch.tensor([prefix], dtype=torch.long).view(1, -1)], 1)
                with torch.no_grad():
                    logits = model(seq, num_steps=r).logits[0, -1]
                top = logits.topk(3)
                for t, q in zip(top.indices.tolist(), top.values.softmax(-1).tolist()):
                    nxt[prefix + (t,)] = p * q
            frontier = nxt
        return frontier

    target, draft = exact(6), exact(2)
    torch.manual_seed(1)
    n = 6000
    out = model.generate(prompt.expand(n, -1), num_steps=6, max_new_tokens=3, draft_steps=2, draft_tokens=2,
                         pad_token_id=0, **warp)[:, -3:]
    counts = {}
    for row in out.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    tv = lambda p: 0.5 * sum(abs(p.get(key, 0) - counts.get(key, 0) / n) for key in set(p) | set(counts))  # noqa: E731
    assert tv(target) <= 0.06, tv(target)
    assert tv(draft) >= 0.15, tv(draft)


@pytest.mark.parametrize("settings, message", [
    (dict(draft_steps=6), "draft_steps must be at least 1 and below num_steps"),
    (dict(draft_steps=0), "draft_steps must be at least 1"),
    (dict(draft_steps=2, draft_tokens=0), "draft_tokens must be at least 1"),
    (dict(draft_steps=2, exit_criterion="kl:1e-3"), "do not combine"),
    (dict(draft_steps=2, warm_start=True), "do not combine"),
    (dict(draft_steps=2, num_beams=2), "does not take num_beams"),
    (dict(draft_steps=2, repetition_penalty=1.3), "does not take repetition_penalty"),
    (dict(draft_steps=2, do_sample=True, temperature=0.0), "temperature > 0"),
])
def test_speculative_bad_settings_are_refused(settings, message):
    model = tiny()
    with pytest.raises(ValueError, match=message):
        model.generate(padded_batch()[0], num_steps=6, max_new_tokens=2, pad_token_id=0, **settings)


def test_ring_cache_is_refused():
    model = tiny(cache_policy="ring")
    with pytest.raises(ValueError, match="needs cache_policy 'exact'"):
        model.generate(padded_batch()[0], num_steps=6, max_new_tokens=2, draft_steps=2, pad_token_id=0)


def test_speculative_generate_stops_drafting_by_the_sweeps_rule(monkeypatch):
    """`generate(draft_steps=d)` follows the one drafting rule (DraftPolicy) the eval's sweep follows: with a kept
    share no batch can reach, one round is judged and the rest decodes plainly; with a share of 0 it drafts to the
    end. The tokens are r-loop greedy decoding's either way."""
    from loopfit.model import generation

    model = tiny()
    ids, mask = padded_batch(length=10)
    kw = dict(attention_mask=mask, num_steps=6, max_new_tokens=16, **GREEDY)
    plain = model.generate(ids, **kw)
    rounds = {}
    for share in (0.0, 1.01):
        monkeypatch.setattr(generation, "MIN_DRAFTS_JUDGED", 1)
        monkeypatch.setattr(generation, "MIN_DRAFTS_KEPT", share)
        cache = model.new_cache()
        assert torch.equal(model.generate(ids, draft_steps=2, draft_tokens=3, cache=cache, **kw), plain), share
        monkeypatch.undo()
        rounds[share] = len(cache.drafts)
    assert rounds[1.01] == 1 and rounds[0.0] > 1, rounds
