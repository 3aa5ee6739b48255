"""Loss masks of conversations and the end-of-text token, with the tiny in-process tokenizer (the real SmolLM2
template: tests/integration/test_data_chat.py)."""

import json

import pytest
import tiny_models

from loopfit import LoopfitError
from loopfit.data import open_dataset, prepare
from loopfit.data.chat import CHAT_TEMPLATES, encode_chat, resolve_template
from loopfit.data.shards import document_end_token
from loopfit.data.sources import Chat

CHAT = Chat(({"role": "system", "content": "be brief"}, {"role": "user", "content": "what is 2 + 3"},
             {"role": "assistant", "content": "it is 5"}, {"role": "user", "content": "and 4 + 4"},
             {"role": "assistant", "content": "8"}))  # fmt: skip


@pytest.mark.parametrize("name, turn_end", [("chatml", "<|im_end|>"), ("plain", "")])
def test_mask_holds_each_assistant_turn_and_its_end(name, turn_end):
    tok = tiny_models.tokenizer()
    ids, mask = encode_chat(tok, CHAT, CHAT_TEMPLATES[name])
    assert len(ids) == len(mask) and ids.tolist() == tok(tok.apply_chat_template(
        list(CHAT.messages), chat_template=CHAT_TEMPLATES[name], tokenize=False), add_special_tokens=False)["input_ids"]
    want = []
    for m in CHAT.messages:
        if m["role"] == "assistant":
            want += tok(m["content"] + turn_end, add_special_tokens=False)["input_ids"]
    assert ids[mask.astype(bool)].tolist() == want


def test_prompt_response_pairs_and_the_manifest(tmp_path):
    tok = tiny_models.tokenizer()
    rows = [{"prompt": f"what is {i} + 1", "response": f"it is {i + 1}"} for i in range(8)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(LoopfitError, match="has no chat template: name one with --chat-template"):
        prepare([str(tmp_path / "pairs.jsonl")], tok, tmp_path / "data", progress=False)
    [(folder, manifest, _)] = prepare([str(tmp_path / "pairs.jsonl")], tok, tmp_path / "data", progress=False,
                                      chat_template="chatml", workers=1)
    answers = [tok(f"it is {i + 1}<|im_end|>", add_special_tokens=False)["input_ids"] for i in range(8)]
    assert manifest["loss_mask"] and manifest["splits"]["train"]["loss_tokens"] == sum(map(len, answers))
    ds = open_dataset(folder)
    for i in range(8):
        start, n = ds.doc_start(i), int(ds.doc_ends[i]) - ds.doc_start(i)
        assert ds.tokens(start, n)[ds.loss_mask(start, n)].tolist() == answers[i]
        assert ds.labels(start, n)[-1] == -100 and ds.tokens(start, n)[-1] == tok.eos_token_id


def test_end_of_text_token_of_an_instruct_tokenizer():
    tok = tiny_models.tokenizer()
    assert document_end_token(tok) == tok.eos_token_id  # no chat template: its EOS
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = CHAT_TEMPLATES["chatml"]  # EOS = the template's end of turn: the end-of-text token instead
    assert document_end_token(tok) == tok.convert_tokens_to_ids("<|endoftext|>") != tok.eos_token_id


def test_named_template_must_exist():
    with pytest.raises(LoopfitError, match="neither a name .*chatml.* nor a file"):
        resolve_template(tiny_models.tokenizer(), "vicuna")
