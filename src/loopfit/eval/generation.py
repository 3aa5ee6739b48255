"""Batched greedy generation with stop strings, for recurrent and plain models alike.

Prompts are sorted by length and left-padded in batches; the model's own `generate()` runs with its KV cache.
Each completion is cut at the first stop string. With an adaptive-exit rule (recurrent models), each token stops
looping once its next-token distribution settles, and the loops each real token used are counted. With
`draft_steps` D (recurrent models), every r > D decodes by exact self-speculation: the same completions, faster.
"""

import copy

import torch
from tqdm.auto import tqdm
from transformers import StoppingCriteria, StoppingCriteriaList

from .. import LoopfitError
from ..loading import is_recurrent
from ..model import DRAFT_TOKENS, DepthPlan
from ..model.generation import DraftPolicy, draft_step, verify
from .loading import steps_kwargs

STOP_TAIL_TOKENS = 24  # stop strings are looked for in the text of a row's latest tokens


class StopOnStrings(StoppingCriteria):
    """Marks a row done once its generated text contains a stop string (checks only the recent tail)."""

    def __init__(self, tokenizer, stop, prompt_len, tail_tokens=STOP_TAIL_TOKENS):
        self.tokenizer, self.stop, self.prompt_len, self.tail = tokenizer, list(stop), prompt_len, tail_tokens

    def __call__(self, input_ids, scores=None, **kwargs):
        new = input_ids[:, self.prompt_len :][:, -self.tail :]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=False)
        return torch.tensor([any(s in t for s in self.stop) for t in texts], device=input_ids.device)


def cut_at_stop(text, stop):
    """Text up to the first stop string."""
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=len(text))
    return text[:cut]


def batches(indices, size):
    return [indices[i : i + size] for i in range(0, len(indices), size)]


@torch.no_grad()
def generate(model, tokenizer, prompts, num_steps=None, max_new_tokens=256, stop=(), batch_size=8, desc="generate",
             exit_criterion=None, loops_used=None, draft_steps=None, draft_tokens=None):
    """Greedy completions of `prompts` (in order), each cut at the first stop string. `exit_criterion` ('kl:5e-4')
    lets each token of a recurrent model stop looping early; the loops of every decoded token (padding after a row
    ended not counted; the first token comes from the prompt's pass, at full r) are appended to `loops_used`.
    `draft_steps` D decodes by self-speculation when r > D (same tokens), plainly otherwise."""
    if exit_criterion and not is_recurrent(model):
        raise LoopfitError("--exit needs a loopfit (recurrent) model; this one is plain")
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out = [None] * len(prompts)
    device = next(model.parameters()).device
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in tqdm(batches(order, batch_size), desc=desc, leave=False):
            enc = tokenizer([prompts[i] for i in batch], return_tensors="pt", padding=True).to(device)
            n = enc["input_ids"].shape[1]
            cache = model.new_cache() if exit_criterion else None
            extra = {"exit_criterion": exit_criterion, "past_key_values": cache} if exit_criterion else {}
            r = num_steps or getattr(model.config, "mean_recurrence", 1)
            if draft_steps is not None and is_recurrent(model) and r > draft_steps:
                extra = {"draft_steps": draft_steps, **({"draft_tokens": draft_tokens} if draft_tokens else {})}
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                stopping_criteria=StoppingCriteriaList([StopOnStrings(tokenizer, stop, n)]) if stop else None,
                **steps_kwargs(model, num_steps),
                **extra,
            )
            if loops_used is not None and cache is not None and cache.loops_used:
                per_token = torch.stack(cache.loops_used, 1)  # [rows, decode steps]: step k made token k + 1
                ended = ids[:, n:] == tokenizer.pad_token_id  # finished rows are padded (pad may equal EOS)
                length = (~ended).long().cumprod(1).sum(1)
                for row, count in zip(per_token, length.tolist()):
                    loops_used += row[: max(count - 1, 0)].tolist()
            for i, row in zip(batch, ids[:, n:]):
                out[i] = cut_at_stop(tokenizer.decode(row, skip_special_tokens=True), stop)
    finally:
        tokenizer.padding_side = padding_side
    return out


def shared_prefix(sequences):
    """Length of the longest token prefix every sequence shares, leaving each at least one token of its own."""
    first, n = sequences[0], min(len(x) for x in sequences) - 1
    for x in sequences[1:]:
        n = next((i for i in range(n) if x[i] != first[i]), n)
    return max(n, 0)


def packed_prefill(model, prefix, own, depths, length):
    """A new cache: `prefix` (one row, unpadded) followed by each prompt's `own` tokens, swept at `depths` and laid
    out as a left-padded batch of `length` positions. The prompts run packed into one row, each token seeing the
    prefix and its own prompt's earlier tokens (a 4D mask), so padding costs no arithmetic."""
    cache, common = copy.copy(prefix).repeat_rows(1), prefix.seen  # the copy gets new slots; the prefix stays
    if any(own):
        device = next(model.parameters()).device
        segment = torch.tensor([k for k, x in enumerate(own) for _ in x], device=device)
        causal = torch.ones(len(segment), len(segment), dtype=torch.bool, device=device).tril()
        sees = torch.cat([causal.new_ones(len(segment), common), causal & (segment[:, None] == segment)], 1)
        positions = torch.tensor([[common + j for x in own for j in range(len(x))]], device=device)
        model(torch.tensor([sum(own, [])], device=device), attention_mask=sees[None, None], position_ids=positions,
              past_key_values=cache, use_cache=True, sweep=depths, logits_to_keep=1)
    return cache.unpack([len(x) for x in own], length)


@torch.no_grad()
def generate_sweep(model, tokenizer, prompts, loops, max_new_tokens=256, stop=(), batch_size=8, desc="generate",
                   draft_loops=None, draft_tokens=DRAFT_TOKENS):
    """{r: greedy completions of `prompts`} for every r in `loops` at once, for a recurrent model: the completions
    `generate` gives at each r, for much less. Loops 0..t of a token are the same whatever r, so each prompt runs
    the deepest r once and the coda reads every r (`sweep`); the prompt prefix all prompts share (a task's
    few-shot exemplars) runs once, and every batch starts from its cache; then every (r, prompt) pair decodes in
    one batch (`row_steps`), so each weight read of a decoding step serves every r. A prompt's r's that have
    picked the same tokens so far are one row that runs the deepest of them and is read at each, and the row
    splits where their tokens differ; an (r, prompt) pair leaves the batch as soon as it ends (EOS or a stop
    string), so finished pairs cost nothing. The prompts' own tokens are prefilled packed, without padding
    (`packed_prefill`).

    With `draft_loops` D, each r > D decodes by exact self-speculation inside the same batch: every round feeds
    up to `draft_tokens` tokens a row, one forward each, in which an r > D runs only its first D loops (a draft)
    while the r <= D decode as above; one more forward then verifies the deep rows' drafts, all at once, from
    their D-loop states (loops D..r-1, see `speculative_generate`). Each (r, prompt) pair keeps its own longest
    agreeing prefix plus one token: positions it did not keep stay in the cache as holes the attention mask
    hides, so no row waits for another. Deep loops then read their weights once for many tokens, and reading is
    what a decoding step is bound by (memory on a CPU, kernel launches on a GPU). A round drafts what the best
    pair kept last time and one more, and a batch whose drafts are mostly rejected stops drafting (`DraftPolicy`,
    the rule `generate`'s self-speculation follows too)."""
    depths = sorted({int(r) for r in loops}, reverse=True)
    d = int(draft_loops) if draft_loops is not None and 0 < int(draft_loops) < depths[0] else None
    # decoding rows: one per prompt read at every r >= d (its r's share their loops while their tokens agree; the
    # r > d among them draft at d and are verified), and one for the r < d (no draft: they decode as they are)
    low = tuple(r for r in depths if d is not None and r < d)
    high = tuple(r for r in depths if r not in low)
    ids = tokenizer(list(prompts))["input_ids"]
    common = shared_prefix(ids)
    pad = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out = {r: [None] * len(prompts) for r in depths}

    def finished(tokens):  # an (r, prompt) pair ends at EOS, a stop string or the token budget
        tail = tokenizer.decode(tokens[-STOP_TAIL_TOKENS:], skip_special_tokens=False)
        return tokens[-1] in eos or any(s in tail for s in stop) or len(tokens) >= max_new_tokens

    prefix = model.new_cache()
    if common:
        model(torch.tensor([ids[0][:common]], device=device), past_key_values=prefix, use_cache=True, sweep=depths,
              logits_to_keep=1)
    for batch in tqdm(batches(order, batch_size), desc=desc, leave=False):
        n = max(len(ids[i]) for i in batch)  # [shared prefix | left padding | the prompt's own tokens]
        input_ids = torch.tensor([ids[i][:common] + [pad] * (n - len(ids[i])) + ids[i][common:] for i in batch],
                                 device=device)
        mask = torch.tensor([[1] * common + [0] * (n - len(ids[i])) + [1] * (len(ids[i]) - common) for i in batch],
                            device=device)
        # the prompts' own tokens but the last (the first decoding step feeds it), without padding
        cache = packed_prefill(model, prefix, [ids[i][common:-1] for i in batch], depths, n - 1)
        # decoding rows (prompt, the r's it is read at, the token it feeds next), deepest first; a row splits
        # where its r's tokens differ, and an (r, prompt) pair leaves as soon as it ends
        b, last = len(batch), input_ids[:, -1].tolist()
        rows = [(k, high) for k in range(b)] + ([(k, low) for k in range(b)] if low else [])
        cache.select_rows([k for k, _ in rows], [depths.index(r) * b + k for k, reads in rows for r in reads],
                          [reads[0] for _, reads in rows])
        mask = mask[torch.tensor([k for k, _ in rows], device=device)]
        rows, new = [(k, reads, last[k]) for k, reads in rows], {(r, k): [] for r in depths for k in range(b)}
        policy = DraftPolicy(draft_tokens)
        while rows:
            drafts = d if policy.drafting else None
            verify_above = drafts or depths[0]  # the r's this round drafts at d loops and verifies
            n_deep = sum(reads[0] > verify_above for _, reads, _ in rows)
            left = max_new_tokens - min(len(new[(r, k)]) for k, reads, _ in rows for r in reads)
            q, start, best, checked, kept_drafts = min(policy.length, left) if n_deep else 1, cache.seen, 0, 0, 0
            first = [0]  # output index of each row's first read
            for _, reads, _ in rows:
                first.append(first[-1] + len(reads))
            # an r > d runs its first d loops: a draft, read from its row's first output (the coda there sees the
            # deepest r's earlier tokens); the r <= d are read as they are, and the other drafts need no head
            drafting = [tuple(min(r, drafts or r) for r in reads) for _, reads, _ in rows]
            heads = sorted({*first[:-1], *(o for a, (_, reads, _) in enumerate(rows)
                                          for o, r in enumerate(reads, first[a]) if r <= verify_above)})
            token = torch.tensor([[t] for *_, t in rows], device=device)
            fed, picks, embeds, states = [token[:, 0].tolist()], [], [], []
            for _ in range(q):  # the deep rows draft; the others decode at their own r
                x, e, s = draft_step(model, token, mask, cache, DepthPlan.per_row(drafting, len(rows)),
                                     slice(n_deep), torch.tensor(first[:n_deep], dtype=torch.long, device=device))
                mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)  # the mask covers the token fed next
                picks.append(dict(zip(heads, model.head_logits(x[heads, -1]).argmax(-1).tolist())))
                if n_deep:
                    embeds.append(e)
                    states.append(s)
                fed.append([picks[-1][o] for o in first[:-1]])
                token = torch.tensor([[t] for t in fed[-1]], device=device)
            verified = {}
            if n_deep:  # loops d..r-1 of every drafted token of the deep rows, in one forward
                plan = DepthPlan.per_row([reads for _, reads, _ in rows[:n_deep]], n_deep, first_loop=drafts)
                x = verify(model, cache, start, mask[:n_deep, :start + q], embeds, states, plan)
                deep = [o for a, (_, reads, _) in enumerate(rows[:n_deep]) for o, r in enumerate(reads, first[a])
                        if r > verify_above]  # a deep row's r = d output was its draft: no second head
                verified = dict(zip(deep, model.head_logits(x[deep]).argmax(-1).tolist()))
            after = []  # (prompt, reads, next token, old row, old outputs, positions kept this round)
            for a, (k, reads, _) in enumerate(rows):
                groups = {}
                for o, r in enumerate(reads, first[a]):
                    picked = verified[o] if r > verify_above else [p[o] for p in picks]
                    kept = next((j for j in range(q - 1) if picked[j] != fed[j + 1][a]), q - 1)
                    if r > verify_above:
                        checked, kept_drafts, best = checked + q - 1, kept_drafts + kept, max(best, kept)
                    for t in picked[:kept + 1]:
                        new[(r, k)].append(t)
                        if finished(new[(r, k)]):  # an ended pair leaves the batch and the cache
                            break
                    else:  # r's that kept as many tokens and picked the same one go on sharing their loops
                        groups.setdefault((kept, picked[kept]), []).append((r, o))
                for (kept, t), members in groups.items():
                    after.append((k, tuple(r for r, _ in members), t, a, [o for _, o in members], kept + 1))
            if not after:
                break
            if n_deep:
                policy.update(judged=checked, kept=kept_drafts, best=best)
            after.sort(key=lambda row: -row[1][0])  # deepest rows first (stable)
            old, outputs = [row[3] for row in after], [o for row in after for o in row[4]]
            if old != list(range(len(rows))) or outputs != list(range(first[-1])):  # a split or an ending
                cache.select_rows(old, outputs, [row[1][0] for row in after])
                mask = mask[torch.tensor(old, device=device)]
            for i, row in enumerate(after):  # positions a row did not keep become holes
                mask[i, start + row[5]:start + q] = 0
            rows = [(k, reads, t) for k, reads, t, *_ in after]
        for (r, k), tokens in new.items():
            out[r][batch[k]] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
    return out


def generate_at(model, tokenizer, prompts, r, task, max_new_tokens, stop, batch_size, exit_criterion=None,
                draft_steps=None, draft_tokens=None):
    """(completions, rows) at r loops; under an adaptive exit, rows holds the task's 'mean_loops' row for r."""
    loops = []
    completions = generate(model, tokenizer, prompts, r, max_new_tokens, stop, batch_size, f"{task} r={r}",
                           exit_criterion, loops, draft_steps, draft_tokens)
    rows = [{"task": task, "loops": r, "metric": "mean_loops", "value": sum(loops) / len(loops), "n": len(loops),
             "exit": exit_criterion}] if loops else []
    return completions, rows
