"""The recurrent model: parity with the transformers implementation of every family, cache exactness, truncated
backprop, save/load. Tiny random models built here; fp32; tolerances stated per test."""

import pytest
import tiny_models
import torch
from tiny_models import BASE_FAMILIES as FAMILIES
from tiny_models import VOCAB, padded_batch, random_base
from transformers import AutoModelForCausalLM

import loopfit
from loopfit.convert import LayerPlan, build_loopfit, plan_layers
from loopfit.model import LoopfitCache, LoopfitConfig


@pytest.mark.parametrize("family", FAMILIES)
def test_identity_conversion_matches_transformers(family):
    """Every layer kept, passthrough adapter, r = 1: logits and per-layer hidden states equal the base (1e-5)."""
    base = random_base(family)
    model = build_loopfit(base, plan_layers(4, (1, 2, 1)), adapter_init="passthrough", recurrence=1)
    ids, mask = padded_batch()
    with torch.no_grad():
        ref = base(ids, output_hidden_states=True)
        out = model(ids, num_steps=1, output_hidden_states=True)
        ref_pad = base(ids, attention_mask=mask).logits
        out_pad = model(ids, attention_mask=mask, num_steps=1).logits
    assert (out.logits - ref.logits).abs().max() <= 1e-5
    # hidden states: inputs of each layer, then the final normed output (the base's last entry)
    for mine, theirs in zip(out.hidden_states[:-1], ref.hidden_states[:-1]):
        assert (mine - theirs).abs().max() <= 1e-5
    keep = mask.bool()[..., None]
    assert ((out_pad - ref_pad).abs() * keep).max() <= 1e-5


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_passthrough_equals_base_without_dropped_layers_at_any_r(family):
    """[0 | I] adapter: the core sees e on every loop, whatever the state, so the output does not depend on r."""
    base = random_base(family)
    model = build_loopfit(base, LayerPlan([0], [2], [3], 4), adapter_init="passthrough", state_init="normal")
    ids, _ = padded_batch()
    with torch.no_grad():
        outs = [model(ids, num_steps=r).logits for r in (1, 3, 6)]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def tiny_loopfit(**overrides):
    torch.manual_seed(0)
    return tiny_models.recurrent(VOCAB, **overrides).eval()


@pytest.mark.parametrize("r", [1, 4])
def test_cached_generation_equals_recomputation(r):
    """Batch of 3, left padding: greedy decoding with the exact cache equals decoding by full recomputation,
    token for token, and the last step's logits agree to 1e-5."""
    model = tiny_loopfit(layer_types=["full_attention", "sliding_attention", "full_attention", "full_attention"],
                         sliding_window=6, rope={"full_attention": {"rope_type": "default", "rope_theta": 1e4},
                                                 "sliding_attention": {"rope_type": "default", "rope_theta": 1e3}})
    ids, mask = padded_batch(length=10)
    with torch.no_grad():
        cached = model.generate(ids, attention_mask=mask, num_steps=r, max_new_tokens=8, do_sample=False,
                                pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        seq, m = ids, mask
        for _ in range(8):
            logits = model(seq, attention_mask=m, num_steps=r).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
    assert torch.equal(cached.sequences, seq)
    assert (cached.logits[-1] - logits).abs().max() <= 1e-5


def remapped_cache(cache, loops, source):
    """An exact cache whose core slot of loop t holds `cache`'s slot of loop source(t): what a decoding step must
    read under the ring policy or the fallback, written out independently of LoopfitCache's own bookkeeping."""
    out = LoopfitCache("exact")
    out.slots = {k: v for k, v in cache.slots.items() if k[0] != "core"}
    for (segment, t, layer), kv in list(cache.slots.items()):
        if segment == "core":
            for u in range(loops):
                if source(u) == t:
                    out.slots[("core", u, layer)] = kv
    out.seen = cache.seen
    return out


def test_cache_has_one_slot_per_loop_and_layer_and_ring_bounds_it():
    """Exact: one slot per (loop, core layer). Ring of 2 at r = 5: 2 slots per core layer; the prompt's logits equal
    the exact cache's, and a decoded token's logits equal an exact decode whose loop t reads the prompt's keys from
    the last loop congruent to t mod 2 (loops 4, 3, 4, 3, 4), to 1e-6."""
    model = tiny_loopfit()
    ids, mask = padded_batch(length=6)
    nxt, m = ids[:, :1], torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    with torch.no_grad():
        exact = model.new_cache()
        prompt_exact = model(ids, attention_mask=mask, num_steps=5, past_key_values=exact).logits
        assert len({k for k in exact.slots if k[0] == "core"}) == 5 * 2
        ring = LoopfitCache("ring", ring_size=2)
        prompt_ring = model(ids, attention_mask=mask, num_steps=5, cache=ring).logits  # transformers' newer name
        assert len({k for k in ring.slots if k[0] == "core"}) == 2 * 2
        assert (prompt_ring - prompt_exact).abs().max() <= 1e-6
        expected = remapped_cache(exact, 5, lambda t: 4 if t % 2 == 0 else 3)
        want = model(nxt, attention_mask=m, past_key_values=expected, use_cache=True, num_steps=5).logits
        got = model(nxt, attention_mask=m, past_key_values=ring, use_cache=True, num_steps=5).logits
        plain = model(nxt, attention_mask=m, past_key_values=exact, use_cache=True, num_steps=5).logits
    assert (got - want).abs().max() <= 1e-6
    assert (got - plain).abs().max() > 1e-4  # the ring really read other loops' keys than the exact cache


def test_cache_falls_back_to_latest_loop_when_r_grows():
    """Decoding with 4 loops after a 2-loop prompt: loops 2 and 3 read the prompt's loop 1 (its latest), so the
    logits equal an exact decode from a cache holding loop 1's keys at loops 2 and 3 (1e-6)."""
    model = tiny_loopfit()
    ids, _ = padded_batch(length=6)
    with torch.no_grad():
        cache = model.new_cache()
        model(ids, num_steps=2, past_key_values=cache)
        expected = remapped_cache(cache, 4, lambda t: min(t, 1))
        nxt = model(ids[:, :1], past_key_values=cache, num_steps=4, use_cache=True)
        want = model(ids[:, :1], past_key_values=expected, num_steps=4, use_cache=True)
    assert (nxt.logits - want.logits).abs().max() <= 1e-6
    assert cache.slots[("core", 3, 0)][0].shape[2] == 7
    assert torch.equal(cache.slots[("core", 3, 0)][0][:, :, :6], cache.slots[("core", 1, 0)][0][:, :, :6])


def test_truncated_backprop_puts_gradients_only_where_it_should():
    """(n, k): the n no-grad loops keep no graph, so the loss depends on the state only through the last k loops;
    every weight that runs in a grad loop gets a gradient, and results equal n + k plain loops."""
    model = tiny_loopfit(state_init="zeros").train()
    ids = torch.randint(0, VOCAB, (2, 9))
    full = model(ids, labels=ids, num_steps=5)
    trunc = model(ids, labels=ids, num_steps=(3, 2))
    assert torch.allclose(full.loss, trunc.loss, atol=1e-6)
    trunc.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    # k = 0 grad loops: only the prelude-free path (coda, head, embeddings via nothing) gets gradients
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids, num_steps=(3, 0)).loss.backward()
    assert model.model.adapter.weight.grad is None
    assert all(p.grad is None for p in model.model.core.parameters())
    assert all(p.grad is None for p in model.model.prelude.parameters())
    assert model.lm_head.weight.grad is not None


def test_truncated_backprop_gradient_matches_detached_reference():
    """The gradient under (n, k) equals the gradient of n + k loops with the state detached after loop n."""
    model = tiny_loopfit(state_init="zeros").train()
    ids = torch.randint(0, VOCAB, (2, 9))
    model(ids, labels=ids, num_steps=(2, 2)).loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    inner = model.model
    e = inner.prelude[0](inner.embed_tokens(ids), inner.rope(torch.arange(9)[None].expand(2, -1), torch.float32),
                         inner.masks(None, 9, 0, "cpu"))
    s = torch.zeros_like(e)
    rope, mask = inner.rope(torch.arange(9)[None].expand(2, -1), torch.float32), inner.masks(None, 9, 0, "cpu")
    for t in range(4):
        if t == 2:
            s = s.detach()
        x = inner.adapter(torch.cat([s, e.detach() if t < 2 else e], -1))
        for layer in inner.core:
            x = layer(x, rope, mask)
        s = x
    for layer in inner.coda:
        s = layer(s, rope, mask)
    logits = model.lm_head(inner.norm(s))
    torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()).backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, grads[n], atol=1e-6), n


def test_save_load_round_trip_is_bit_exact(tmp_path):
    model = tiny_loopfit(adapter_init="random", state_init="normal")
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, loopfit.LoopfitForCausalLM)
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    ids, mask = padded_batch()
    assert torch.equal(model(ids, attention_mask=mask).logits, loaded(ids, attention_mask=mask).logits)
    from loopfit.model import MODEL_FILES

    assert all((tmp_path / name).exists() for name in MODEL_FILES)  # the whole package, for trust_remote_code


def test_inference_is_deterministic_and_training_state_is_random():
    model = tiny_loopfit()
    ids, _ = padded_batch()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model(ids).logits)
        model.train()
        assert not torch.equal(model(ids).logits, model(ids).logits)


@pytest.mark.parametrize("kind", ["random", "passthrough", "state", "mean"])
def test_adapter_inits(kind):
    model = tiny_loopfit(adapter_init=kind)
    w = model.model.adapter.weight
    h = w.shape[0]
    eye = torch.eye(h)
    expected = {"passthrough": (0 * eye, eye), "state": (eye, 0 * eye), "mean": (eye / 2, eye / 2)}
    if kind == "random":  # nn.Linear's default: kaiming-uniform, bound 1/sqrt(fan_in)
        assert w.abs().max() <= (2 * h) ** -0.5 and w.std() > 0
    else:
        assert torch.equal(w, torch.cat(expected[kind], 1))


@pytest.mark.parametrize("state_init", ["normal", "zeros", "embed"])
def test_state_inits(state_init):
    model = tiny_loopfit(state_init=state_init)
    e = torch.randn(2, 5, 64)
    pos = torch.arange(5)[None].expand(2, -1)
    s = model.model.initial_state(e, pos)
    if state_init == "zeros":
        assert torch.equal(s, torch.zeros_like(e))
    elif state_init == "embed":
        assert torch.equal(s, e)
    else:
        std = model.config.state_init_std
        assert s.abs().max() <= 3 * std and 0.5 * std < s.std() < 1.5 * std


@pytest.mark.parametrize("bad", [0, -1, (0, 0), (-1, 2)])
def test_num_steps_must_be_positive(bad):
    model = tiny_loopfit()
    with pytest.raises(ValueError, match="num_steps"):
        model(torch.zeros(1, 3, dtype=torch.long), num_steps=bad)


def test_config_rejects_empty_core_and_bad_recurrence():
    with pytest.raises(ValueError, match="core"):
        LoopfitConfig(num_core_layers=0)
    with pytest.raises(ValueError, match="mean_recurrence"):
        LoopfitConfig(mean_recurrence=0)


@pytest.mark.parametrize("rule", ["kl:1e-3", "entropy:1e-2", "latent:0.05", "latent:0.05:0.03", "argmax:2"])
def test_adaptive_exit_in_a_batch_equals_each_row_alone(rule):
    """Rows stop looping independently; with the cache falling back to each token's latest loop, a batch with
    left padding decodes exactly what each row decodes alone."""
    model = tiny_loopfit(adapter_init="mean", state_init="zeros")
    ids, mask = padded_batch(length=8)
    kw = dict(num_steps=6, max_new_tokens=6, do_sample=False, pad_token_id=0, exit_criterion=rule)
    cache = model.new_cache()
    batched = model.generate(ids, attention_mask=mask, past_key_values=cache, **kw)[:, -6:]
    alone = [model.generate(ids[b:b + 1, mask[b].bool()], **kw)[0, -6:] for b in range(3)]
    assert torch.equal(batched, torch.stack(alone))
    loops = torch.stack(cache.loops_used)
    assert loops.shape == (5, 3) and loops.min() >= 2 and loops.max() <= 6


def test_adaptive_exit_saves_loops_and_a_zero_threshold_changes_nothing():
    model = tiny_loopfit(adapter_init="mean", state_init="zeros")
    ids, mask = padded_batch(length=8)
    kw = dict(num_steps=6, max_new_tokens=6, do_sample=False, pad_token_id=0)
    plain = model.generate(ids, attention_mask=mask, **kw)
    assert torch.equal(plain, model.generate(ids, attention_mask=mask, exit_criterion="kl:0", **kw))
    cache = model.new_cache()
    model.generate(ids, attention_mask=mask, exit_criterion="kl:1e9", past_key_values=cache, **kw)
    assert torch.stack(cache.loops_used).float().mean() == 2  # the earliest a rule can fire: after loop 2
    with pytest.raises(ValueError, match="unknown exit rule"):
        model.generate(ids, exit_criterion="bogus:1", **kw)


def test_latent_exit_with_a_margin_stops_only_where_the_next_token_is_clear():
    """latent:T:M stops a row once its state settles and its top next-token logit leads the runner-up by M. Every
    state 'settles' at once under T = 1e9: with M = 0 that is latent alone (2 loops, the earliest), with an
    unreachable M every token runs all 6 loops and decodes exactly what fixed r does, and in between some tokens
    stop and the near-ties look again at twice the loops. A margin on another rule, or a malformed one, is refused."""
    model = tiny_loopfit(adapter_init="mean", state_init="zeros")
    ids, mask = padded_batch(length=8)
    kw = dict(num_steps=6, max_new_tokens=6, do_sample=False, pad_token_id=0)

    def run(rule):
        cache = model.new_cache()
        out = model.generate(ids, attention_mask=mask, exit_criterion=rule, past_key_values=cache, **kw)
        return out, torch.stack(cache.loops_used)

    latent, latent_loops = run("latent:1e9")
    assert (latent_loops == 2).all()
    gated, gated_loops = run("latent:1e9:0")
    assert torch.equal(gated, latent) and torch.equal(gated_loops, latent_loops)
    never, never_loops = run("latent:1e9:1e9")
    assert torch.equal(never, model.generate(ids, attention_mask=mask, **kw)) and (never_loops == 6).all()
    assert not torch.equal(never, latent)  # the earliest exit changes tokens, so the margin's effect shows
    _, mixed_loops = run("latent:1e9:0.03")  # this tiny model's margins at loop 2 straddle 0.03
    # clear tokens stop at 2; a near-tie looks again at 4 (twice the loops), then runs to 6 (its next look, 8, > r)
    assert set(mixed_loops.flatten().tolist()) == {2, 4, 6}
    for bad, match in (("kl:1e-3:2", "only latent takes a margin"), ("latent:0.1:x", "must look like")):
        with pytest.raises(ValueError, match=match):
            model.generate(ids, exit_criterion=bad, **kw)


def test_warm_start_carries_the_state_between_tokens():
    """With warm_start the new token starts its loops from the previous token's final state (the coda's input at
    the last prompt position): its logits equal a cold forward whose initial state is set to that state, and
    differ from the cold start."""
    model = tiny_loopfit(adapter_init="mean", state_init="zeros")
    ids, mask = padded_batch(length=8)
    kw = dict(num_steps=3, max_new_tokens=1, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    first = model.generate(ids, attention_mask=mask, **kw)
    seq, m = first.sequences, torch.cat([mask, torch.ones_like(mask[:, :1])], 1)

    def prompt_cache():
        cache = model.new_cache()
        out = model(seq[:, :-1], attention_mask=m[:, :-1], past_key_values=cache, use_cache=True, num_steps=3,
                    output_hidden_states=True)
        return cache, out.hidden_states

    def step(cache, **extra):
        return model(seq[:, -1:], attention_mask=m, past_key_values=cache, use_cache=True, num_steps=3, **extra).logits

    with torch.no_grad():
        cold = step(prompt_cache()[0])
        cache, hidden = prompt_cache()
        state = cache.last_state.clone()
        warm = step(cache, warm_start=True)
        cache, _ = prompt_cache()
        model.model.initial_state = lambda e, position_ids: state  # this forward starts from the given state
        try:
            started = step(cache)
        finally:
            del model.model.initial_state
    coda_input = hidden[1 + 3 * 2]  # inputs of prelude (1 layer), 3 loops of the core (2 layers), then the coda
    assert torch.equal(state, coda_input[:, -1:])
    assert (warm - started).abs().max() <= 1e-6
    assert (warm - cold).abs().max() > 1e-4


def test_adaptive_exit_looks_cost_little_latent_runs_no_coda_and_kl_scores_candidates():
    """latent decides on the state alone: the coda runs once per token (for its output), not once per loop. kl
    runs the head on the whole vocabulary once per token's first look and for its output, and scores only the
    first look's top candidates in later looks; a threshold of 0 still changes nothing (vocab 512 > 256)."""
    from loopfit.model import EXIT_CANDIDATES

    torch.manual_seed(0)
    model = tiny_models.recurrent(2 * EXIT_CANDIDATES, adapter_init="mean", state_init="zeros").eval()
    ids = torch.randint(0, 2 * EXIT_CANDIDATES, (2, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(num_steps=6, max_new_tokens=5, do_sample=False, pad_token_id=0)
    calls = {"coda": 0, "head": 0}
    hooks = [model.model.coda[0].register_forward_hook(lambda *a: calls.__setitem__("coda", calls["coda"] + 1)),
             model.lm_head.register_forward_hook(lambda *a: calls.__setitem__("head", calls["head"] + 1))]
    try:
        model.generate(ids, exit_criterion="latent:1e-9", **kw)  # never settles: all 6 loops, 4 decoded tokens
        assert calls["coda"] == 5
        calls.update(coda=0, head=0)
        full = model.generate(ids, **kw)
        assert torch.equal(model.generate(ids, exit_criterion="kl:0", **kw), full)
        assert calls["head"] == 5 + 5 + 4  # plain; with the exit: each output, plus one first look per decoded token
        assert calls["coda"] == 5 + 5 + 4 * 6
    finally:
        for h in hooks:
            h.remove()


def test_the_old_module_name_still_imports_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("loopfit.modeling", None)
    with pytest.warns(DeprecationWarning, match="import from loopfit.model"):
        old = importlib.import_module("loopfit.modeling")
    assert old.LoopfitForCausalLM is loopfit.LoopfitForCausalLM and old.LoopfitCache is LoopfitCache


def test_a_sweep_holds_only_the_states_it_reads_whatever_its_depth():
    """Loops 0..t are the same whatever r, so a sweep runs its deepest r once and reads the shallower r on the way:
    it keeps the states of the r it reads, not one per loop, so memory does not grow with the deepest r."""
    import weakref

    torch.manual_seed(0)
    model = tiny_models.recurrent(VOCAB).eval()
    ids = torch.randint(0, VOCAB, (2, 12))
    alive, most = [], [0]

    def count(module, args, output):  # the state after each loop: how many loops' states are still held
        alive.append(weakref.ref(output))
        most[0] = max(most[0], sum(ref() is not None for ref in alive))

    model.model.core[-1].register_forward_hook(count)
    with torch.no_grad():
        swept = model(ids, sweep=[64, 8, 1]).logits
        assert len(alive) == 64 * 1 and most[0] <= 2 + 2  # the two read on the way, the previous and the new one
        for j, r in enumerate((64, 8, 1)):
            torch.testing.assert_close(swept[j * 2:(j + 1) * 2], model(ids, num_steps=r).logits, rtol=0, atol=1e-5)
