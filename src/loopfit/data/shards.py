"""Prepared datasets on disk: memory-mapped token shards, their manifest, validation and evaluation batches.

A prepared dataset is one folder, written whole by `loopfit prepare` (it appears only once complete):

    DATA/NAME/manifest.json            what went in (sources, tokenizer fingerprint, options) and what came out
    DATA/NAME/train-00000.tokens.npy   1-D uint16 (uint32 if the vocabulary has more than 65536 tokens) token ids
    DATA/NAME/train-00000.docs.npy     1-D int64: the end offset of each document in that shard (EOS included)
    DATA/NAME/train-00000.mask.npy     1-D uint8, only in a dataset of conversations: 1 where the token is in
                                       the loss (assistant turns), 0 elsewhere (format loopfit-tokens/2)
    DATA/NAME/val-00000.tokens.npy     the held-out documents (`--holdout`), same layout

Every document ends with the tokenizer's end-of-text token (`document_end_token`, the manifest's eos_token_id).
`open_dataset` memory-maps the shards and checks them against the manifest (sizes, document offsets; with
`verify=True` also sha256), so a truncated or damaged shard is an error, never silent garbage.
"""

import hashlib
import json
from pathlib import Path

import numpy as np

from .. import LoopfitError
from ..io import sha256_file
from ..loading import load_tokenizer

FORMAT = "loopfit-tokens/1"
FORMAT_MASKED = "loopfit-tokens/2"  # with a loss mask beside the tokens
MANIFEST = "manifest.json"


# ---------------------------------------------------------------- tokenizer identity


def tokenizer_fingerprint(tokenizer):
    """'sha256:<16 hex>' of the vocabulary (token -> id) and the EOS id: equal fingerprints tokenise alike."""
    tokenizer = load_tokenizer(tokenizer)
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    blob = json.dumps({"vocab": vocab, "eos": tokenizer.eos_token_id}, ensure_ascii=False).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()[:16]


END_OF_TEXT = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>")


def document_end_token(tokenizer):
    """The token id written after each document: the tokenizer's EOS, unless its EOS is the chat template's
    end-of-turn token (an instruct tokenizer: SmolLM2-Instruct's and Qwen2.5-Instruct's `<|im_end|>`, Llama 3's
    `<|eot_id|>`) and the vocabulary holds a distinct end-of-text token (`<|endoftext|>`, ...): then that one, so
    a document boundary is not a chat turn's end."""
    eos, template = tokenizer.eos_token, getattr(tokenizer, "chat_template", None)
    template = template.get("default") if isinstance(template, dict) else template
    if eos and isinstance(template, str) and eos in template:
        vocab = tokenizer.get_vocab()
        for name in END_OF_TEXT:
            if name != eos and name in vocab:
                return vocab[name]
    return tokenizer.eos_token_id


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


# ---------------------------------------------------------------- reading


def read_manifest(folder):
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        if folder.is_dir() and any((sub / MANIFEST).exists() for sub in folder.iterdir() if sub.is_dir()):
            names = ", ".join(sorted(sub.name for sub in folder.iterdir() if (sub / MANIFEST).exists()))
            raise LoopfitError(f"{folder} is a data root, not one dataset: use one of its datasets ({names})")
        raise LoopfitError(f"{folder} is not a prepared dataset (no {MANIFEST}): "
                           f"run `loopfit prepare ... --out {folder.parent}`")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise LoopfitError(f"{path} is damaged: re-run `loopfit prepare` with --force") from None
    if manifest.get("format") not in (FORMAT, FORMAT_MASKED):
        raise LoopfitError(f"{folder} has format {manifest.get('format')!r}, not {FORMAT!r} or {FORMAT_MASKED!r}: "
                           "re-run `loopfit prepare` with --force")
    return manifest


class TokenDataset:
    """One split of a prepared dataset, memory-mapped: `tokens(start, length)` reads across shard boundaries.

    Attributes: `name`, `folder`, `manifest`, `num_tokens`, `num_docs`, `doc_ends` (int64 global end offset of
    each document, EOS included), `eos_token_id`, `masked` (whether `loss_mask` holds anything but ones).
    """

    def __init__(self, folder, split="train", verify=False):
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.name = self.manifest["name"]
        self.split = split
        self.eos_token_id = self.manifest["tokenizer"]["eos_token_id"]
        info = self.manifest["splits"].get(split)
        if not info or not info["shards"]:
            hint = " (prepare it with --holdout 0.01)" if split == "val" else ""
            raise LoopfitError(f"{self.folder} has no '{split}' split{hint}")
        dtype = np.dtype(self.manifest["dtype"])
        self.masked = bool(self.manifest.get("loss_mask"))
        self._shards, self._masks, ends, offset = [], [], [], 0
        for shard in info["shards"]:
            tokens = self._open(shard["tokens_file"], dtype, shard["tokens"], shard, verify)
            docs = self._open(shard["docs_file"], np.dtype(np.int64), shard["documents"], shard, verify)
            if len(docs) == 0 or docs[-1] != len(tokens) or np.any(np.diff(docs) <= 0) or docs[0] <= 0:
                raise self._damaged(shard["docs_file"], "document offsets are inconsistent")
            if self.masked:
                if "mask_file" not in shard:
                    raise self._damaged(shard["tokens_file"], "the manifest names no loss mask for it")
                self._masks.append(self._open(shard["mask_file"], np.dtype(np.uint8), shard["tokens"], shard, verify))
            self._shards.append(tokens)
            ends.append(docs + offset)
            offset += len(tokens)
        self._starts = np.cumsum([0] + [len(t) for t in self._shards])
        self.doc_ends = np.concatenate(ends)
        self.num_tokens = int(offset)
        self.num_docs = len(self.doc_ends)

    def _damaged(self, file, why):
        return LoopfitError(f"{self.folder / file} is corrupt or truncated ({why}): "
                            "re-run `loopfit prepare` with --force")

    def _open(self, file, dtype, length, shard, verify):
        path = self.folder / file
        if not path.exists():
            raise self._damaged(file, "file missing")
        try:
            array = np.load(path, mmap_mode="r")
        except (ValueError, OSError, EOFError) as e:
            raise self._damaged(file, str(e).split("\n")[0]) from None
        if array.dtype != dtype or array.shape != (length,):
            raise self._damaged(file, f"{array.dtype}{list(array.shape)}, manifest says {dtype}[{length}]")
        if verify and sha256_file(path) != shard["sha256"][file]:
            raise self._damaged(file, "checksum mismatch")
        return array

    def tokens(self, start, length):
        """Tokens [start, start + length) of the split as an int64 array (reads only those bytes)."""
        return self._read(self._shards, start, length, np.int64)

    def loss_mask(self, start, length):
        """Bool array: whether tokens [start, start + length) are in the loss (all True without a mask)."""
        if not self.masked:
            return np.ones(length, dtype=bool)
        return self._read(self._masks, start, length, bool)

    def labels(self, start, length):
        """The tokens [start, start + length) as labels: -100 where the loss mask excludes them."""
        tokens = self.tokens(start, length)
        return np.where(self.loss_mask(start, length), tokens, -100) if self.masked else tokens

    def _read(self, shards, start, length, dtype):
        if start < 0 or start + length > self.num_tokens:
            raise IndexError(f"tokens [{start}, {start + length}) outside [0, {self.num_tokens})")
        first = int(np.searchsorted(self._starts, start, side="right")) - 1
        pieces, pos = [], start
        while length > 0:
            shard = shards[first]
            lo = pos - self._starts[first]
            take = min(length, len(shard) - lo)
            pieces.append(np.asarray(shard[lo : lo + take], dtype=dtype))
            pos, length, first = pos + take, length - take, first + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)

    def doc_start(self, i):
        return 0 if i == 0 else int(self.doc_ends[i - 1])


def open_dataset(folder, split="train", verify=False):
    """Open one split of a prepared dataset folder (see TokenDataset); `verify=True` also checks sha256 sums."""
    return TokenDataset(folder, split, verify)


def verify_dataset(folder):
    """Check every shard of every split of a prepared dataset (sizes, offsets, sha256); raise LoopfitError if bad."""
    for split, info in read_manifest(folder)["splits"].items():
        if info["shards"]:
            TokenDataset(folder, split, verify=True)


def dataset_folders(data_dir):
    """The prepared dataset folders in `data_dir`: itself if it is one, else its sub-folders that are."""
    data_dir = Path(data_dir)
    if (data_dir / MANIFEST).exists():
        return [data_dir]
    found = sorted(p for p in data_dir.iterdir() if (p / MANIFEST).exists()) if data_dir.is_dir() else []
    if not found:
        raise LoopfitError(f"no prepared dataset in {data_dir}: "
                           f"run `loopfit prepare SOURCE --tokenizer MODEL --out {data_dir}`")
    return found


def check_tokenizer(data_dir, tokenizer):
    """Raise LoopfitError unless every dataset in `data_dir` (one dataset or a data root) was tokenised with
    `tokenizer` (an object, folder, GGUF path or short name). Returns the fingerprint."""
    expected = tokenizer_fingerprint(tokenizer)
    for folder in dataset_folders(data_dir):
        tok = read_manifest(folder)["tokenizer"]
        if tok["fingerprint"] != expected:
            raise LoopfitError(
                f"{folder} was tokenised with another tokenizer ({tok['name']}, {tok['fingerprint']}) than the "
                f"model's ({expected}): re-run `loopfit prepare` with the model's --tokenizer"
            )
    return expected


# ---------------------------------------------------------------- evaluation batches


def iter_eval_batches(data_dir, seq_len, batch_size, split="val", max_batches=None, rank=0, world_size=1):
    """Held-out loss batches: consecutive, non-overlapping `seq_len` windows over the split, in order.

    Yields dicts {input_ids, labels} of LongTensors [n, seq_len] (n = batch_size except maybe the last), labels
    equal to input_ids (the model shifts them, transformers-style), -100 where a loss mask excludes a token.
    Batches are dealt round-robin to ranks: rank r gets batches r, r + world_size, ... The same call always
    yields the same batches.
    """
    import torch

    ds = open_dataset(data_dir, split)
    windows = ds.num_tokens // seq_len
    if windows == 0:
        raise LoopfitError(f"{data_dir} '{split}' holds {ds.num_tokens} tokens, fewer than seq_len {seq_len}: "
                           "use a shorter seq_len or a larger --holdout")
    n_batches = -(-windows // batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    for b in range(rank, n_batches, world_size):
        first, last = b * batch_size, min(windows, (b + 1) * batch_size)
        start, length = first * seq_len, (last - first) * seq_len
        ids = torch.from_numpy(ds.tokens(start, length).reshape(-1, seq_len))
        labels = torch.from_numpy(ds.labels(start, length).reshape(-1, seq_len)) if ds.masked else ids.clone()
        yield {"input_ids": ids, "labels": labels}
