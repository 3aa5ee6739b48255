"""Tokenise text sources into memory-mapped token shards for `loopfit train` (one dataset folder per source).

Each SOURCE becomes the dataset DATA/NAME that blends refer to by NAME. Write NAME=SOURCE to choose the name;
otherwise it is the built-in's name, the reasoning-gym task, or the file / folder name.

SOURCE is one of:
  general              built-in: ~1M tokens of passages (LAMBADA, CoQA, DROP, SQuAD, BoolQ, SciQ), offline
  math                 built-in: 20k GSM-style problems with worked solutions + 15k arithmetic (reasoning-gym)
  gsm8k-test           built-in: GSM8K test as text (minus the 100 items gsm_symbolic was built from)
  math-test            built-in: MATH test (5000 problems with solutions) as text
  rg:TASK[:N[:SEED]]   N items (default 1000, seed 0) of a reasoning-gym task, e.g. rg:gsm_symbolic:5000:1
  FILE | FOLDER | GLOB .txt/.md (one document per file), .jsonl/.json(.gz) and .parquet (one per record, from
                       --text-field or --template), folders written by datasets' save_to_disk

Documents are tokenised without special tokens and each is followed by the tokenizer's EOS (preceded by BOS
if the tokenizer adds one by default). Tokens are stored as uint16 when the vocabulary fits, else uint32.
`--holdout F` moves a fraction F of the documents (spread evenly) to a 'val' split for held-out loss.
Re-running with the same inputs does nothing; a dataset folder appears only once complete, so an interrupted
run leaves nothing that looks finished. Non-UTF-8 input is an error unless --encoding-errors replace/ignore.

examples:
  loopfit prepare general math --tokenizer smollm2-135m --out data/ --holdout 0.01
  loopfit prepare qa=corpus/qa.jsonl.gz --template "Question: {question}\\nAnswer: {answer}" \\
      --tokenizer runs/smol-448 --out data/
  loopfit prepare books='texts/**/*.txt' gsm=rg:gsm_symbolic:50000:1 --tokenizer runs/smol-448 --out data/
"""

import glob
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np

from .. import LoopfitError, __version__
from ..io import atomic_dir, atomic_file, check_writable, sha256_file
from ..loading import load_tokenizer
from . import sources
from .shards import FORMAT, MANIFEST, token_dtype, tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
BATCH_DOCS = 256


def add_arguments(parser):
    parser.add_argument("sources", nargs="+", metavar="[NAME=]SOURCE", help="what to tokenise (see above)")
    parser.add_argument("--tokenizer", required=True, help="model folder, tokenizer folder, GGUF file or short name")
    parser.add_argument("--out", required=True, help="data root: each source is written to OUT/NAME")
    from ..cli import options_of

    option = options_of(parser, prepare_one)
    option("--text-field", help="JSON/Parquet field holding the text (default: %(default)s)")
    parser.add_argument("--template", help='format over record fields, e.g. "Question: {question}\\nAnswer: {answer}"')
    option("--holdout", type=float, help="fraction of documents for the 'val' split, e.g. 0.01 (default %(default)s)")
    option("--limit", type=int, help="keep only the first N documents of each source (for quick tries)")
    option("--shard-tokens", type=int, help="tokens per shard file (default %(default)s)")
    option("--workers", type=int, help="tokenising processes (default %(default)s)")
    option("--encoding-errors", choices=("strict", "replace", "ignore"),
           help="non-UTF-8 bytes: stop (strict), use U+FFFD (replace) or drop them (ignore) (default %(default)s)")
    parser.add_argument("--force", action="store_true", help="replace datasets prepared with other settings")


def run(args):
    # The shell passes "\n" in a template as backslash + n: mean a newline, as the examples do.
    template = args.template.replace("\\n", "\n").replace("\\t", "\t") if args.template else None
    results = prepare(
        args.sources, args.tokenizer, args.out, text_field=args.text_field, template=template,
        holdout=args.holdout, limit=args.limit, shard_tokens=args.shard_tokens, workers=args.workers,
        encoding_errors=args.encoding_errors, force=args.force,
    )  # fmt: skip
    for folder, manifest, status in results:
        splits = manifest["splits"]
        val = f", val {splits['val']['tokens']:,} tokens" if splits["val"]["tokens"] else ""
        print(f"{manifest['name']}: {splits['train']['tokens']:,} tokens in {splits['train']['documents']:,} "
              f"documents{val} -> {folder} ({status})")  # fmt: skip
    return 0


# ---------------------------------------------------------------- naming and settings


def split_name(arg):
    """'NAME=SOURCE' -> (NAME, SOURCE); a bare SOURCE gets a name from the built-in, task, file or folder."""
    name, eq, spec = arg.partition("=")
    if eq and name and "/" not in name and not glob.has_magic(name):
        return _check_name(name), spec
    spec = arg
    if spec in sources.BUILTINS:
        return spec, spec
    if spec.startswith("rg:"):
        return _check_name(sources.parse_generator(spec)[0]), spec
    path = Path(spec.split("*")[0].split("?")[0].split("[")[0])
    stem = path.name if path.name and not glob.has_magic(spec) else path.name or path.parent.name
    for suffix in sorted(sources.SUPPORTED, key=len, reverse=True):
        stem = stem.removesuffix(suffix)
    if not stem or stem in (".", ".."):
        raise LoopfitError(f"cannot name source '{spec}': write NAME={spec}")
    return _check_name(stem), spec


def _check_name(name):
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise LoopfitError(f"dataset name '{name}' must be letters, digits, '-', '_' or '.': write NAME=SOURCE")
    return name


def _source_stamp(spec):
    """What identifies the input of a source: for files their paths, sizes and modification times."""
    if spec in sources.BUILTINS or spec.startswith("rg:"):
        return spec
    stamp = []
    for p in sources.expand_paths(spec):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stamp += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return stamp


# ---------------------------------------------------------------- tokenising

_TOKENIZER = None  # set in each worker process (and in the parent when workers <= 1)


def _init_worker(tokenizer):
    global _TOKENIZER
    _TOKENIZER = tokenizer


def _encode(texts):
    ids = _TOKENIZER(texts, add_special_tokens=False)["input_ids"]
    return [np.asarray(x, dtype=np.uint32) for x in ids]


def _adds_bos(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or bos == eos:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _batches(docs, limit):
    batch, n = [], 0
    for text in docs:
        if limit is not None and n >= limit:
            break
        if text:
            batch.append(text)
            n += 1
            if len(batch) == BATCH_DOCS:
                yield batch
                batch = []
    if batch:
        yield batch


def encoded_documents(texts, tokenizer, workers, limit=None):
    """Yield token-id arrays (uint32, no special tokens) of the non-empty `texts`, in order, using `workers`
    processes. Stops after `limit` documents."""
    batches = _batches(texts, limit)
    if workers <= 1:
        _init_worker(tokenizer)
        for batch in batches:
            yield from _encode(batch)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes, not threads, share the cores
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        for encoded in pool.imap(_encode, batches, chunksize=1):
            yield from encoded


class _ShardWriter:
    """Accumulates documents of one split and writes `{split}-{k:05d}.tokens.npy` / `.docs.npy` shards."""

    def __init__(self, folder, split, dtype, shard_tokens):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.pending, self.pending_tokens, self.shards = [], 0, []
        self.tokens = self.documents = 0

    def add(self, doc):
        self.pending.append(doc)
        self.pending_tokens += len(doc)
        self.tokens += len(doc)
        self.documents += 1
        if self.pending_tokens >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.pending:
            return
        stem = f"{self.split}-{len(self.shards):05d}"
        tokens = np.concatenate(self.pending).astype(self.dtype)
        ends = np.cumsum([len(d) for d in self.pending], dtype=np.int64)
        shard = {"tokens_file": f"{stem}.tokens.npy", "docs_file": f"{stem}.docs.npy", "tokens": len(tokens),
                 "documents": len(ends), "sha256": {}}  # fmt: skip
        for file, array in ((shard["tokens_file"], tokens), (shard["docs_file"], ends)):
            np.save(self.folder / file, array)
            shard["sha256"][file] = sha256_file(self.folder / file)
        self.shards.append(shard)
        self.pending, self.pending_tokens = [], 0

    def summary(self):
        self.flush()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}


def is_holdout(i, holdout):
    """Whether document i goes to 'val': exactly floor(n * holdout) of the first n documents, spread evenly."""
    return int((i + 1) * holdout) > int(i * holdout)


# ---------------------------------------------------------------- the whole step


def prepare_one(name, spec, tokenizer, out, *, text_field="text", template=None, holdout=0.0, limit=None,
                shard_tokens=DEFAULT_SHARD_TOKENS, workers=DEFAULT_WORKERS, encoding_errors="strict",
                force=False, progress=True):  # fmt: skip
    """Tokenise one source spec into the dataset folder OUT/NAME; returns (folder, manifest, status) where
    status is 'written' or 'up to date' (same inputs and settings: nothing done)."""
    if not 0.0 <= holdout < 1.0:
        raise LoopfitError(f"--holdout {holdout} is outside [0, 1): use a fraction such as 0.01")
    if shard_tokens <= 0:
        raise LoopfitError(f"--shard-tokens {shard_tokens} must be positive")
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise LoopfitError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token: "
                           "use the model's own tokenizer")
    folder = Path(out) / name
    settings = {
        "source": spec, "input": _source_stamp(spec), "text_field": text_field, "template": template,
        "holdout": holdout, "limit": limit, "shard_tokens": shard_tokens, "encoding_errors": encoding_errors,
        "tokenizer": tokenizer_fingerprint(tok),
    }  # fmt: skip
    if (folder / MANIFEST).exists():
        try:
            old = json.loads((folder / MANIFEST).read_text()).get("settings")
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if old == settings:
            return folder, json.loads((folder / MANIFEST).read_text()), "up to date"
        if not force:
            raise LoopfitError(f"{folder} already holds a dataset prepared from other inputs or settings: "
                               "pass --force to replace it")
    elif folder.exists() and any(folder.iterdir()) and not force:
        raise LoopfitError(f"{folder} exists and is not a prepared dataset: "
                           "choose another NAME or --out, or pass --force")

    vocab_size = len(tok)
    dtype = token_dtype(vocab_size)
    bos = _adds_bos(tok)
    eos = np.asarray([tok.eos_token_id], dtype=np.uint32)
    head = np.asarray([bos] if bos is not None else [], dtype=np.uint32)
    start = time.time()
    docs = sources.read_documents(spec, text_field, template, encoding_errors)
    with atomic_dir(folder, force=True) as tmp:
        writers = {"train": _ShardWriter(tmp, "train", dtype, shard_tokens),
                   "val": _ShardWriter(tmp, "val", dtype, shard_tokens)}
        with _progress(name, progress) as bar:  # closed before an error is printed, so the error is the last line
            for i, ids in enumerate(encoded_documents(docs, tok, workers, limit)):
                doc = np.concatenate([head, ids, eos])
                writers["val" if holdout and is_holdout(i, holdout) else "train"].add(doc)
                bar.update(1)
                if i % 1024 == 0:
                    bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}")
        splits = {s: w.summary() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise LoopfitError(f"source '{spec}' has no documents (no text found): "
                               "check the path, --text-field or --template")
        if holdout and splits["val"]["documents"] == 0:
            raise LoopfitError(f"--holdout {holdout} of {splits['train']['documents']} documents selects none: "
                               f"raise it to at least {1 / splits['train']['documents']:.3g}")
        manifest = {
            "format": FORMAT,
            "name": name,
            "source": spec,
            "description": sources.describe(spec),
            "tokenizer": {"name": str(getattr(tok, "name_or_path", "")), "fingerprint": settings["tokenizer"],
                          "vocab_size": vocab_size, "eos_token_id": tok.eos_token_id, "bos_token_id": bos},  # fmt: skip
            "dtype": np.dtype(dtype).name,
            "document_format": ("BOS + " if bos is not None else "") + "text tokens + EOS",
            "holdout": {"fraction": holdout, "rule": "document i is in 'val' iff floor((i+1)*f) > floor(i*f)"},
            "splits": splits,
            "settings": settings,
            "seconds": round(time.time() - start, 2),
            "loopfit_version": __version__,
        }
        if spec == "gsm8k-test":
            manifest["excluded"] = {"gsm8k_test_ids": list(sources.test_sets.GSM_SYMBOLIC_SOURCE_IDS),
                                    "why": "the GSM8K test items reasoning-gym's gsm_symbolic templates were "
                                           "built from"}  # fmt: skip
        with atomic_file(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
    return folder, manifest, "written"


def _progress(name, enabled):
    from tqdm import tqdm

    return tqdm(desc=f"prepare {name}", unit=" docs", disable=not enabled, mininterval=1.0)


def prepare(source_args, tokenizer, out, **options):
    """Prepare each '[NAME=]SOURCE' into OUT/NAME (see `prepare_one` for options); returns its results.
    All names are checked before anything is written."""
    if options.get("limit") is not None and options["limit"] < 1:
        raise LoopfitError(f"--limit {options['limit']} must be a positive number of documents (or leave it out)")
    check_writable(out)
    named = [split_name(a) for a in source_args]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LoopfitError(f"two sources would both be written to '{dup}': name them with NAME=SOURCE")
    for _, spec in named:  # fail on a missing file before tokenising anything
        if spec not in sources.BUILTINS and not spec.startswith("rg:"):
            sources.expand_paths(spec)
    tok = load_tokenizer(tokenizer)
    created = not Path(out).exists()
    try:
        return [prepare_one(name, spec, tok, out, **options) for name, spec in named]
    except BaseException:
        if created and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()  # a failed first run leaves no empty --out behind
        raise
