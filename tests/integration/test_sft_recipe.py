"""The shipped `sft` recipe through the CLI, as its header says to run it (shortened): `math-chat` prepared with a
loss mask, a recurrent model finetuned with its depth sampler on and its plain baseline the same way, each
then evaluated with `--chat`."""

import json
import os
import subprocess
import sys

import tiny_models
import torch

SHORT = ["--train.steps=2", "--train.batch_size=4", "--train.micro_batch_size=2", "--data.seq_len=96",
         "--train.eval_every=0", "--train.eval_batches=1", "--checkpoint.every=0", "--train.progress=false",
         "--train.tensorboard=false", "--recurrence.mean=2", "--recurrence.backprop=1"]


def loopfit(*argv):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "loopfit.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_sft_recipe_finetunes_recurrent_and_plain_on_assistant_tokens(tmp_path, smollm2_tokenizer):
    torch.manual_seed(0)
    vocab = len(smollm2_tokenizer)
    tiny_models.recurrent(vocab).save_pretrained(tmp_path / "loop")
    tiny_models.llama(vocab).save_pretrained(tmp_path / "plain")
    for name in ("loop", "plain"):
        smollm2_tokenizer.save_pretrained(tmp_path / name)
    loopfit("prepare", "math-chat", "--tokenizer", tmp_path / "loop", "--out", tmp_path / "data", "--holdout", "0.1",
            "--limit", "40")
    manifest = json.loads((tmp_path / "data" / "math-chat" / "manifest.json").read_text())
    assert manifest["loss_mask"] and 0 < manifest["splits"]["train"]["loss_tokens"] < manifest["splits"]["train"][
        "tokens"]
    for name in ("loop", "plain"):
        out = tmp_path / "runs" / name
        loopfit("train", "sft", f"--model.init_from={tmp_path / name}", f"--data.root={tmp_path / 'data'}",
                f"--train.out_dir={out}", *SHORT)
        metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
        steps = [m for m in metrics if "loss" in m and m.get("step")]
        assert len(steps) >= 2 and all(m["loss"] > 0 for m in steps)
        if name == "loop":  # the recurrence sampler stays on: depths are drawn per step
            assert all("n" in m and m["n"] + m["k"] >= 1 for m in steps)
        assert any("eval_loss" in m for m in metrics)  # held-out loss on math-chat's assistant tokens
        loopfit("eval", out / "final", "--chat", "--tasks", "gsm8k", "--loops", "1,2", "--limit", "1",
                "--max-new-tokens", "4", "--out", tmp_path / "eval" / name)
        results = json.loads((tmp_path / "eval" / name / "results.json").read_text())
        assert results["settings"]["chat"] and {r["metric"] for r in results["rows"]} >= {"accuracy_strict"}
