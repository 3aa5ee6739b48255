"""Conversations: chat-template rendering, the loss mask beside the tokens, masked labels in the sampler, the
held-out batches and the trainer's loss."""

import json

import numpy as np
import pytest
import tiny_models
import torch
import torch.nn.functional as F

from loopfit import LoopfitError
from loopfit.data import BlendSampler, iter_eval_batches, load_blend, open_dataset, prepare
from loopfit.data.chat import CHAT_TEMPLATES
from loopfit.train.config import load_recipe
from loopfit.train.sources import build_source
from loopfit.train.trainer import train

CHATS = [
    {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                  {"role": "assistant", "content": f"It is {2 * i}."},
                  {"role": "user", "content": "And doubled?"},
                  {"role": "assistant", "content": f"{4 * i}, of course."}]}
    for i in range(40)
]  # fmt: skip


def expected_mask(tok, ids):
    """The assistant tokens found by reading the ChatML tokens themselves: after `<|im_start|>assistant\\n`, up to
    and including the turn's `<|im_end|>`."""
    pieces = tok.convert_ids_to_tokens(ids)
    mask, inside = [], False
    for i, piece in enumerate(pieces):
        if piece == "<|im_end|>" and inside:
            mask.append(1)
            inside = False
            continue
        mask.append(int(inside))
        if piece == "Ċ" and i >= 2 and pieces[i - 3 : i] == ["<|im_start|>", "ass", "istant"]:
            inside = True
    return mask


@pytest.fixture(scope="module")
def chat_data(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("chat")
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    (root / "pairs.jsonl").write_text("".join(json.dumps({"prompt": f"Name {i}.", "completion": f"Number {i}."}) + "\n"
                                              for i in range(40)))
    prepare([f"chat={root / 'chats.jsonl'}", f"pairs={root / 'pairs.jsonl'}"], smollm2_tokenizer, root / "data",
            holdout=0.1, progress=False, workers=2)
    return root / "data"


def test_mask_is_exactly_the_assistant_turns(chat_data, smollm2_tokenizer):
    tok = smollm2_tokenizer
    ds = open_dataset(chat_data / "chat")
    manifest = ds.manifest
    assert manifest["format"] == "loopfit-tokens/2" and manifest["loss_mask"] and ds.masked
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    assert ds.eos_token_id == end
    for i in (0, 5, ds.num_docs - 1):
        start, stop = ds.doc_start(i), int(ds.doc_ends[i])
        ids, mask = ds.tokens(start, stop - start).tolist(), ds.loss_mask(start, stop - start).astype(int).tolist()
        assert ids[-1] == end and mask[-1] == 0  # the end of text between documents is never in the loss
        text = tok.decode(ids[:-1])
        assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_end|>\n")
        assert tok(text, add_special_tokens=False)["input_ids"] == ids[:-1]  # the template's tokens, unchanged
        assert mask[:-1] == expected_mask(tok, ids[:-1])
        assert sum(mask) > 0 and tok.decode([t for t, m in zip(ids, mask) if m]).count("<|im_end|>") == 2
    train = manifest["splits"]["train"]
    assert 0 < train["loss_tokens"] < train["tokens"] / 3


def test_prompt_response_pairs_mask_the_prompt(chat_data, smollm2_tokenizer):
    ds = open_dataset(chat_data / "pairs")
    i = 3  # records 0-8 go to train (holdout 0.1 takes the 10th, 20th, ...)
    start, stop = ds.doc_start(i), int(ds.doc_ends[i])
    ids, mask = ds.tokens(start, stop - start), ds.loss_mask(start, stop - start)
    assert smollm2_tokenizer.decode(ids[mask]) == "Number 3.<|im_end|>"


def test_sampler_labels_follow_the_mask_in_both_packings(chat_data):
    blend = load_blend({"weights": {"chat": 1}}, chat_data)
    for pack in ("concat", "docs"):
        s = BlendSampler(blend, 48, 8, seed=1, total_steps=10, pack=pack)
        b = s.batch(3)
        ids, labels = b["input_ids"], b["labels"]
        masked = labels == -100
        assert masked.any() and (~masked).any()
        assert torch.equal(labels[~masked], ids[~masked])  # where in the loss, labels are the tokens
        again = BlendSampler(blend, 48, 8, seed=1, total_steps=10, pack=pack)
        again.load_state_dict(s.state_dict())
        assert torch.equal(again.batch(3)["labels"], labels)  # resumed: the same labels
    ds = open_dataset(chat_data / "chat")
    s = BlendSampler(blend, 48, 8, seed=1, total_steps=10, pack="docs")
    row, label = s._row(0, 0)
    unit = int(s._permutation(0, 0)[0])
    start = ds.doc_start(unit)
    n = min(48, int(ds.doc_ends[unit]) - start)
    assert np.array_equal(label[:n] != -100, ds.loss_mask(start, n))


def test_held_out_batches_are_masked(chat_data):
    ds = open_dataset(chat_data / "chat", "val")
    [batch] = list(iter_eval_batches(chat_data / "chat", 32, 64, max_batches=1))
    flat_labels = batch["labels"].flatten().numpy()
    assert np.array_equal(flat_labels != -100, ds.loss_mask(0, len(flat_labels)))


def test_trainer_loss_counts_only_assistant_tokens(chat_data, smollm2_tokenizer, tmp_path):
    torch.manual_seed(0)
    init = tmp_path / "init"
    tiny_models.llama(len(smollm2_tokenizer)).save_pretrained(init)
    recipe = {"model": {"init_from": str(init)}, "optim": {"lr": 0.0, "adamw_lr": 0.0},
              "data": {"root": str(chat_data), "weights": {"chat": 1}, "seq_len": 32, "eval": "chat"},
              "train": {"out_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 4, "micro_batch_size": 4,
                        "progress": False, "tensorboard": False, "eval_batches": 1},
              "checkpoint": {"every": 0}}  # fmt: skip
    cfg = load_recipe(recipe)
    batch = build_source(cfg.data, 4, 0, 1, cfg.train.seed, 1).batch(0)  # what the run's first step reads
    model = tiny_models.llama(len(smollm2_tokenizer)).__class__.from_pretrained(init).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[:, :-1].flatten(0, 1)
    targets = batch["labels"][:, 1:].flatten()
    masked_ce = F.cross_entropy(logits, targets, ignore_index=-100).item()
    all_ce = F.cross_entropy(logits, batch["input_ids"][:, 1:].flatten()).item()
    result = train(recipe)
    assert result["loss"] == pytest.approx(masked_ce, rel=1e-4) and abs(masked_ce - all_ce) > 0.01
    with torch.no_grad():  # the held-out loss too: the mean over the val split's assistant tokens
        total = count = 0.0
        for b in iter_eval_batches(chat_data / "chat", 32, 4, max_batches=1):
            lg = model(input_ids=b["input_ids"]).logits[:, :-1].flatten(0, 1)
            total += F.cross_entropy(lg, b["labels"][:, 1:].flatten(), ignore_index=-100, reduction="sum").item()
            count += (b["labels"][:, 1:] != -100).sum().item()
    assert result["eval_loss"] == pytest.approx(total / count, rel=1e-4)


def test_chat_source_without_a_template_is_refused_before_writing(tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer.__class__.from_pretrained(smollm2_tokenizer.name_or_path)
    tok.chat_template = None
    (tmp_path / "c.jsonl").write_text(json.dumps(CHATS[0]) + "\n")
    with pytest.raises(LoopfitError, match="has no chat template: name one with --chat-template"):
        prepare([str(tmp_path / "c.jsonl")], tok, tmp_path / "data", progress=False)
    assert not (tmp_path / "data").exists()
    [(folder, manifest, _)] = prepare([str(tmp_path / "c.jsonl")], tok, tmp_path / "data", progress=False,
                                      chat_template="chatml", workers=1)
    assert manifest["chat_template"] == CHAT_TEMPLATES["chatml"]
    ds = open_dataset(folder)
    ids = ds.tokens(0, ds.num_tokens)
    assert tok.decode(ids[ds.loss_mask(0, ds.num_tokens)]) == "It is 0.<|im_end|>0, of course.<|im_end|>"
