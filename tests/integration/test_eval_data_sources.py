"""`loopfit eval --data` reads any source `loopfit prepare` reads (a conversation's loss counts its assistant
tokens only, checked against a loss computed here by hand), and `--chat` renders GSM8K's prompt with the chat
template."""

import gzip
import json
import os
import subprocess
import sys

import pytest
import tiny_models
import torch
import torch.nn.functional as F

CHATS = [{"messages": [{"role": "user", "content": f"Count to {n}."},
                       {"role": "assistant", "content": " ".join(str(i) for i in range(1, n + 1))}]}
         for n in range(3, 15)]  # fmt: skip


def loopfit(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "loopfit.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def fx(tmp_path_factory, smollm2_tokenizer):
    w = tmp_path_factory.mktemp("eval-data")
    torch.manual_seed(0)
    tiny_models.llama(len(smollm2_tokenizer)).save_pretrained(w / "plain")
    smollm2_tokenizer.save_pretrained(w / "plain")
    with gzip.open(w / "chats.jsonl.gz", "wt") as f:
        f.write("".join(json.dumps(c) + "\n" for c in CHATS))
    (w / "notes.csv").write_text("id,body\n" + "".join(f'{i},"Note {i}: the mill wheel turned {i} times."\n'
                                                       for i in range(40)))
    return w


def loss_by_hand(model_dir, ids, keep, seq_len):
    """Mean next-token cross-entropy over the kept targets of `ids` cut into rows of seq_len."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    rows = len(ids) // seq_len
    x = torch.tensor(ids[: rows * seq_len]).view(rows, seq_len)
    labels = torch.where(torch.tensor(keep[: rows * seq_len]).view(rows, seq_len), x, -100)
    with torch.no_grad():
        logits = model(input_ids=x).logits[:, :-1]
    return F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100).item()


def eval_loss(fx, out, data, seq_len=32):
    proc = loopfit("eval", fx / "plain", "--tasks", "loss", "--loops", "1", "--data", data, "--seq-len", seq_len,
                   "--max-tokens", 4096, "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    return next(r["value"] for r in rows if r["metric"] == "loss")


def test_loss_on_a_chat_file_counts_assistant_tokens_only(fx, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    ids, keep = [], []
    for chat in CHATS:
        prompt = tok.apply_chat_template(chat["messages"][:1], tokenize=False, add_generation_prompt=True)
        answer = chat["messages"][1]["content"] + "<|im_end|>"
        p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        a_ids = tok(answer, add_special_tokens=False)["input_ids"]
        newline = tok("\n", add_special_tokens=False)["input_ids"]
        assert p_ids + a_ids + newline == tok(tok.apply_chat_template(chat["messages"], tokenize=False),
                                              add_special_tokens=False)["input_ids"]
        ids += p_ids + a_ids + newline + [end]
        keep += [False] * len(p_ids) + [True] * len(a_ids) + [False] * (len(newline) + 1)
    got = eval_loss(fx, tmp_path / "chat", fx / "chats.jsonl.gz")
    assert got == pytest.approx(loss_by_hand(fx / "plain", ids, keep, 32), rel=1e-4)
    assert got != pytest.approx(loss_by_hand(fx / "plain", ids, [True] * len(ids), 32), rel=1e-3)


def test_loss_on_a_csv_field(fx, tmp_path, smollm2_tokenizer):
    tok = smollm2_tokenizer
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    ids = []
    for i in range(40):
        ids += tok(f"Note {i}: the mill wheel turned {i} times.", add_special_tokens=False)["input_ids"] + [end]
    got = eval_loss(fx, tmp_path / "csv", f"{fx / 'notes.csv'}:body")
    assert got == pytest.approx(loss_by_hand(fx / "plain", ids, [True] * len(ids), 32), rel=1e-4)


def test_bad_data_source_is_refused_before_the_model_loads(fx, tmp_path):
    proc = loopfit("eval", fx / "plain", "--tasks", "loss", "--data", f"{fx / 'notes.csv'}:text", "--out",
                   tmp_path / "bad")
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert "--data: " in lines[0] and "has no field 'text' (fields: body, id)" in lines[0]
    assert not (tmp_path / "bad").exists()


def test_chat_prompts_for_gsm8k(fx, tmp_path, smollm2_tokenizer):
    from loopfit.eval.accuracy import chat_prompts
    from loopfit.eval.prompts import GSM8K_EXEMPLARS

    [prompt], stop = chat_prompts(smollm2_tokenizer, "gsm8k", ["How many legs do 3 cats have?"])
    assert prompt.startswith("<|im_start|>system\n") and prompt.endswith(
        "<|im_start|>user\nHow many legs do 3 cats have?<|im_end|>\n<|im_start|>assistant\n")
    assert prompt.count("<|im_start|>assistant\n") == len(GSM8K_EXEMPLARS) + 1
    assert f"<|im_start|>assistant\n{GSM8K_EXEMPLARS[0][1]}<|im_end|>" in prompt and "\n\n" not in stop
    proc = loopfit("eval", fx / "plain", "--tasks", "gsm8k", "--chat", "--limit", "2", "--max-new-tokens", "4",
                   "--out", tmp_path / "gsm")
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gsm" / "results.json").read_text())
    assert results["settings"]["chat"] is True
    assert {r["metric"] for r in results["rows"]} == {"accuracy_strict", "accuracy_flexible"}
