"""The real lm-evaluation-harness on loopfit's offline GSM8K tasks: num_steps reaches the model, the prompts
equal loopfit's own, and the `python -m loopfit.eval.harness` CLI runs a loopfit folder."""

import json
import os
import random
import subprocess
import sys

import lm_eval
import pytest
import tiny_models
import torch

from loopfit.eval.harness import LoopfitLM, run_tasks, task_manager
from loopfit.eval.prompts import gsm8k_prompt


@pytest.fixture(scope="module")
def tiny(smollm2_tokenizer, tmp_path_factory):
    torch.manual_seed(0)
    tok = smollm2_tokenizer
    model = tiny_models.recurrent(len(tok), eos_token_id=tok.eos_token_id)
    folder = tmp_path_factory.mktemp("tiny-lmeval")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model.eval(), tok, folder


def core_visits(model):
    calls = []
    handle = model.model.core[0].register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_num_steps_reaches_the_model_and_prompts_match(tiny):
    model, tok, _ = tiny
    lm = LoopfitLM(pretrained=model, tokenizer=tok, batch_size=1, num_steps=3)
    calls, handle = core_visits(model)
    try:
        out = lm_eval.simple_evaluate(model=lm, tasks=["gsm8k_loopfit", "gsm8k_loopfit_1shot"], limit=2,
                                      task_manager=task_manager(), gen_kwargs="max_gen_toks=3", log_samples=True)
    finally:
        handle.remove()
    assert len(calls) > 0 and len(calls) % 3 == 0  # every forward ran exactly 3 loops
    for task, style in (("gsm8k_loopfit", "8shot"), ("gsm8k_loopfit_1shot", "1shot")):
        samples = out["samples"][task]  # one entry per (document, filter): strict-match and flexible-extract
        assert sorted({s["doc_id"] for s in samples}) == [0, 1]
        for s in samples:
            assert s["arguments"][0][0] == gsm8k_prompt(s["doc"]["question"], style)
        assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(out["results"][task])


def test_run_tasks_gives_rows_per_r(tiny):
    model, tok, _ = tiny
    rows, raw = run_tasks(model, tok, ["gsm8k_loopfit_1shot"], [1, 2], limit=1, max_gen_toks=2)
    assert sorted(raw) == [1, 2]
    assert {(r["loops"], r["metric"]) for r in rows} >= {(1, "exact_match_strict-match"),
                                                         (2, "exact_match_flexible-extract")}
    assert all(r["task"] == "lm:gsm8k_loopfit_1shot" for r in rows)


def test_harness_cli_runs_a_loopfit_folder(tiny, tmp_path):
    _, _, folder = tiny
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "loopfit.eval.harness", "--model", "loopfit", "--model_args",
           f"pretrained={folder},num_steps=2", "--tasks", "gsm8k_loopfit,my_qa", "--limit", "1", "--device", "cpu",
           "--gen_kwargs", "max_gen_toks=2", "--output_path", str(tmp_path / "out"),
           "--include-path", str(tmp_path / "tasks")]  # the user's tasks beside loopfit's
    _user_tasks(tmp_path / "tasks")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "gsm8k_loopfit" in proc.stdout and "'num_steps': 2" in proc.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and {"gsm8k_loopfit", "my_qa"} <= set(json.loads(results[0].read_text())["results"])


def test_metric_rows_keep_metrics_only():
    """lm-eval's alias, stderr and sample count are not metrics: they get no row (nor a plot panel)."""
    from loopfit.eval.harness import metric_rows

    results = {"gsm8k_loopfit": {"alias": "gsm8k_loopfit", "exact_match,strict-match": 0.5,
                                 "exact_match_stderr,strict-match": 0.1, "sample_len": 2, "acc,none": 0.25}}
    assert metric_rows(results, 4, 2) == [
        {"task": "lm:gsm8k_loopfit", "loops": 4, "metric": "exact_match_strict-match", "value": 0.5, "n": 2,
         "stderr": 0.1},
        {"task": "lm:gsm8k_loopfit", "loops": 4, "metric": "acc", "value": 0.25, "n": 2}]
    # lm-eval's own sample count wins over the --limit given
    (row, _) = metric_rows(results, 4, 2, counts={"gsm8k_loopfit": {"original": 1319, "effective": 3}})
    assert row["n"] == 3


def _user_tasks(folder):
    """A user's own lm-eval task on a local JSONL file, and one whose data lives on the Hub."""
    folder.mkdir()
    (folder / "qa.jsonl").write_text("".join(json.dumps({"question": f"What is {i} + {i}?", "answer": str(2 * i)})
                                             + "\n" for i in range(4)))
    (folder / "my_qa.yaml").write_text(
        "task: my_qa\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'qa.jsonl'}\n"
        "test_split: test\noutput_type: generate_until\ndoc_to_text: \"Q: {{question}}\\nA:\"\n"
        "doc_to_target: \"{{answer}}\"\ngeneration_kwargs:\n  until: [\"\\n\"]\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    (folder / "hub_qa.yaml").write_text((folder / "my_qa.yaml").read_text().replace("task: my_qa", "task: hub_qa")
                                        .replace("dataset_path: json", "dataset_path: loopfit-tests/no-such-data")
                                        .split("dataset_kwargs")[0] + "test_split: test\noutput_type: "
                                        "generate_until\ndoc_to_text: \"{{question}}\"\ndoc_to_target: \"x\"\n")


def test_eval_finds_user_task_yamls_and_keeps_stderr_counts_and_samples(tiny, tmp_path):
    _, _, folder = tiny
    _user_tasks(tmp_path / "tasks")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    out = tmp_path / "ev"
    cmd = [sys.executable, "-m", "loopfit.cli", "eval", str(folder), "--tasks", "lm:my_qa", "--include-path",
           str(tmp_path / "tasks"), "--loops", "1,2", "--limit", "3", "--max-new-tokens", "2", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {(r["loops"], r["metric"], r["n"]) for r in rows} == {(1, "exact_match", 3), (2, "exact_match", 3)}
    assert all(isinstance(r["stderr"], float) for r in rows)
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert sorted((s["loops"], s["doc_id"]) for s in samples) == [(r, d) for r in (1, 2) for d in range(3)]
    assert all(s["task"] == "lm:my_qa" and "exact_match" in s for s in samples)
    assert (out / "sweep.png").stat().st_size > 0

    def refused(*tasks):
        proc = subprocess.run([*cmd[:6], ",".join(tasks), *cmd[7:-1], str(tmp_path / "ev2")], capture_output=True,
                              text=True, env=env, timeout=600)
        lines = [x for x in proc.stderr.splitlines() if "error:" in x]
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and len(lines) == 1, proc.stderr[-3000:]
        return lines[0]

    line = refused("lm:no_such_task")
    assert "unknown lm-eval task 'no_such_task': offline tasks here are gsm8k_loopfit, gsm8k_loopfit_1shot" in line
    assert "--include-path DIR" in line
    line = refused("lm:hub_qa")
    assert "lm-eval could not load the data of hub_qa (" in line and "--include-path DIR" in line


class ScriptedLM(lm_eval.api.model.LM):
    """Answers each question with a fixed completion: the two scorers, not a model, are under test."""

    def __init__(self, completions):
        super().__init__()
        self.completions = completions  # question -> completion

    def generate_until(self, requests):
        return [self.completions[req.doc["question"]] for req in requests]

    def loglikelihood(self, requests):
        raise NotImplementedError

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError


def scripted_completion(i, reference):
    """Completions that trip scorers up, cycled over the items: stated answers in every form the strict scorer
    takes, wrong stated answers with the right last number, and no answer at all."""
    n = reference
    forms = [
        f"3 + 4 = 7. The answer is {n}.",
        f"So the total is {n}.\nThe final answer is {n}.",  # accepted by extract.py, once not by the YAML regex
        f"Working it out.\n#### {n}",
        f"The answer is: ${n}.",
        f"The answer is {n}1. Check: {n}",  # strict wrong, flexible right
        f"The answer is {n}. Then 3 more",  # strict right, flexible wrong
        f"{n} apples, so I cannot tell.",  # no stated answer: strict wrong
        "I cannot tell.",
    ]
    return forms[i % len(forms)]


def test_loopfit_and_lm_eval_gsm8k_score_completions_alike():
    """`loopfit eval --tasks gsm8k` and `--tasks lm:gsm8k_loopfit` (and their 1-shot forms) give the same strict
    and flexible score on every one of the same completions: item by item, so a scorer that disagrees on one
    form fails."""
    from loopfit.eval import accuracy, items

    test = items.gsm8k_test()
    picked = sorted(random.Random(0).sample(range(len(test)), 48))
    chosen = [test[i] for i in picked]
    completions = [scripted_completion(j, it["answer"]) for j, it in enumerate(chosen)]
    lm = ScriptedLM({it["question"]: c for it, c in zip(chosen, completions)})
    pairs = {"gsm8k": "gsm8k_loopfit", "gsm8k_1shot": "gsm8k_loopfit_1shot"}
    out = lm_eval.simple_evaluate(model=lm, tasks=list(pairs.values()), samples={t: picked for t in pairs.values()},
                                  task_manager=task_manager(), log_samples=True)
    for task, lm_task in pairs.items():
        rows, samples = accuracy.score(task, 1, chosen, completions)
        theirs = {(s["doc_id"], s["filter"]): s["exact_match"] for s in out["samples"][lm_task]}
        for i, ours in zip(picked, samples):
            assert ((theirs[i, "strict-match"], theirs[i, "flexible-extract"])
                    == (ours["strict"], ours["flexible"])), ours
        ours = {r["metric"]: r["value"] for r in rows}
        results = out["results"][lm_task]
        assert results["exact_match,strict-match"] == pytest.approx(ours["accuracy_strict"], abs=1e-12)
        assert results["exact_match,flexible-extract"] == pytest.approx(ours["accuracy_flexible"], abs=1e-12)
        assert 0 < ours["accuracy_strict"] < 1 and 0 < ours["accuracy_flexible"] < 1  # the forms split both ways
