"""`loopfit prepare` through the CLI on data as users keep it: every format `datasets` reads, compressed files,
a chosen split of a saved DatasetDict, per-source fields and a sources YAML, a chat set (its loss mask checked
token by token against the template), the memory bound of streaming, the built-in corpora's tokens, and the
one-line refusals of bad input."""

import bz2
import gzip
import hashlib
import json
import lzma
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from loopfit.data import open_dataset

RECORDS = [{"body": f"Record {i}: a line about the river, with a comma.", "id": i} for i in range(30)]


def loopfit(*argv, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "loopfit.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=600)


def refused(proc, *words):
    """rc 2 and one stderr line (besides progress bars) naming `words`."""
    lines = [x for x in proc.stderr.splitlines() if x.strip() and not x.startswith("prepare ")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("loopfit prepare: error: "), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])


def docs_of(folder):
    ds = open_dataset(folder)
    return [ds.tokens(ds.doc_start(i), int(ds.doc_ends[i]) - ds.doc_start(i)).tolist() for i in range(ds.num_docs)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    w = tmp_path_factory.mktemp("formats")
    jsonl = "".join(json.dumps(r) + "\n" for r in RECORDS)
    csv = "body,id\n" + "".join(f'"{r["body"]}",{r["id"]}\n' for r in RECORDS)
    (w / "r.jsonl").write_text(jsonl)
    (w / "r.json").write_text(json.dumps(RECORDS))
    (w / "r.csv").write_text(csv)
    (w / "r.tsv").write_text("body\tid\n" + "".join(f'{r["body"]}\t{r["id"]}\n' for r in RECORDS))
    pq.write_table(pa.Table.from_pylist(RECORDS), w / "r.parquet")
    table = pa.Table.from_pylist(RECORDS)
    with pa.OSFile(str(w / "r.arrow"), "wb") as f, pa.ipc.new_stream(f, table.schema) as writer:
        writer.write_table(table)
    with gzip.open(w / "r.jsonl.gz", "wt") as f:
        f.write(jsonl)
    with bz2.open(w / "r.csv.bz2", "wt") as f:
        f.write(csv)
    with lzma.open(w / "r.jsonl.xz", "wt") as f:
        f.write(jsonl)
    (w / "one.txt").write_text(RECORDS[0]["body"])
    with lzma.open(w / "one.txt.xz", "wt") as f:
        f.write(RECORDS[0]["body"])
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(RECORDS[:5]),
                               "test": datasets.Dataset.from_list(RECORDS)})
    dd.save_to_disk(str(w / "saved"))
    return w


def test_every_format_and_compression_gives_the_same_tokens(files, tmp_path, smollm2_tokenizer_dir,
                                                            smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    expected = [tok(r["body"], add_special_tokens=False)["input_ids"] + [end] for r in RECORDS]
    names = ["r.jsonl", "r.json", "r.csv", "r.tsv", "r.parquet", "r.arrow", "r.jsonl.gz", "r.csv.bz2", "r.jsonl.xz"]
    try:
        import zstandard

        with open(files / "r.jsonl", "rb") as src, open(files / "r.jsonl.zst", "wb") as dst:
            dst.write(zstandard.ZstdCompressor().compress(src.read()))
        names.append("r.jsonl.zst")
    except ImportError:
        pass  # reading .zst needs zstandard (a loopfit dependency); an environment without it is refused below
    specs = [f"f{i}={files / n}:body" for i, n in enumerate(names)] + [f"saved={files / 'saved'}@test:body"]
    sources = {"templated": {"path": str(files / "r.csv"), "template": "{body}"},
               "split_train": {"path": str(files / "saved"), "split": "train", "field": "body"}}
    (tmp_path / "sources.yaml").write_text(json.dumps(sources))  # JSON is YAML
    out = tmp_path / "data"
    proc = loopfit("prepare", *specs, "--sources", tmp_path / "sources.yaml", "--tokenizer", smollm2_tokenizer_dir,
                   "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for i, name in enumerate(names):
        assert docs_of(out / f"f{i}") == expected, name
    assert docs_of(out / "saved") == expected
    assert docs_of(out / "templated") == expected
    assert docs_of(out / "split_train") == expected[:5]
    manifest = json.loads((out / "saved" / "manifest.json").read_text())
    assert manifest["settings"]["split"] == "test" and manifest["settings"]["field"] == "body"
    proc = loopfit("prepare", files / "one.txt", f"xz={files / 'one.txt.xz'}", "--tokenizer", smollm2_tokenizer_dir,
                   "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert docs_of(out / "one") == docs_of(out / "xz") == expected[:1]  # a text file is one document
    again = loopfit("prepare", *specs, "--sources", tmp_path / "sources.yaml", "--tokenizer", smollm2_tokenizer_dir,
                    "--out", out)
    assert again.returncode == 0 and again.stdout.count("(up to date)") == len(specs) + 2


def test_chat_set_is_masked_token_by_token(tmp_path, smollm2_tokenizer_dir, smollm2_tokenizer):
    tok = smollm2_tokenizer
    chats = [{"conversation": [{"role": "system", "content": "Be brief."},
                               {"role": "user", "content": f"Spell {w}."},
                               {"role": "assistant", "content": " ".join(w.upper())}]}
             for w in ("cat", "river", "mill", "bridge", "lantern", "orchard")]  # fmt: skip
    with gzip.open(tmp_path / "chats.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(c) + "\n" for c in chats))
    proc = loopfit("prepare", f"chat={tmp_path / 'chats.jsonl.gz'}:conversation", "--tokenizer",
                   smollm2_tokenizer_dir, "--out", tmp_path / "data", "--workers", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "in the loss" in proc.stdout
    ds = open_dataset(tmp_path / "data" / "chat")
    for i, chat in enumerate(chats):
        start, n = ds.doc_start(i), int(ds.doc_ends[i]) - ds.doc_start(i)
        ids, mask = ds.tokens(start, n).tolist(), ds.loss_mask(start, n).tolist()
        rendered = tok.apply_chat_template(chat["conversation"], tokenize=False)
        end = tok.convert_tokens_to_ids("<|endoftext|>")
        assert ids == tok(rendered, add_special_tokens=False)["input_ids"] + [end]
        prompt = tok.apply_chat_template(chat["conversation"][:2], tokenize=False, add_generation_prompt=True)
        n_prompt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        answer = tok(chat["conversation"][2]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        want = [0] * n_prompt + [1] * len(answer) + [0] * (len(ids) - n_prompt - len(answer))
        assert mask == [bool(x) for x in want], i  # the answer and its <|im_end|>; not "\n" nor the end of text
        assert ids[n_prompt : n_prompt + len(answer)] == answer


def peak_rss_mb(*argv):
    """Peak resident memory of one `loopfit` process, in MB (ru_maxrss of a fresh parent's only child)."""
    code = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:], capture_output=True); "
            "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)")
    out = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "loopfit.cli", *map(str, argv)],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=True)
    rc, mb = map(int, out.stdout.split())
    assert rc == 0
    return mb


def test_ten_documents_of_a_300_mb_file_take_memory_of_a_batch(tmp_path, smollm2_tokenizer_dir):
    line = json.dumps({"text": "word " * 2000, "id": 1}) + "\n"
    big, small = tmp_path / "big.jsonl", tmp_path / "small.jsonl"
    with open(big, "w") as f:
        for _ in range(300_000_000 // len(line)):
            f.write(line)
    small.write_text(line * 20)
    common = ["--limit", "10", "--workers", "1", "--tokenizer", smollm2_tokenizer_dir]
    base = peak_rss_mb("prepare", small, *common, "--out", tmp_path / "a")
    peak = peak_rss_mb("prepare", big, *common, "--out", tmp_path / "b")
    big.unlink()
    # The process holds torch and transformers before it reads anything (`base`, the same command on a 200 KB
    # file); reading the whole 300 MB file, as loopfit did before streaming, would add over 300 MB.
    assert peak - base < 100, (base, peak)


BUILTIN_SPECS = ["general", "math", "gsm8k-test", "math-test", "rg:chain_sum:40:3", "rg:gsm_symbolic:30:1"]
# text_token_digest of each source's first 60 documents, computed by this test's own function on the token
# shards loopfit wrote before prepare read files through `datasets` (the end-of-text token left out: SmolLM2's
# changed from <|im_end|> to <|endoftext|>, checked separately)
BUILTIN_DIGESTS = {"general": "ae1f89259e614c89", "math": "3d80e779fa123e7d", "gsm8k-test": "95b546e0983b8db3",
                   "math-test": "0b4ae0c90af5c8fc", "rg:chain_sum:40:3": "0ed98afb36965fd0",
                   "rg:gsm_symbolic:30:1": "d1f9ee4f365b6024"}  # fmt: skip


def text_token_digest(folder):
    ds = open_dataset(folder)
    h = hashlib.sha256()
    for i in range(ds.num_docs):
        doc = ds.tokens(ds.doc_start(i), int(ds.doc_ends[i]) - ds.doc_start(i))
        h.update(doc[:-1].astype(np.uint32).tobytes() + b"|")
    return h.hexdigest()[:16]


def test_builtin_corpora_and_generators_keep_their_tokens(tmp_path, smollm2_tokenizer_dir, smollm2_tokenizer):
    names = [f"s{i}={s}" for i, s in enumerate(BUILTIN_SPECS)]
    proc = loopfit("prepare", *names, "--limit", "60", "--workers", "1", "--tokenizer", smollm2_tokenizer_dir,
                   "--out", tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    end = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    for i, spec in enumerate(BUILTIN_SPECS):
        ds = open_dataset(tmp_path / f"s{i}")
        assert text_token_digest(tmp_path / f"s{i}") == BUILTIN_DIGESTS[spec], spec
        assert set(ds.tokens(0, ds.num_tokens)[ds.doc_ends - 1].tolist()) == {end}


@pytest.fixture(scope="module")
def bad(tmp_path_factory, smollm2_tokenizer):
    import datasets

    w = tmp_path_factory.mktemp("bad-data")
    tok = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tok.chat_template = None
    tok.save_pretrained(w / "no-template")
    for p in (w / "no-template").glob("chat_template*"):
        p.unlink()
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    (w / "chat.jsonl").write_text(json.dumps(chat) + "\n")
    (w / "role.jsonl").write_text(json.dumps({"messages": [{"role": "narrator", "content": "x"}]}) + "\n")
    (w / "content.jsonl").write_text(json.dumps({"messages": [{"role": "user", "text": "x"}]}) + "\n")
    (w / "r.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    (w / "r.csv").write_text("body,id\nx,1\n")
    (w / "cut.jsonl.gz").write_bytes(gzip.compress(b'{"text": "x"}\n' * 1000)[:40])
    (w / "cut.csv.xz").write_bytes(lzma.compress(b"text\n" + b"a line\n" * 1000)[:60])
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}]),
                          "validation": datasets.Dataset.from_list([{"text": "b"}])}).save_to_disk(str(w / "saved"))
    return w


@pytest.mark.parametrize("args, words", [
    (["chat.jsonl", "--tokenizer", "no-template"], ["holds conversations", "no chat template", "--chat-template"]),
    (["role.jsonl"], ["role.jsonl record 1", "unknown role 'narrator'", "user, assistant"]),
    (["content.jsonl"], ["message 0 (user) has no text 'content'"]),
    (["saved@test"], ["has no split 'test'", "(splits: train, validation)", "@SPLIT"]),
    (["saved"], ["holds several splits", "(splits: train, validation)"]),
    (["r.jsonl:text"], ["has no field 'text'", "(fields: body, id)"]),
    (["r.csv:question"], ["r.csv record 1 has no field 'question'", "(fields: body, id)"]),
    (["cut.jsonl.gz"], ["cut.jsonl.gz is not a complete gz file", "re-download or re-compress"]),
    (["cut.csv.xz"], ["cut.csv.xz is not a complete xz file", "re-download or re-compress"]),
])  # fmt: skip
def test_bad_data_is_refused_in_one_line_with_nothing_written(bad, smollm2_tokenizer_dir, args, words):
    out = bad / "out"
    if "--tokenizer" not in args:
        args = [*args, "--tokenizer", smollm2_tokenizer_dir]
    refused(loopfit("prepare", *args, "--out", out, cwd=bad), *words)
    assert not out.exists()


def test_help_names_the_formats():
    text = loopfit("prepare", "--help").stdout
    for word in (".csv", ".parquet", ".arrow", ".zst", "@SPLIT", "--sources", "--chat-template", "messages"):
        assert word in text, word
    assert re.search(r"<\|endoftext\|>", text)
