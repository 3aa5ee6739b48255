"""Decoding with loopfit's model: adaptive exit rules and the exit loop, exact self-speculative decoding, and
sampling warps. Functions here take the model as their first argument; `LoopfitForCausalLM` calls them."""

import torch

from .depth import DepthPlan, resolve_steps

EXIT_CANDIDATES = 256  # tokens an adaptive exit's later looks score (see `exit_rule`)
EXIT_LOOK_AGAIN = 2  # latent:T:M: a near-tie found at loop t is looked at again at loop 2t
DRAFT_TOKENS = 4  # tokens a speculative round drafts by default (see `speculative_generate`)
# speculation stops once at least MIN_DRAFTS_JUDGED drafts have been judged and under MIN_DRAFTS_KEPT of them were
# kept: a round costs its drafts and a verification, which a low share does not pay back
MIN_DRAFTS_JUDGED, MIN_DRAFTS_KEPT = 32, 0.7


@torch.no_grad()
def loop_with_exit(lm, step, s, e, max_loops, rule):
    """The core loop of a decoding step under an adaptive exit: each row stops looping once `rule` says its
    next-token distribution has settled, up to `max_loops`. Rows that stopped keep their state; the loop ends
    when every row has stopped. Afterwards each cache slot of a loop a row skipped holds that row's latest loop
    (Huginn's fallback), so later tokens read what an unbatched run would have left there. `lm` is the
    LoopfitForCausalLM (its head scores a look). Returns (state, loops each row ran)."""
    inner, candidates = lm.model, None

    def next_token_logprobs(state):  # None for a rule on the state alone (no coda, no head: nearly free)
        nonlocal candidates
        if not rule.reads_logits:
            return None
        x = inner.read_coda(step, state)[:, -1]
        if candidates is None:  # first look: the whole vocabulary; later looks: its top candidates only
            logits = lm.lm_head(x).float()
            candidates = logits.topk(min(EXIT_CANDIDATES, logits.shape[-1]), -1).indices
            logits = logits.gather(-1, candidates)
        else:
            logits = torch.einsum("bh,bkh->bk", x, lm.lm_head.weight[candidates]).float()
        return torch.log_softmax(logits, dim=-1)

    def margin(state):  # one look: top-1 minus top-2 next-token logit (a near-tie flips with a little more depth)
        top = lm.lm_head(inner.read_coda(step, state)[:, -1]).float().topk(2, -1).values
        return top[:, 0] - top[:, 1]

    b = s.shape[0]
    done = torch.zeros(b, dtype=torch.bool, device=s.device)
    next_look = torch.zeros(b, dtype=torch.long, device=s.device)  # when a near-tie may look again
    loops = torch.full((b,), max_loops, dtype=torch.long, device=s.device)
    prev, history = None, []
    for t in range(max_loops):
        new = inner.core_step(step, s, e, t)
        new = torch.where(done[:, None, None], s, new)
        logp = next_token_logprobs(new)
        if prev is not None:
            stop = rule(prev_logp=prev[0], logp=logp, prev_state=prev[1], state=new, history=history) & ~done
            if rule.margin is not None:
                stop = stop & (next_look <= t + 1) & (t + 1 < max_loops)  # a look at the last loop saves nothing
                if bool(stop.any()):
                    sure = margin(new) >= rule.margin
                    again = torch.full_like(next_look, EXIT_LOOK_AGAIN * (t + 1))
                    next_look = torch.where(stop & ~sure, again, next_look)
                    stop = stop & sure
            loops = torch.where(stop, torch.full_like(loops, t + 1), loops)
            done = done | stop
        if logp is not None:
            history.append(logp.argmax(-1))
        prev, s = (logp, new), new
        if bool(done.all()):
            break
    used = loops.cpu()
    # only the loops past the earliest stop have rows that skipped them (none when every row ran to the end or
    # stopped together, e.g. batch 1): the fallback is skipped for the rest
    step.cache.fall_back_to_earlier_loops(loops, max(1, int(used.min())), min(max_loops, t + 1), len(inner.core))
    return s, used


def exit_rule(spec):
    """Parse an adaptive-exit rule 'kind:threshold' into a function of successive loops -> rows that may stop.

      kl:5e-4       KL(p_t || p_t-1) of the next-token distributions below the threshold (Huginn's default rule)
      entropy:1e-3  |H(p_t) - H(p_t-1)| below the threshold
      latent:0.03   ||s_t - s_t-1|| / ||s_t|| below the threshold
      latent:0.005:1  the same, confirmed by a look at the next token: the row stops only if its top logit leads
                    the runner-up by at least 1; a near-tie (where a little more depth may flip the token) loops on
                    and looks again once it has run twice the loops. A look (coda + head) is paid only once the
                    state has settled, and at most log2(r) times a token
      argmax:5      the argmax has not changed for this many loops

    What a look costs: kl, entropy and argmax run the coda each loop, and the head on the whole vocabulary only at
    a token's first look; later looks score its first look's top EXIT_CANDIDATES tokens (renormalised), so the
    head is no longer dearer than the loops it saves. latent reads the recurrent state alone: no coda, no head,
    a decision far cheaper than a loop, which makes it the rule that saves wall time.
    """
    kind, _, value = str(spec).partition(":")
    value, _, margin = value.partition(":")
    try:
        thr, margin = float(value), float(margin) if margin else None
    except ValueError:
        raise ValueError(f"exit rule {spec!r} must look like kl:5e-4, entropy:1e-3, latent:0.03, latent:0.005:1 or "
                         "argmax:5") from None
    if margin is not None and kind != "latent":
        raise ValueError(f"exit rule {spec!r}: only latent takes a margin (latent:T:M)")

    def kl(prev_logp, logp, **_):
        return (logp.exp() * (logp - prev_logp)).sum(-1) < thr

    def entropy(prev_logp, logp, **_):
        h = lambda lp: -(lp.exp() * lp).sum(-1)  # noqa: E731
        return (h(logp) - h(prev_logp)).abs() < thr

    def latent(prev_state, state, **_):
        return ((state - prev_state).norm(dim=-1) / state.norm(dim=-1).clamp_min(1e-12))[:, -1] < thr

    def argmax(logp, history, **_):
        n = int(thr)
        if len(history) < n:
            return torch.zeros(logp.shape[0], dtype=torch.bool, device=logp.device)
        current = logp.argmax(-1)
        return torch.stack([h == current for h in history[-n:]]).all(0)

    rules = {"kl": kl, "entropy": entropy, "latent": latent, "argmax": argmax}
    if kind not in rules:
        raise ValueError(f"unknown exit rule {kind!r}: choose one of {', '.join(rules)} (e.g. kl:5e-4)")
    rules[kind].reads_logits, rules[kind].margin = kind != "latent", margin
    return rules[kind]


class DraftPolicy:
    """When and how much a self-speculative decoding loop drafts; `speculative_generate` and the eval's sweep both
    follow it. A round drafts what the best row kept last round and one more, up to `max_tokens` (rejected drafts
    are the loss, so rows that disagree early draft little, and rows that agree draft `max_tokens` again); once
    MIN_DRAFTS_JUDGED drafts have been judged and under MIN_DRAFTS_KEPT of them were kept, drafting stops and
    decoding goes on plainly."""

    def __init__(self, max_tokens):
        self.max_tokens, self.length, self.judged, self.kept, self.drafting = max_tokens, max_tokens, 0, 0, True

    def update(self, judged, kept, best):
        """After a round: `judged` drafts were checked, `kept` of them kept, `best` by the row that kept most."""
        self.judged, self.kept = self.judged + judged, self.kept + kept
        self.length = min(self.max_tokens, best + 2)
        if self.judged >= MIN_DRAFTS_JUDGED and self.kept < MIN_DRAFTS_KEPT * self.judged:
            self.drafting = False


def draft_step(model, token, attention_mask, cache, plan, inputs=slice(None), outputs=slice(None)):
    """One drafted token a row: a forward at the draft's depth (its loops < d enter the cache, exact for any r).
    Returns (hidden, e, s): the coda's output, then the prelude output of input rows `inputs` and the state of
    output rows `outputs` (what the verification resumes the rows it checks from)."""
    fwd = model.model(token, attention_mask=attention_mask, cache=cache, plan=plan)
    return fwd.last_hidden_state, fwd.prelude_output[inputs, -1:], fwd.final_state[outputs, -1:]


def verify(model, cache, start, attention_mask, embeds, states, plan):
    """One forward over all the drafted tokens (from cache position `start`) that runs only loops
    `plan.first_loop`.. and the coda, resuming from the states the drafts left. Returns the coda's output."""
    cache.rewind(start)
    return model.model(attention_mask=attention_mask, cache=cache, plan=plan,
                       resume_from=(torch.cat(embeds, 1), torch.cat(states, 1))).last_hidden_state


SPECULATIVE_SETTINGS = ("max_new_tokens", "max_length", "min_new_tokens", "do_sample", "temperature", "top_k",
                        "top_p", "eos_token_id", "pad_token_id")


@torch.no_grad()
def speculative_generate(model, input_ids, draft_steps, draft_tokens=DRAFT_TOKENS, generation_config=None,
                         cache=None, attention_mask=None, num_steps=None, stopping_criteria=None, **kwargs):
    """Self-speculative decoding, exact. Loops 0..d-1 of an r-loop pass are a d-loop pass (loop t of a token
    reads only earlier tokens' loops <= t), so each round drafts `draft_tokens` tokens at d = `draft_steps`
    loops, which writes the cache entries of loops < d, then verifies them all in one pass that runs only loops
    d..r-1 and the coda from the draft's states, keeps the longest prefix r-loop decoding agrees with plus its
    first correction, and crops the cache past it. Greedy output equals r-loop greedy decoding token for token;
    sampling keeps the r-loop distribution by the speculative acceptance rule (keep a drafted token with
    probability min(1, p/q), else sample from max(p - q, 0)). A batch advances by its shortest kept prefix, so
    every row stays exact; the next round drafts one token more than this one emitted (at most
    `draft_tokens`), so early disagreement costs few wasted drafts. Takes what lm-eval and most callers pass:
    max_new_tokens or max_length, min_new_tokens, eos_token_id, pad_token_id, stopping_criteria, do_sample with
    temperature, top_k, top_p.
    Each round is logged in `cache.drafts` as (tokens drafted, tokens emitted, drafted tokens kept)."""
    gc = generation_config or model.generation_config
    opts = {k: kwargs.pop(k) if k in kwargs else getattr(gc, k, None) for k in SPECULATIVE_SETTINGS}
    if kwargs.pop("exit_criterion", None):
        raise ValueError("draft_steps and exit_criterion do not combine: speculation verifies every token at "
                         "the full r loops, the exit picks each token's depth alone; choose one")
    if kwargs.pop("warm_start", False):
        raise ValueError("draft_steps and warm_start do not combine: a warm-started token starts from the previous "
                         "token's r-loop state, which its draft does not have; drop one")
    kwargs.pop("use_cache", None)
    unsupported = sorted(k for k, v in kwargs.items() if v not in (None, False, 1, 1.0))
    if unsupported or getattr(gc, "num_beams", 1) not in (None, 1):
        raise ValueError(f"speculative decoding (draft_steps) does not take {', '.join(unsupported) or 'num_beams'}"
                         f": it takes {', '.join(SPECULATIVE_SETTINGS)} and stopping_criteria; drop "
                         "draft_steps to use transformers' generate")
    if input_ids is None:
        raise ValueError("speculative decoding needs input_ids (not inputs_embeds)")
    if model.config.cache_policy != "exact":
        raise ValueError(f"speculative decoding needs cache_policy 'exact', not {model.config.cache_policy!r}: the "
                         "ring's shared slots let the draft's loops overwrite what verification reads; set "
                         "model.config.cache_policy = 'exact'")
    n, k_grad = resolve_steps(num_steps, model.config.mean_recurrence)
    r, d, k = n + k_grad, int(draft_steps), int(draft_tokens)
    if not 1 <= d < r:
        raise ValueError(f"draft_steps must be at least 1 and below num_steps (got draft_steps={d}, num_steps={r}):"
                         " a draft runs the first d of the r loops")
    if k < 1:
        raise ValueError(f"draft_tokens must be at least 1 (got {k})")
    sample = bool(opts["do_sample"])
    temperature = 1.0 if opts["temperature"] is None else float(opts["temperature"])
    if sample and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0 (got {temperature}); "
                         "for greedy decoding pass do_sample=False")
    device, (b, prompt_len) = input_ids.device, input_ids.shape
    eos = opts["eos_token_id"] if opts["eos_token_id"] is not None else model.config.eos_token_id
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long, device=device)
    pad = opts["pad_token_id"] if opts["pad_token_id"] is not None else (int(eos[0]) if len(eos) else 0)
    if opts["max_new_tokens"] is not None:
        max_new = int(opts["max_new_tokens"])
    else:  # transformers' default length is 20 tokens, prompt included
        max_new = (opts["max_length"] if opts["max_length"] is not None else 20) - prompt_len
    min_new = int(opts["min_new_tokens"] or 0)
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    mask = torch.cat([mask, mask.new_ones(b, max(max_new, 0) + k)], 1)  # sliced to each pass's length
    cache = model.new_cache() if cache is None else cache
    if cache.seen:
        raise ValueError("speculative decoding needs a fresh cache: pass model.new_cache() or none")

    def scores(logits, index):  # logits [b, q, V] of generated tokens index.. -> what a token is picked from
        logits = logits.float()
        if index < min_new and len(eos):
            early = index + torch.arange(logits.shape[1], device=device) < min_new
            ban = early[:, None] & torch.isin(torch.arange(logits.shape[-1], device=device), eos)[None]
            logits = logits.masked_fill(ban, float("-inf"))
        return warp_logits(logits, temperature, opts["top_k"], opts["top_p"]) if sample else logits

    def pick(logits):
        if not sample:
            return logits.argmax(-1)
        return torch.multinomial(logits.softmax(-1).flatten(0, -2), 1).view(logits.shape[:-1])

    out, finished = input_ids, torch.zeros(b, dtype=torch.bool, device=device)

    def emit(tokens):  # append [b, a] tokens one by one as transformers does; True once every row is done
        nonlocal out, finished
        for i in range(tokens.shape[1]):
            token = tokens[:, i]
            if len(eos):  # as transformers: rows that ended are padded only where an EOS token is known
                token = torch.where(finished, torch.full_like(token, pad), token)
            out = torch.cat([out, token[:, None]], 1)
            finished = finished | torch.isin(token, eos)
            for criterion in stopping_criteria or ():
                finished = finished | torch.as_tensor(criterion(out, None), device=device).expand(b)
            if bool(finished.all()):
                return True
        return False

    if max_new <= 0:
        return input_ids
    full, draft_plan = DepthPlan.fixed(r, r, b), DepthPlan.fixed(d, d, b)
    verify_plan = DepthPlan.fixed(r, r, b, first_loop=d)
    x = model.model(input_ids, attention_mask=mask[:, :prompt_len], cache=cache, plan=full).last_hidden_state
    done, generated, policy = emit(pick(scores(model.head_logits(x[:, -1:]), 0))), 1, DraftPolicy(k)
    while not done and generated < max_new:
        q, start, active = min(policy.length, max_new - generated), cache.seen, ~finished
        if not policy.drafting:  # a plain r-loop step
            x = model.model(out[:, -1:], attention_mask=mask[:, :start + 1], cache=cache, plan=full).last_hidden_state
            done, generated = emit(pick(scores(model.head_logits(x), generated))), generated + 1
            continue
        token, embeds, states, drafted, draft_scores = out[:, -1:], [], [], [], []
        for i in range(q):  # draft at d loops; the cache keeps loops < d of these tokens, which are exact
            x, e, s = draft_step(model, token, mask[:, :start + i + 1], cache, draft_plan)
            embeds.append(e)
            states.append(s)
            draft_scores.append(scores(model.head_logits(x), generated + i))
            token = pick(draft_scores[-1])
            drafted.append(token)
        x = verify(model, cache, start, mask[:, :start + q], embeds, states, verify_plan)
        target, drafted = scores(model.head_logits(x), generated), torch.cat(drafted, 1)
        if sample:
            p, p_draft = target.softmax(-1), torch.cat(draft_scores, 1).softmax(-1)
            keep = torch.rand(drafted.shape, device=device) * p_draft.gather(-1, drafted[..., None])[..., 0] \
                <= p.gather(-1, drafted[..., None])[..., 0]
            residual = (p - p_draft).clamp(min=0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, p)
            fix = torch.multinomial(residual.flatten(0, 1), 1).view(b, q)
        else:
            fix = target.argmax(-1)
            keep = fix == drafted
        kept = keep.long().cumprod(1).sum(1)  # leading drafted tokens each row keeps
        tokens = torch.where(torch.arange(q, device=device)[None] < kept[:, None], drafted, fix)
        usable = torch.clamp(kept + 1, max=q)  # kept tokens, then the first correction
        ends = (torch.isin(tokens, eos) & (torch.arange(q, device=device)[None] < usable[:, None])).any(1)
        # rows padded from here on (ended, and an EOS is known) take whatever the others keep
        released = (finished | ends) if len(eos) else torch.zeros_like(finished)
        step = int(torch.where(released, q, usable).min())
        cache.crop(start + step)
        accepted = min(step, int(kept[active].min()))
        cache.record_round(q, step, accepted)
        policy.update(judged=q, kept=accepted, best=step - 1)  # the batch advances by its shortest kept prefix
        done, generated = emit(tokens[:, :step]), generated + step
    return out


def warp_logits(logits, temperature=1.0, top_k=None, top_p=None):
    """Sampling scores as transformers makes them: divide by the temperature, keep the top_k, then the smallest
    set of tokens whose probability reaches top_p."""
    logits = logits / temperature
    if top_k:
        kth = logits.topk(min(int(top_k), logits.shape[-1]), -1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(-1)
        remove = ordered.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[..., -1] = False
        logits = logits.masked_fill(remove.scatter(-1, order, remove), float("-inf"))
    return logits
