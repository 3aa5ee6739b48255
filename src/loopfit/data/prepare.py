"""Tokenise text sources into memory-mapped token shards for `loopfit train` (one dataset folder per source).

Each SOURCE becomes the dataset DATA/NAME that blends refer to by NAME. Write NAME=SOURCE to choose the name;
otherwise it is the built-in's name, the reasoning-gym task, or the file / folder name.

SOURCE is one of:
  general              built-in: ~1M tokens of passages (LAMBADA, CoQA, DROP, SQuAD, BoolQ, SciQ), offline
  math                 built-in: 20k GSM-style problems with worked solutions + 15k arithmetic (reasoning-gym)
  math-chat            built-in: math's 20k GSM-style problems as conversations (question -> worked solution)
  gsm8k-test           built-in: GSM8K test as text (minus the 100 items gsm_symbolic was built from)
  math-test            built-in: MATH test (5000 problems with solutions) as text
  rg:TASK[:N[:SEED]]   N items (default 1000, seed 0) of a reasoning-gym task, e.g. rg:gsm_symbolic:5000:1
  FILE[:FIELD]         .jsonl/.json, .csv/.tsv, .parquet, .arrow (one document per record) and .txt/.md (one per
  FOLDER[:FIELD]       file), each also compressed (.gz .bz2 .xz .zst); a folder or quoted glob of such files.
  'GLOB'[:FIELD]       Read by `datasets` in streaming mode: memory holds a block of records, not the file.
  SAVED[@SPLIT][:FIELD] a `save_to_disk` folder; @SPLIT chooses a split of a DatasetDict
--sources FILE.yaml names sources with their own options (path, split, field, template, prompt, response,
chat_template), e.g.   qa: {path: qa.csv, template: "Q: {question}\\nA: {answer}"}
                       chats: {path: chats.jsonl.zst, field: conversation}
                       pairs: {path: pairs.parquet, prompt: instruction, response: output}

A record's document is its FIELD (default `text`), or --template over its fields. A record whose FIELD is a
`messages` list of {role, content} (found by itself when there is no `text`), or that has `prompt` and
`response` / `completion` fields, is a conversation: it is rendered with the tokenizer's chat template (or
--chat-template chatml|plain|FILE.jinja) and a loss mask is written beside the tokens: the trainer learns the
assistant turns only (the prompt of a prompt/response pair is masked).

Documents are tokenised without special tokens and each is followed by the tokenizer's end-of-text token
(preceded by BOS if the tokenizer adds one by default). That is its EOS, except for an instruct tokenizer whose
EOS is the chat end-of-turn token (SmolLM2-Instruct's `<|im_end|>`): then its distinct `<|endoftext|>`.
Tokens are stored as uint16 when the vocabulary fits, else uint32. A long document goes to the tokenizer in pieces
of 100,000 characters cut between words (giving the whole document's tokens), so memory holds its text and tokens,
not the tokenizer's working state for all of it (about a hundred times the text).
`--holdout F` moves a fraction F of the documents (spread evenly) to a 'val' split for held-out loss.
Re-running with the same inputs does nothing; a dataset folder appears only once complete, so an interrupted
run leaves nothing that looks finished. Non-UTF-8 input is an error unless --encoding-errors replace/ignore.

examples:
  loopfit prepare general math --tokenizer smollm2-135m --out data/ --holdout 0.01
  loopfit prepare qa=corpus/qa.jsonl.gz --template "Question: {question}\\nAnswer: {answer}" \\
      --tokenizer runs/smol-448 --out data/
  loopfit prepare books='texts/**/*.txt' web=crawl.csv.zst:body gsm=rg:gsm_symbolic:50000:1 \\
      --tokenizer runs/smol-448 --out data/
  loopfit prepare chat=ultrachat@train_sft:messages --tokenizer runs/smol-448 --out data/ --holdout 0.01
"""

import collections
import glob
import hashlib
import json
import multiprocessing
import os
import shutil
import time
from pathlib import Path

import numpy as np

from .. import LoopfitError, __version__
from ..io import atomic_dir, atomic_file, check_writable, sha256_file
from ..loading import load_tokenizer
from . import sources
from .chat import encode_chat, resolve_template
from .shards import FORMAT, FORMAT_MASKED, MANIFEST, document_end_token, token_dtype, tokenizer_fingerprint

DEFAULT_SHARD_TOKENS = 100_000_000
DEFAULT_WORKERS = min(2, os.cpu_count() or 1)
BATCH_DOCS = 256
# A tokenizer's working memory is about a hundred times the text it is handed: long documents go to it in pieces
# of at most PIECE_CHARS characters (each after at most CONTEXT_CHARS of the word before it), and at most
# BATCH_CHARS characters go to it at once.
PIECE_CHARS = 100_000
CONTEXT_CHARS = 64
BATCH_CHARS = 1_000_000


def add_arguments(parser):
    parser.add_argument("sources", nargs="*", metavar="[NAME=]SOURCE", help="what to tokenise (see above)")
    parser.add_argument("--sources", dest="sources_file", metavar="FILE.yaml",
                        help="a YAML file of NAME: {path, split, field, template, prompt, response, chat_template}")
    parser.add_argument("--tokenizer", required=True, help="model folder, tokenizer folder, GGUF file or short name")
    parser.add_argument("--out", required=True, help="data root: each source is written to OUT/NAME")
    from ..cli import options_of

    option = options_of(parser, prepare_one)
    option("--text-field", help="record field holding the text or messages, for sources that name none (default: "
           "'text', else 'messages', else 'prompt' + 'response')")
    parser.add_argument("--template", help='format over record fields, e.g. "Question: {question}\\nAnswer: {answer}"')
    option("--chat-template", metavar="NAME|FILE", help="for conversations when the tokenizer has no chat template "
           "(or to replace it): chatml, plain, or a Jinja file")
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
    named = list(args.sources)
    if args.sources_file:
        named += sources.load_sources_file(args.sources_file)
    if not named:
        raise LoopfitError("nothing to prepare: give SOURCE arguments or --sources FILE.yaml")
    results = prepare(
        named, args.tokenizer, args.out, text_field=args.text_field, template=template,
        chat_template=args.chat_template, holdout=args.holdout, limit=args.limit, shard_tokens=args.shard_tokens,
        workers=args.workers, encoding_errors=args.encoding_errors, force=args.force,
    )  # fmt: skip
    for folder, manifest, status in results:
        splits = manifest["splits"]
        val = f", val {splits['val']['tokens']:,} tokens" if splits["val"]["tokens"] else ""
        masked = f" ({splits['train']['loss_tokens']:,} in the loss)" if manifest.get("loss_mask") else ""
        print(f"{manifest['name']}: {splits['train']['tokens']:,} tokens{masked} in "
              f"{splits['train']['documents']:,} documents{val} -> {folder} ({status})")  # fmt: skip
    return 0


# ---------------------------------------------------------------- naming and settings


def split_name(arg):
    """'NAME=SOURCE' -> (NAME, Source); a bare SOURCE gets a name from the built-in, task, file or folder.
    A (name, Source) pair (from a sources file) is checked and returned."""
    if isinstance(arg, tuple):
        return _check_name(arg[0]), arg[1]
    name, eq, spec = arg.partition("=")
    if eq and name and "/" not in name and not glob.has_magic(name):
        return _check_name(name), sources.parse_source(spec)
    source = sources.parse_source(arg)
    spec = source.spec
    if spec in sources.BUILTINS:
        return spec, source
    if spec.startswith("rg:"):
        return _check_name(sources.parse_generator(spec)[0]), source
    path = Path(spec.split("*")[0].split("?")[0].split("[")[0])
    stem = path.name if path.name and not glob.has_magic(spec) else path.name or path.parent.name
    for suffix in sorted(sources.SUPPORTED, key=len, reverse=True):
        stem = stem.removesuffix(suffix)
    if not stem or stem in (".", ".."):
        raise LoopfitError(f"cannot name source '{spec}': write NAME={spec}")
    return _check_name(stem), source


def _check_name(name):
    if not name.replace("-", "").replace("_", "").replace(".", "").isalnum() or name.startswith("."):
        raise LoopfitError(f"dataset name '{name}' must be letters, digits, '-', '_' or '.': write NAME=SOURCE")
    return name


def _source_stamp(spec):
    """What identifies the input of a source: for files their paths, sizes and modification times."""
    if not sources.is_path_spec(spec):
        return spec
    stamp = []
    for p in sources.expand_paths(spec):
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        stamp += [[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files]
    return stamp


# ---------------------------------------------------------------- tokenising

_TOKENIZER = None  # set in each worker process (and in the parent when workers <= 1)
_CHAT_TEMPLATE = None


def _init_worker(tokenizer, chat_template=None):
    global _TOKENIZER, _CHAT_TEMPLATE
    _TOKENIZER, _CHAT_TEMPLATE = tokenizer, chat_template


def text_pieces(text, size=PIECE_CHARS, context=CONTEXT_CHARS):
    """(word before, piece) pairs that cut `text` into pieces of at most `size` characters. Each cut is made
    before a space that follows a non-space and precedes a letter (`...word| word...`), where tokenizers start a
    new word anyway; a stretch of `size` characters without such a space (no words) is cut at its end. `word
    before` is the end (at most `context` characters) of the word the piece follows, '' for the first piece."""
    start, before = 0, ""
    while len(text) - start > size:
        cut = text.rfind(" ", start + 1, start + size)
        while cut > start and (text[cut - 1].isspace() or not text[cut + 1].isalpha()):
            cut = text.rfind(" ", start + 1, cut)
        if cut <= start:
            cut = start + size
        yield before, text[start:cut]
        word = cut
        while word > max(start, cut - context) and not text[word - 1].isspace():
            word -= 1
        start, before = cut, text[word:cut]
    yield before, text[start:]


def encode_texts(tokenizer, texts):
    """[ids uint32] of each text, without special tokens. A long text goes to the tokenizer in pieces
    (`text_pieces`), each after the word it follows, whose tokens are then dropped: a tokenizer that starts every
    text it is handed as a new word (SentencePiece's leading '▁') then gives each piece the tokens it has inside
    the whole text. At most BATCH_CHARS characters go to the tokenizer at once, so memory holds the tokens, not
    the tokenizer's working state for a whole document."""
    parts = [[] for _ in texts]
    group = []  # (text index, word before, piece)

    def flush():
        encoded = tokenizer([before + piece for _, before, piece in group] + [b for _, b, _ in group if b],
                            add_special_tokens=False)["input_ids"]
        before_ids = iter(encoded[len(group):])
        for (owner, before, piece), ids in zip(group, encoded):
            if before:
                drop = next(before_ids)
                if ids[:len(drop)] == drop:
                    ids = ids[len(drop):]
                else:  # the word before merged into the piece's first token: the piece alone
                    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
            parts[owner].append(np.asarray(ids, dtype=np.uint32))
        group.clear()

    chars = 0
    for i, text in enumerate(texts):
        for before, piece in text_pieces(text, PIECE_CHARS):
            group.append((i, before, piece))
            chars += len(before) + len(piece)
            if chars >= BATCH_CHARS:
                flush()
                chars = 0
    if group:
        flush()
    return [np.concatenate(p) if len(p) > 1 else p[0] if p else np.zeros(0, np.uint32) for p in parts]


def _encode(docs):
    """[(ids uint32, mask uint8 or None)] of a batch of documents: texts encoded together (`encode_texts`),
    conversations each through the chat template."""
    texts = [d for d in docs if isinstance(d, str)]
    text_ids = iter(encode_texts(_TOKENIZER, texts))
    out = []
    for d in docs:
        if isinstance(d, str):
            out.append((next(text_ids), None))
        else:
            out.append(encode_chat(_TOKENIZER, d, _CHAT_TEMPLATE))
    return out


def _adds_bos(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is None or bos == eos:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def _batches(docs, limit):
    """Lists of at most BATCH_DOCS non-empty documents; a list ends early once its texts reach BATCH_CHARS
    characters."""
    batch, n, chars = [], 0, 0
    for doc in docs:
        if limit is not None and n >= limit:
            break
        if doc:
            batch.append(doc)
            n += 1
            chars += len(doc) if isinstance(doc, str) else 0
            if len(batch) == BATCH_DOCS or chars >= BATCH_CHARS:
                yield batch
                batch, chars = [], 0
    if batch:
        yield batch


def encoded_documents(docs, tokenizer, workers, limit=None, chat_template=None):
    """Yield (ids uint32 without special tokens, loss mask uint8 or None) of the non-empty `docs` (texts, or
    conversations rendered with `chat_template`), in order, using `workers` processes. Stops after `limit`
    documents. At most two batches per worker are in flight, so memory does not grow with the input."""
    batches = _batches(docs, limit)
    if workers <= 1:
        _init_worker(tokenizer, chat_template)
        for batch in batches:
            yield from _encode(batch)
        return
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # processes, not threads, share the cores
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer, chat_template)) as pool:
        pending = collections.deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode, (batch,)))
            if len(pending) >= 2 * workers:
                yield from pending.popleft().get()
        while pending:
            yield from pending.popleft().get()


class _ShardWriter:
    """Writes the documents of one split into `{split}-{k:05d}.tokens.npy` / `.docs.npy` shards (and `.mask.npy`,
    1 where a token is in the loss, for a dataset with a loss mask). Tokens go to disk as they come, so memory
    holds a document's end offset per document, never a shard's tokens."""

    def __init__(self, folder, split, dtype, shard_tokens, masked=False):
        self.folder, self.split, self.dtype, self.shard_tokens = folder, split, dtype, shard_tokens
        self.masked = masked
        self.shards, self.files, self.ends = [], None, []
        self.tokens = self.documents = self.loss_tokens = 0

    def _stem(self):
        return f"{self.split}-{len(self.shards):05d}"

    def add(self, doc, mask=None):
        if self.files is None:  # a shard's raw token (and mask) bytes, made into .npy files by flush()
            kinds = ("tokens", "mask") if self.masked else ("tokens",)
            self.files = {kind: open(self.folder / f"{self._stem()}.{kind}.raw", "wb") for kind in kinds}
        self.files["tokens"].write(doc.astype(self.dtype).tobytes())
        if self.masked:
            mask = np.ones(len(doc), dtype=np.uint8) if mask is None else mask.astype(np.uint8)
            self.files["mask"].write(mask.tobytes())
            self.loss_tokens += int(mask.sum())
        self.ends.append((self.ends[-1] if self.ends else 0) + len(doc))
        self.tokens += len(doc)
        self.documents += 1
        if self.ends[-1] >= self.shard_tokens:
            self.flush()

    def flush(self):
        if not self.ends:
            return
        stem, length = self._stem(), self.ends[-1]
        shard = {"tokens_file": f"{stem}.tokens.npy", "docs_file": f"{stem}.docs.npy", "tokens": length,
                 "documents": len(self.ends), "sha256": {}}  # fmt: skip
        if self.masked:
            shard["mask_file"] = f"{stem}.mask.npy"
        for kind, f in self.files.items():
            f.close()
            dtype = self.dtype if kind == "tokens" else np.uint8
            _npy_from_raw(self.folder / f"{stem}.{kind}.raw", self.folder / shard[f"{kind}_file"], dtype, length)
        np.save(self.folder / shard["docs_file"], np.asarray(self.ends, dtype=np.int64))
        for key in ("tokens_file", "docs_file", "mask_file"):
            if key in shard:
                shard["sha256"][shard[key]] = sha256_file(self.folder / shard[key])
        self.shards.append(shard)
        self.files, self.ends = None, []

    def summary(self):
        self.flush()
        out = {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}
        if self.masked:
            out["loss_tokens"] = self.loss_tokens
        return out


def _npy_from_raw(raw, dest, dtype, length):
    """A 1-D .npy file (the bytes np.save writes) from a file of raw values, copied in blocks; `raw` is removed."""
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    with open(dest, "wb") as out, open(raw, "rb") as src:
        np.lib.format.write_array_header_1_0(out, header)
        shutil.copyfileobj(src, out, 1 << 22)
    raw.unlink()


def is_holdout(i, holdout):
    """Whether document i goes to 'val': exactly floor(n * holdout) of the first n documents, spread evenly."""
    return int((i + 1) * holdout) > int(i * holdout)


# ---------------------------------------------------------------- the whole step


def _first_document(source, text_field, template, encoding_errors):
    """The first document of a file source (reads one block) or a built-in of conversations; None for the other
    built-ins and generators (text)."""
    if not sources.is_path_spec(source.spec) and source.spec not in sources.CHAT_BUILTINS:
        return None
    docs = sources.read_documents(source, text_field, template, encoding_errors)
    try:
        return next(docs, None)
    finally:
        docs.close()


def prepare_one(name, spec, tokenizer, out, *, text_field=None, template=None, chat_template=None, holdout=0.0,
                limit=None, shard_tokens=DEFAULT_SHARD_TOKENS, workers=DEFAULT_WORKERS, encoding_errors="strict",
                force=False, progress=True):  # fmt: skip
    """Tokenise one source (a spec string or a `sources.Source`) into the dataset folder OUT/NAME; returns
    (folder, manifest, status) where status is 'written' or 'up to date' (same inputs and settings: nothing
    done). Conversations are rendered with the tokenizer's chat template (or `chat_template`: a name or a Jinja
    file) and get a loss mask."""
    if not 0.0 <= holdout < 1.0:
        raise LoopfitError(f"--holdout {holdout} is outside [0, 1): use a fraction such as 0.01")
    if shard_tokens <= 0:
        raise LoopfitError(f"--shard-tokens {shard_tokens} must be positive")
    source = spec if isinstance(spec, sources.Source) else sources.parse_source(spec)
    tok = load_tokenizer(tokenizer)
    if tok.eos_token_id is None:
        raise LoopfitError(f"tokenizer {getattr(tok, 'name_or_path', '')!r} has no EOS token: "
                           "use the model's own tokenizer")
    sources.check_source(source)
    first = _first_document(source, text_field, template, encoding_errors)
    chat = isinstance(first, sources.Chat)
    jinja = resolve_template(tok, source.chat_template or chat_template, f"source '{name}'") if chat else None
    end = document_end_token(tok)
    folder = Path(out) / name
    settings = {
        "source": source.spec, "input": _source_stamp(source.spec), "text_field": text_field or "text",
        "template": template, "holdout": holdout, "limit": limit, "shard_tokens": shard_tokens,
        "encoding_errors": encoding_errors, "tokenizer": tokenizer_fingerprint(tok), **source.settings(),
    }  # fmt: skip
    if end != tok.eos_token_id:
        settings["document_end_token"] = end
    if chat:
        settings["chat_template_sha256"] = hashlib.sha256(jinja.encode()).hexdigest()[:16]
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
    tail = np.asarray([end], dtype=np.uint32)
    head = np.asarray([bos] if bos is not None else [], dtype=np.uint32)
    start = time.time()
    docs = sources.read_documents(source, text_field, template, encoding_errors)
    with atomic_dir(folder, force=True) as tmp:
        writers = {split: _ShardWriter(tmp, split, dtype, shard_tokens, masked=chat) for split in ("train", "val")}
        with _progress(name, progress) as bar:  # closed before an error is printed, so the error is the last line
            for i, (ids, mask) in enumerate(encoded_documents(docs, tok, workers, limit, jinja)):
                if mask is None:  # text: BOS (if the tokenizer adds one) + text + end of text, all in the loss
                    doc, mask = np.concatenate([head, ids, tail]), None
                else:  # a rendered conversation carries its own BOS; the end of text between documents is no turn
                    doc, mask = np.concatenate([ids, tail]), np.concatenate([mask, [0]]).astype(np.uint8)
                writers["val" if holdout and is_holdout(i, holdout) else "train"].add(doc, mask)
                bar.update(1)
                if i % 1024 == 0:
                    bar.set_postfix(tokens=f"{writers['train'].tokens + writers['val'].tokens:,}")
        splits = {s: w.summary() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise LoopfitError(f"source '{source.spec}' has no documents (no text found): "
                               "check the path, the field or --template")
        if holdout and splits["val"]["documents"] == 0:
            raise LoopfitError(f"--holdout {holdout} of {splits['train']['documents']} documents selects none: "
                               f"raise it to at least {1 / splits['train']['documents']:.3g}")
        manifest = {
            "format": FORMAT_MASKED if chat else FORMAT,
            "name": name,
            "source": source.spec,
            "description": sources.describe(source),
            "tokenizer": {"name": str(getattr(tok, "name_or_path", "")), "fingerprint": settings["tokenizer"],
                          "vocab_size": vocab_size, "eos_token_id": end, "bos_token_id": bos},  # fmt: skip
            "dtype": np.dtype(dtype).name,
            "document_format": (("chat template tokens + end of text; loss mask on assistant turns" if chat else
                                 ("BOS + " if bos is not None else "") + "text tokens + end of text")
                                + f" ({tok.convert_ids_to_tokens(end)!r}, id {end})"),
            "loss_mask": chat,
            "holdout": {"fraction": holdout, "rule": "document i is in 'val' iff floor((i+1)*f) > floor(i*f)"},
            "splits": splits,
            "settings": settings,
            "seconds": round(time.time() - start, 2),
            "loopfit_version": __version__,
        }
        if chat:
            manifest["chat_template"] = jinja
        if source.spec == "gsm8k-test":
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
    """Prepare each '[NAME=]SOURCE' (or (name, Source) pair) into OUT/NAME (see `prepare_one` for options); returns
    its results. All names, files and first records are checked before anything is written."""
    if options.get("limit") is not None and options["limit"] < 1:
        raise LoopfitError(f"--limit {options['limit']} must be a positive number of documents (or leave it out)")
    check_writable(out)
    named = [split_name(a) for a in source_args]
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise LoopfitError(f"two sources would both be written to '{dup}': name them with NAME=SOURCE")
    tok = load_tokenizer(tokenizer)
    read = {k: options.get(k) for k in ("text_field", "template")}
    read["encoding_errors"] = options.get("encoding_errors", "strict")
    for name, source in named:  # fail on a missing file, a bad field or record before tokenising anything
        sources.check_source(source)
        if isinstance(_first_document(source, **read), sources.Chat):
            resolve_template(tok, source.chat_template or options.get("chat_template"), f"source '{name}'")
    created = not Path(out).exists()
    try:
        return [prepare_one(name, source, tok, out, **options) for name, source in named]
    except BaseException:
        if created and Path(out).is_dir() and not any(Path(out).iterdir()):
            Path(out).rmdir()  # a failed first run leaves no empty --out behind
        raise
