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


@torch.no_grad()
def generate_sweep(model, tokenizer, prompts, loops, max_new_tokens=256, stop=(), batch_size=8, desc="generate"):
    """{r: greedy completions of `prompts`} for every r in `loops` at once, for a recurrent model: the completions
    `generate` gives at each r, for much less. Loops 0..t of a token are the same whatever r, so each prompt runs
    the deepest r once and the coda reads every r (`sweep`); the prompt prefix all prompts share (a task's
    few-shot exemplars) runs once, and every batch starts from its cache; then every (r, prompt) pair decodes in
    one batch (`row_steps`), so each weight read of a decoding step serves every r. A prompt's r's that have
    picked the same tokens so far are one row that runs the deepest of them and is read at each, and the row
    splits where their tokens differ; an (r, prompt) pair leaves the batch as soon as it ends (EOS or a stop
    string), so finished pairs cost nothing."""
    depths = sorted({int(r) for r in loops}, reverse=True)
    ids = tokenizer(list(prompts))["input_ids"]
    common = shared_prefix(ids)
    pad = tokenizer.pad_token_id
    eos = model.generation_config.eos_token_id
    eos = set([eos] if isinstance(eos, int) else eos or [])
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(ids[i]))
    out = {r: [None] * len(prompts) for r in depths}
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
        cache = copy.copy(prefix).repeat_rows(len(batch))  # the copy gets new slots; the prefix stays as it is
        if n - 1 > common:  # the prompts' own tokens but the last, which the first decoding step feeds
            model(input_ids[:, common:-1], attention_mask=mask[:, :-1], past_key_values=cache, use_cache=True,
                  sweep=depths, logits_to_keep=1)
        # one decoding row per prompt, read at every r: the r's of a prompt share their loops for as long as their
        # tokens agree (a converged model's deep r's often agree throughout), and a row splits where they differ
        rows, b = [(i, tuple(depths)) for i in batch], len(batch)
        cache.select_rows(range(b), [k * b + i for i in range(b) for k in range(len(depths))], [depths[0]] * b)
        token, new = input_ids[:, -1:], {(r, i): [] for r in depths for i in batch}
        for _ in range(max_new_tokens):
            logits = model(token, attention_mask=mask, past_key_values=cache, use_cache=True,
                           row_steps=[reads for _, reads in rows]).logits[:, -1]
            picked = iter(enumerate(logits.argmax(-1).tolist()))
            after = []  # (prompt, reads, token, old row, old outputs) of the rows that go on
            for a, (i, reads) in enumerate(rows):
                by_token = {}
                for r in reads:
                    o, t = next(picked)
                    new[(r, i)].append(t)
                    by_token.setdefault(t, []).append((r, o))
                for t, members in by_token.items():  # r's that picked the same token keep sharing their loops
                    tail = tokenizer.decode(new[(members[0][0], i)][-STOP_TAIL_TOKENS:], skip_special_tokens=False)
                    if not (t in eos or any(s in tail for s in stop)):  # ended r's leave the batch and the cache
                        after.append((i, tuple(r for r, _ in members), t, a, [o for _, o in members]))
            if not after:
                break
            after.sort(key=lambda row: -row[1][0])  # deepest rows first (stable)
            old, outputs = [row[3] for row in after], [o for row in after for o in row[4]]
            if old != list(range(len(rows))) or outputs != list(range(len(logits))):  # a split or an ending
                cache.select_rows(old, outputs, [row[1][0] for row in after])
                mask = mask[torch.tensor(old, device=device)]
            rows = [(i, reads) for i, reads, *_ in after]
            token = torch.tensor([[row[2]] for row in after], device=device)
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], 1)
        for (r, i), tokens in new.items():
            out[r][i] = cut_at_stop(tokenizer.decode(tokens, skip_special_tokens=True), stop)
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
