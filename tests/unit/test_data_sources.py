"""Sources: file readers, reasoning-gym generators and built-in corpora (test items: test_eval_items.py)."""

import gzip
import json
import re

import pytest

from loopfit import LoopfitError
from loopfit.data.sources import expand_paths, read_documents


def docs(spec, **kw):
    return list(read_documents(str(spec), **kw))


# ---------------------------------------------------------------- built-ins


def test_builtin_corpora():
    general = docs("general")
    assert len(general) > 7000 and len(set(general)) == len(general)  # passages are distinct
    assert sum(map(len, general)) > 3_000_000
    gsm = docs("gsm8k-test")
    assert len(gsm) == 1219 and gsm[0].startswith("Question: ") and "\nAnswer: " in gsm[0]
    assert len(docs("math-test")) == 5000


def test_reasoning_gym_generator_is_seeded_and_gsm_style():
    a = docs("rg:gsm_symbolic:20:3")
    assert a == docs("rg:gsm_symbolic:20:3") and a != docs("rg:gsm_symbolic:20:4")
    assert len(a) == 20 and all(re.search(r"\n#### -?[\d.]+$", d) for d in a)
    assert "Do not include units" not in a[0]
    assert docs("rg:products:5")[0].startswith("Question: ")


@pytest.mark.parametrize("spec, match", [
    ("rg:no_such_task:5", "reasoning-gym cannot make task"),
    ("rg:gsm_symbolic:many", "must be integers"),
    ("rg:gsm_symbolic:0", "must be positive"),
])  # fmt: skip
def test_bad_generator_specs(spec, match):
    with pytest.raises(LoopfitError, match=match):
        docs(spec)


# ---------------------------------------------------------------- files


def test_text_jsonl_json_gzip_parquet_and_saved_dataset(tmp_path):
    (tmp_path / "a.txt").write_text("first document\nwith two lines")
    records = [{"text": "alpha", "q": "1+1", "a": "2"}, {"text": "beta", "q": "2+2", "a": "4"}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    (tmp_path / "r.json").write_text(json.dumps(records))
    with gzip.open(tmp_path / "r.jsonl.gz", "wt") as f:
        f.write("\n".join(json.dumps(r) for r in records))
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), tmp_path / "r.parquet")
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "saved"))

    assert docs(tmp_path / "a.txt") == ["first document\nwith two lines"]
    for name in ("r.jsonl", "r.json", "r.jsonl.gz", "r.parquet", "saved"):
        assert docs(tmp_path / name) == ["alpha", "beta"], name
        assert docs(tmp_path / name, template="Q: {q}\nA: {a}") == ["Q: 1+1\nA: 2", "Q: 2+2\nA: 4"], name


def test_folders_and_globs(tmp_path):
    for i, sub in enumerate(["x", "y/z"]):
        (tmp_path / sub).mkdir(parents=True)
        (tmp_path / sub / f"{i}.txt").write_text(f"doc {i}")
    (tmp_path / "y" / "notes.bin").write_bytes(b"\x00")  # unsupported files in folders are skipped
    assert docs(tmp_path) == ["doc 0", "doc 1"]
    assert docs(f"{tmp_path}/**/*.txt") == ["doc 0", "doc 1"]
    assert [p.name for p in expand_paths(f"{tmp_path}/x/*.txt")] == ["0.txt"]


@pytest.mark.parametrize("setup, spec, kw, match", [
    (None, "missing.txt", {}, "does not exist"),
    (None, "nothing/*.jsonl", {}, "no file matches"),
    ({"r.jsonl": '{"body": "x", "id": 1}\n'}, "r.jsonl", {},
     r"record 1 has no field 'text' \(fields: body, id\): name one as SOURCE:FIELD"),
    ({"r.jsonl": '{"q": "x"}\n'}, "r.jsonl", {"template": "{q} {a}"}, "has no field 'a'.*--template"),
    ({"r.jsonl": '{"text": "x"}\n{"text": \n'}, "r.jsonl", {}, "not readable as JSON .*JSON parse error"),
    ({"r.jsonl": '{"text": 5}\n'}, "r.jsonl", {}, "not text"),
    ({"bad.txt": b"caf\xe9 au lait"}, "bad.txt", {}, r"not UTF-8 \(bad byte at offset 3\).*--encoding-errors replace"),
    ({"r.jsonl.gz": b"\x1f\x8b\x08\x00trunc"}, "r.jsonl.gz", {}, "not a complete gz file"),
    ({"r.jsonl.bz2": b"BZh91AY&SY trunc"}, "r.jsonl.bz2", {}, "not a complete bz2 file"),
    ({"r.parquet": b"PAR1 not really"}, "r.parquet", {}, "not readable as PARQUET"),
    ({"d.xls": "a,b"}, "d.xls", {}, "unknown file type"),
    ({"d.csv": "body,id\nx,1\n"}, "d.csv", {}, r"no field 'text' \(fields: body, id\)"),
    ({"c.jsonl": '{"messages": [{"role": "bot", "content": "hi"}]}\n'}, "c.jsonl", {}, "unknown role 'bot'"),
    ({"c.jsonl": '{"messages": [{"role": "user"}]}\n'}, "c.jsonl", {}, r"message 0 \(user\) has no text 'content'"),
    ({"empty/.keep": ""}, "empty", {}, "holds no"),
])  # fmt: skip
def test_bad_files_give_one_line_errors(tmp_path, monkeypatch, setup, spec, kw, match):
    monkeypatch.chdir(tmp_path)
    for name, content in (setup or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        mode = "wb" if isinstance(content, bytes) else "w"
        with open(tmp_path / name, mode) as f:
            f.write(content)
    with pytest.raises(LoopfitError, match=match) as e:
        docs(spec, **kw)
    assert "\n" not in str(e.value)


def test_non_utf8_replace_or_ignore(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    assert docs(tmp_path / "bad.txt", encoding_errors="replace") == ["caf\ufffd au lait"]
    assert docs(tmp_path / "bad.txt", encoding_errors="ignore") == ["caf au lait"]
