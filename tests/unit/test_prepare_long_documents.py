"""`loopfit prepare` hands a long document to the tokenizer in pieces (its working memory is about a hundred times
the text it is handed), and the pieces' tokens are the whole document's, for the tokenizer styles of the supported
families: byte-level BPE (GPT-2, Llama 3, Qwen2, SmolLM2), SentencePiece as Llama 2's tokenizer.json writes it (a
'▁' prepended to every text it is handed) and a Metaspace pre-tokenizer (Gemma)."""

import importlib

import pytest
from tiny_models import long_document, record_tokenizer_calls
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from loopfit.data import open_dataset, prepare

prep = importlib.import_module("loopfit.data.prepare")  # the module: loopfit.data.prepare is the function

def trained_tokenizer(style, text):
    """A small BPE tokenizer of `style`, trained on `text` (SentencePiece styles: no token spans two words)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if style == "byte-level" else
                         pre_tokenizers.Metaspace(prepend_scheme="always", split=True))
    samples = [text[i:i + 2000] for i in range(0, len(text), 2000)]
    tok.train_from_iterator(samples, trainers.BpeTrainer(vocab_size=1500, special_tokens=["</s>"],
                                                         show_progress=False))
    if style == "llama-2":  # its tokenizer.json: a normalizer prepends '▁' to the text, no pre-tokenizer
        tok.pre_tokenizer = None
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    elif style == "metaspace":
        tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>")


@pytest.mark.parametrize("style", ["byte-level", "llama-2", "metaspace"])
def test_a_long_document_goes_in_pieces_and_keeps_the_whole_documents_tokens(style, tmp_path, monkeypatch):
    text = long_document(200_000)
    tok = trained_tokenizer(style, text)
    expected = tok(text, add_special_tokens=False)["input_ids"]
    monkeypatch.setattr(prep, "PIECE_CHARS", 3_000, raising=False)
    monkeypatch.setattr(prep, "BATCH_CHARS", 10_000, raising=False)
    handed = record_tokenizer_calls(monkeypatch, tok)
    (tmp_path / "book.txt").write_text(text)
    [(folder, _, _)] = prepare([str(tmp_path / "book.txt")], tok, tmp_path / "data", workers=1, progress=False)
    assert 10 < len(handed) and max(handed) < 2 * 10_000, handed[:20]
    ds = open_dataset(folder)
    assert ds.num_docs == 1 and ds.tokens(0, ds.num_tokens).tolist() == expected + [tok.eos_token_id]


def test_pieces_cover_the_text_and_are_cut_between_words():
    text = long_document(50_000, seed=1) + "x" * 7_000  # a stretch without words is cut where it must be
    pairs = list(prep.text_pieces(text, 3_000))
    assert "".join(piece for _, piece in pairs) == text and all(len(piece) <= 3_000 for _, piece in pairs)
    for (_, before_piece), (before, piece) in zip(pairs, pairs[1:]):
        assert before_piece.endswith(before) and len(before) <= prep.CONTEXT_CHARS
        if not piece.startswith("x"):
            assert piece[0] == " " and piece[1].isalpha() and not before_piece[-1].isspace()
