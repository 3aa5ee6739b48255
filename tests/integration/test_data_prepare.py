"""`loopfit prepare`: token shards with SmolLM2's real tokenizer, manifests, idempotence, damage detection."""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tiny_models

from loopfit import LoopfitError
from loopfit.cli import main as cli
from loopfit.data import check_tokenizer, iter_eval_batches, open_dataset, prepare, verify_dataset
from loopfit.data.prepare import split_name
from loopfit.data.shards import document_end_token, tokenizer_fingerprint
from loopfit.data.sources import Source

TEXTS = [f"Document number {i}: " + "the quick brown fox jumps over the lazy dog. " * (i % 7 + 1) for i in range(60)]


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


@pytest.fixture
def corpus(tmp_path):
    return write_jsonl(tmp_path / "corpus.jsonl", TEXTS)


def test_shards_hold_each_document_then_eos(tmp_path, corpus, smollm2_tokenizer):
    [(folder, manifest, status)] = prepare([str(corpus)], smollm2_tokenizer, tmp_path / "data", workers=2,
                                           progress=False, shard_tokens=500)  # fmt: skip
    assert status == "written" and folder == tmp_path / "data" / "corpus"
    ds = open_dataset(folder)
    eos = smollm2_tokenizer.convert_tokens_to_ids("<|endoftext|>")  # not the Instruct EOS <|im_end|>: see below
    assert document_end_token(smollm2_tokenizer) == eos == manifest["tokenizer"]["eos_token_id"] == 0
    expected = [smollm2_tokenizer(t, add_special_tokens=False)["input_ids"] + [eos] for t in TEXTS]
    assert ds.num_docs == 60 and ds.num_tokens == sum(map(len, expected))
    assert len(manifest["splits"]["train"]["shards"]) > 1  # shard_tokens=500 forces several
    assert ds.tokens(0, ds.num_tokens).tolist() == [t for doc in expected for t in doc]  # across shard edges
    for i in (0, 17, 59):
        assert ds.tokens(ds.doc_start(i), len(expected[i])).tolist() == expected[i]
    assert np.load(folder / "train-00000.tokens.npy").dtype == np.uint16  # vocab 49152 fits
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(smollm2_tokenizer)
    assert manifest["tokenizer"]["vocab_size"] == 49152 and manifest["source"] == str(corpus)


def test_workers_do_not_change_the_output(tmp_path, corpus, smollm2_tokenizer):
    one = prepare([f"a={corpus}"], smollm2_tokenizer, tmp_path, workers=1, progress=False)[0][0]
    two = prepare([f"b={corpus}"], smollm2_tokenizer, tmp_path, workers=2, progress=False)[0][0]
    assert (one / "train-00000.tokens.npy").read_bytes() == (two / "train-00000.tokens.npy").read_bytes()


def test_rerun_is_idempotent_and_changes_need_force(tmp_path, corpus, smollm2_tokenizer):
    out = tmp_path / "data"
    folder = prepare([str(corpus)], smollm2_tokenizer, out, progress=False)[0][0]
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare([str(corpus)], smollm2_tokenizer, out, progress=False)[0][2] == "up to date"
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    write_jsonl(corpus, TEXTS[:10])
    with pytest.raises(LoopfitError, match="other inputs or settings: pass --force"):
        prepare([str(corpus)], smollm2_tokenizer, out, progress=False)
    assert open_dataset(folder).num_docs == 60  # the old dataset is untouched
    prepare([str(corpus)], smollm2_tokenizer, out, progress=False, force=True)
    assert open_dataset(folder).num_docs == 10


def test_holdout_split_and_eval_batches(tmp_path, corpus, smollm2_tokenizer):
    folder, manifest, _ = prepare([str(corpus)], smollm2_tokenizer, tmp_path, holdout=0.1, progress=False)[0]
    assert manifest["splits"]["val"]["documents"] == 6 and manifest["splits"]["train"]["documents"] == 54
    val = open_dataset(folder, "val")
    batches = list(iter_eval_batches(folder, seq_len=16, batch_size=4))
    ids = np.concatenate([b["input_ids"].numpy().ravel() for b in batches])
    assert ids.tolist() == val.tokens(0, (val.num_tokens // 16) * 16).tolist()
    assert all(b["input_ids"].shape[1] == 16 and (b["labels"] == b["input_ids"]).all() for b in batches)
    ranks = [list(iter_eval_batches(folder, 16, 4, rank=r, world_size=2)) for r in range(2)]
    assert len(ranks[0]) + len(ranks[1]) == len(batches)
    assert (ranks[1][0]["input_ids"] == batches[1]["input_ids"]).all()
    with pytest.raises(LoopfitError, match="no 'val' split.*--holdout"):
        next(iter_eval_batches(prepare([f"nv={corpus}"], smollm2_tokenizer, tmp_path, progress=False)[0][0], 16, 4))


def test_interrupted_run_leaves_nothing(tmp_path, smollm2_tokenizer):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS * 20) + '{"body": "no text"}\n')
    with pytest.raises(LoopfitError, match="has no field 'text'"):
        prepare([str(bad)], smollm2_tokenizer, tmp_path / "data", progress=False, shard_tokens=1000)
    assert list(tmp_path.iterdir()) == [bad]  # no output folder, no temporary left behind


@pytest.mark.parametrize("sources, kw, match", [
    (["missing.jsonl"], {}, "does not exist"),
    (["empty.jsonl"], {}, "has no documents"),
    (["corpus.jsonl"], {"holdout": 1.5}, "outside"),
    (["corpus.jsonl"], {"holdout": 0.001}, "selects none: raise it"),
    (["corpus.jsonl", "x=corpus.jsonl", "x=corpus.jsonl"], {}, "both be written to 'x'"),
    (["bad name=corpus.jsonl"], {}, "dataset name 'bad name'"),
])  # fmt: skip
def test_bad_input(tmp_path, corpus, smollm2_tokenizer, monkeypatch, sources, kw, match):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LoopfitError, match=match):
        prepare(sources, smollm2_tokenizer, tmp_path / "data", progress=False, **kw)
    assert not (tmp_path / "data").exists() or not any((tmp_path / "data").iterdir())


def test_names_splits_and_fields():
    assert split_name("general") == ("general", Source("general"))
    assert split_name("rg:gsm_symbolic:10") == ("gsm_symbolic", Source("rg:gsm_symbolic:10"))
    assert split_name("qa=x/y.jsonl") == ("qa", Source("x/y.jsonl"))
    assert split_name("corpus/part.jsonl.gz") == ("part", Source("corpus/part.jsonl.gz"))
    assert split_name("texts/**/*.txt") == ("texts", Source("texts/**/*.txt"))
    assert split_name("web=crawl.csv.zst:body") == ("web", Source("crawl.csv.zst", field="body"))
    assert split_name("saved@test:question") == ("saved", Source("saved", split="test", field="question"))
    assert split_name("chat=a/b@train_sft") == ("chat", Source("a/b", split="train_sft"))


def test_truncated_or_corrupt_shards_are_refused(tmp_path, corpus, smollm2_tokenizer):
    folder = prepare([str(corpus)], smollm2_tokenizer, tmp_path, progress=False)[0][0]
    shard = folder / "train-00000.tokens.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # flip bits: sizes still match, only the checksum can tell
    shard.write_bytes(bytes(data))
    open_dataset(folder)  # the cheap check passes
    with pytest.raises(LoopfitError, match="corrupt or truncated.*checksum mismatch.*--force"):
        verify_dataset(folder)
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(LoopfitError, match="corrupt or truncated"):
        open_dataset(folder)
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(LoopfitError, match="manifest.json is damaged"):
        open_dataset(folder)


def test_tokenizer_mismatch_and_uint32_vocab(tmp_path, corpus, smollm2_tokenizer):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<eos>": 0, "[UNK]": 1, **{w: i + 2 for i, w in enumerate(sorted(set(" ".join(TEXTS).split())))}}
    vocab.update({f"filler{i}": len(vocab) + i for i in range(70_000)})  # > 65536 entries: uint32 shards
    raw = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")

    folder = prepare([str(corpus)], big, tmp_path, progress=False)[0][0]
    assert np.load(folder / "train-00000.tokens.npy").dtype == np.uint32
    assert open_dataset(folder).tokens(0, 3).tolist() == [vocab["Document"], vocab["number"], vocab["0:"]]
    assert check_tokenizer(folder, big) == tokenizer_fingerprint(big)
    with pytest.raises(LoopfitError, match="another tokenizer.*re-run `loopfit prepare` with the model's --tokenizer"):
        check_tokenizer(tmp_path, smollm2_tokenizer)


def test_cli(tmp_path, corpus, smollm2_tokenizer_dir, capsys):
    out = tmp_path / "data"
    code = cli(["prepare", f"qa={corpus}", "--template", r"Q: {text}\nA: yes", "--tokenizer",
                str(smollm2_tokenizer_dir), "--out", str(out), "--holdout", "0.05", "--workers", "1"])  # fmt: skip
    assert code == 0
    assert "qa: " in capsys.readouterr().out
    manifest = json.loads((out / "qa" / "manifest.json").read_text())
    assert manifest["settings"]["template"] == "Q: {text}\nA: yes"  # \n from the shell means a newline
    code = cli(["prepare", str(tmp_path / "nope.txt"), "--tokenizer", str(smollm2_tokenizer_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "does not exist" in err


@pytest.mark.real
def test_builtin_general_prepares(tmp_path, smollm2_tokenizer):
    folder, manifest, _ = prepare(["general", "gsm8k-test"], smollm2_tokenizer, tmp_path, limit=300, holdout=0.01,
                                  progress=False)[0]  # fmt: skip
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["val"]["documents"] == 300
    assert "LAMBADA" in manifest["description"]
    gsm = json.loads((Path(tmp_path) / "gsm8k-test" / "manifest.json").read_text())
    assert len(gsm["excluded"]["gsm8k_test_ids"]) == 100 and "gsm_symbolic" in gsm["excluded"]["why"]
    assert os.path.exists(folder / "val-00000.tokens.npy")


def test_a_long_document_is_tokenised_in_pieces_with_the_whole_documents_tokens(tmp_path, smollm2_tokenizer,
                                                                              monkeypatch):
    """The tokenizer's working memory is about a hundred times its text: a long document is handed to it in
    pieces cut between words, never whole, and its tokens are those of the whole document."""
    prep = importlib.import_module("loopfit.data.prepare")  # the module: loopfit.data.prepare is the function
    text = tiny_models.long_document(400_000)
    expected = smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(prep, "PIECE_CHARS", 5_000, raising=False)
    monkeypatch.setattr(prep, "BATCH_CHARS", 20_000, raising=False)
    handed = tiny_models.record_tokenizer_calls(monkeypatch, smollm2_tokenizer)
    (tmp_path / "book.txt").write_text(text)
    [(folder, manifest, _)] = prepare([str(tmp_path / "book.txt")], smollm2_tokenizer, tmp_path / "data",
                                      workers=1, progress=False)
    assert max(handed) < 2 * 20_000 and len(handed) > 10, handed[:20]
    ds = open_dataset(folder)
    assert ds.num_docs == 1 and ds.tokens(0, ds.num_tokens).tolist() == expected + [document_end_token(
        smollm2_tokenizer)]
