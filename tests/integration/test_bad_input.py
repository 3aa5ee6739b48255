"""Every bad input gets one line: through the CLI (a subprocess, as a user runs it), each class of bad input is
refused with exit code 2, one stderr line naming the problem and the fix, no traceback, and nothing written.

Most refusals come before any model loads, so a model folder with truncated weights doubles as a witness: if
the refusal names the argument rather than the weights, it came first."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiny_models
import torch

ROOT = Path(__file__).resolve().parents[2]


def loopfit(*argv, env=None, cwd=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "loopfit.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


def one_line(proc, *words, progress=None):
    """The refusal: rc 2, exactly one stderr line, `loopfit VERB: error: ...` holding `words` (besides the lines
    of a `progress` bar, for refusals that can only come after reading the input)."""
    lines = [line for line in proc.stderr.splitlines() if line.strip() and not (progress and line.startswith(progress))]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(lines) == 1 and re.match(r"loopfit \w+: error: ", lines[0]), proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def fx(tmp_path_factory, smollm2_tokenizer, smollm2_gguf):
    """Tiny loopfit and plain folders (SmolLM2's tokenizer), truncated copies, a cut GGUF, Latin-1 text."""
    w = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    vocab = len(smollm2_tokenizer)
    tiny_models.recurrent(vocab, hidden_size=32, intermediate_size=64).save_pretrained(w / "loop")
    tiny_models.llama(vocab, num_hidden_layers=4, hidden_size=32, intermediate_size=64).save_pretrained(w / "plain")
    for d in ("loop", "plain"):
        smollm2_tokenizer.save_pretrained(w / d)
        shutil.copytree(w / d, w / f"{d}-cut")
        st = w / f"{d}-cut" / "model.safetensors"
        st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with open(smollm2_gguf, "rb") as f:
        (w / "cut.gguf").write_bytes(f.read(1 << 16))  # cut inside the metadata: struct.error inside gguf
    (w / "latin1.txt").write_bytes("Caf\xe9 cr\xe8me br\xfbl\xe9e.\n\n".encode("latin-1") * 50)
    (w / "text.txt").write_text("The quick brown fox jumps over the lazy dog. " * 40)
    (w / "a-file").write_text("not a folder\n")
    (w / "full").mkdir()
    (w / "full/keep.txt").write_text("the user's file\n")
    return w


def nothing_written(*paths):
    for p in paths:
        assert not Path(p).exists(), p


# ---------------------------------------------------------------------------------- unwritable output folders


def unwritable_cases(w):
    recipe = w / "recipe.json"
    recipe.write_text(json.dumps({"model": {"init_from": str(w / "loop-cut")}, "data": {"synthetic": "pattern"}}))
    return {  # the models given have truncated weights: the refusal must name the folder, so it came first
        "analyze": lambda out: ["analyze", w / "plain-cut", "--out", out],
        "convert": lambda out: ["convert", w / "plain-cut", "--layers", "1,2,1", "--out", out],
        "prepare": lambda out: ["prepare", w / "text.txt", "--tokenizer", w / "loop", "--out", out],
        "train": lambda out: ["train", recipe, f"--train.out_dir={out}"],
        "eval": lambda out: ["eval", w / "loop-cut", "--out", out],
        "compare": lambda out: ["compare", w / "full", "--out", out],
        "quickstart": lambda out: ["quickstart", "--out", out],
    }


@pytest.mark.parametrize("verb", ["analyze", "convert", "prepare", "train", "eval", "compare", "quickstart"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(fx, verb):
    argv = unwritable_cases(fx)[verb]
    one_line(loopfit(*argv("/proc/loopfit-x")), "/proc/loopfit-x", "you can write to")
    one_line(loopfit(*argv(fx / "a-file" / "sub")), "a-file is a file, not a folder")


# ---------------------------------------------------------------------------------- corrupt inputs


@pytest.mark.parametrize("verb", ["convert", "eval", "analyze"])
def test_a_truncated_gguf_is_one_line(fx, verb, tmp_path):
    extra = ["--out", tmp_path / "out"] if verb != "generate" else []
    one_line(loopfit(verb, fx / "cut.gguf", *extra), "cut.gguf", "truncated or corrupt")
    nothing_written(tmp_path / "out")


def test_truncated_safetensors_in_train_eval_and_generate(fx, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": {"init_from": str(fx / "loop-cut")}, "data": {"synthetic": "pattern"},
                                  "train": {"out_dir": str(tmp_path / "run")}}))
    one_line(loopfit("train", recipe), "model.init_from", "loop-cut", "model.safetensors is complete")
    one_line(loopfit("eval", fx / "loop-cut", "--out", tmp_path / "ev"), "loop-cut", "model.safetensors is complete")
    one_line(loopfit("generate", fx / "loop-cut", "--prompt", "hi"), "loop-cut", "model.safetensors is complete")
    nothing_written(tmp_path / "run", tmp_path / "ev")


def test_non_utf8_text_is_one_line(fx, tmp_path):
    one_line(loopfit("eval", fx / "loop", "--data", fx / "latin1.txt", "--seq-len", "8", "--out", tmp_path / "ev"),
             "--data", "not UTF-8", "iconv")
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("caf\xe9\n".encode("latin-1"))
    one_line(loopfit("generate", fx / "loop", "--prompt-file", prompts), "--prompt-file", "not UTF-8")
    nothing_written(tmp_path / "ev")


# ---------------------------------------------------------------------------------- generate's own arguments


@pytest.mark.parametrize("model, args, words", [
    ("loop-cut", ["--prompt", "hi", "--max-new-tokens", "-3"], ["--max-new-tokens must be >= 1"]),
    ("loop-cut", ["--prompt", ""], ["a prompt is empty"]),
    ("plain-cut", ["--prompt", ""], ["a prompt is empty"]),
    ("loop-cut", ["--prompt", "hi", "--temperature", "-1"], ["--temperature must be >= 0"]),
    ("loop-cut", ["--prompt", "hi", "--temperature", "0.7", "--top-p", "0"], ["--top-p must be in (0, 1]"]),
    ("loop-cut", ["--prompt", "hi", "--exit", "kl:abc"], ["must look like kl:5e-4"]),
    ("loop-cut", ["--prompt", "hi", "--loops", "0"], ["--loops must be >= 1"]),
])
def test_generate_arguments_are_checked_before_the_model_loads(fx, model, args, words):
    one_line(loopfit("generate", fx / model, *args), *words)


def test_generate_conflicts_chat_templates_and_long_prompts_are_refused_before_the_weights_load(fx, tmp_path):
    """The weights are truncated: a refusal that names the prompt or flag came before they loaded."""
    one_line(loopfit("generate", fx / "loop-cut", "--prompt", "hi", "--draft-loops", "2", "--exit", "kl:5e-4"),
             "--draft-loops does not combine with --exit")
    one_line(loopfit("generate", fx / "loop-cut", "--prompt", "hi", "--draft-loops", "4", "--loops", "4"),
             "--draft-loops 4 must be below --loops 4")
    long = tmp_path / "long.txt"
    long.write_text("short prompt\n" + "word " * 200_000 + "\n")  # one 1 MB line
    one_line(loopfit("generate", fx / "loop-cut", "--prompt-file", long), "prompt 2 has", "does not fit the "
             "model's context of 8192 tokens")
    cut = tmp_path / "cut"
    shutil.copytree(fx / "loop-cut", cut)
    config = json.loads((cut / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ ().__class__.__base__.__subclasses__() }}"  # the sandbox refuses it
    (cut / "tokenizer_config.json").write_text(json.dumps(config))
    (cut / "chat_template.jinja").unlink(missing_ok=True)
    one_line(loopfit("generate", cut, "--prompt", "hi", "--chat"), "--chat: the tokenizer's chat template cannot be "
             "rendered (SecurityError: access to attribute '__class__'", "drop --chat")


def test_generate_refuses_an_empty_prompt_from_python_too(fx):
    from loopfit import LoopfitError
    from loopfit.generate import generate
    from loopfit.loading import load

    model, tok = load(fx / "plain")
    with pytest.raises(LoopfitError, match="a prompt is empty"):
        generate(model, tok, [""], max_new_tokens=2)


# ---------------------------------------------------------------------------------- messages that blame the right thing


def test_refusals_name_the_argument_at_fault_before_any_work(fx, tmp_path):
    one_line(loopfit("convert", fx / "plain-cut", "--layers=-1,2,2", "--out", tmp_path / "c"), "negative count")
    one_line(loopfit("analyze", fx / "plain-cut", "--layers", "2,0,2", "--out", tmp_path / "a"), "the core is empty")
    one_line(loopfit("analyze", fx / "plain-cut", "--layers", "3,3,3", "--out", tmp_path / "a"), "the model has 4")
    one_line(loopfit("prepare", fx / "text.txt", "--tokenizer", fx / "loop", "--limit", "-5", "--out", tmp_path / "p"),
             "--limit -5 must be a positive number")
    nothing_written(tmp_path / "c", tmp_path / "a", tmp_path / "p")


# ---------------------------------------------------------------------------------- non-empty or half-written --out


def test_eval_and_compare_refuse_a_non_empty_out_unless_forced(fx, tmp_path):
    one_line(loopfit("eval", fx / "loop", "--data", fx / "text.txt", "--seq-len", "8", "--out", fx / "full"),
             "is not empty", "--force")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 / s, "tokens": 64 * s,
                                                           "flops": 1e9 * s}) + "\n" for s in (1, 2, 3)))
    one_line(loopfit("compare", run, "--out", fx / "full"), "is not empty", "--force")
    assert sorted(p.name for p in (fx / "full").iterdir()) == ["keep.txt"]
    proc = loopfit("compare", run, "--out", fx / "full", "--force")
    assert proc.returncode == 0, proc.stderr
    assert (fx / "full" / "report.md").exists() and (fx / "full" / "keep.txt").exists()
    (fx / "full" / "report.md").unlink()
    (fx / "full" / "flops.png").unlink()


def test_a_failed_prepare_leaves_no_empty_out(fx, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    one_line(loopfit("prepare", empty, "--tokenizer", fx / "loop", "--workers", "1", "--out", tmp_path / "data"),
             "has no documents", progress="prepare empty:")
    nothing_written(tmp_path / "data")


# ---------------------------------------------------------------------------------- versions


def test_a_transformers_older_than_supported_is_one_line(tmp_path):
    """An installed transformers whose metadata says 4.57.0 (a dist-info ahead of the real one on the path)."""
    site = tmp_path / "site"
    info = site / "transformers-4.57.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 4.57.0\n")
    env = {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}
    one_line(loopfit("convert", "smollm2-135m", "--out", tmp_path / "x", env=env),
             "transformers 4.57.0 is older than loopfit supports (>= 5.16.1)", "pip install -U")
    nothing_written(tmp_path / "x")


def test_min_transformers_matches_pyproject():
    from loopfit import MIN_TRANSFORMERS

    assert f'"transformers>={MIN_TRANSFORMERS},' in (ROOT / "pyproject.toml").read_text()


def test_version_matches_pyproject_and_the_changelog():
    from loopfit import __version__

    assert f'\nversion = "{__version__}"\n' in (ROOT / "pyproject.toml").read_text()
    assert f"## {__version__}" in (ROOT / "CHANGELOG.md").read_text()


def test_convert_records_its_version_and_a_newer_folder_is_refused(fx, tmp_path):
    from loopfit import __version__

    out = tmp_path / "conv"
    proc = loopfit("convert", fx / "plain", "--layers", "1,2,1", "--no-parity", "--out", out)
    assert proc.returncode == 0, proc.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["loopfit_version"] == __version__
    config["loopfit_version"] = "99.0.0"
    (out / "config.json").write_text(json.dumps(config))
    fix = "newer than the installed loopfit"
    one_line(loopfit("eval", out, "--out", tmp_path / "ev"), "loopfit 99.0.0", fix, "pip install -U loopfit")
    one_line(loopfit("generate", out, "--prompt", "hi"), fix)
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": {"init_from": str(out)}, "data": {"synthetic": "pattern"},
                                  "train": {"out_dir": str(tmp_path / "run")}}))
    one_line(loopfit("train", recipe), fix)
    nothing_written(tmp_path / "ev", tmp_path / "run")


def test_train_help_lists_the_recipe_keys_and_a_bad_override_is_one_line(tmp_path):
    help_text = loopfit("train", "--help").stdout
    assert "recurrence: how many loops" in help_text and "  optim.name = 'muon'" in help_text
    assert "[muon | adamw]" in help_text and "data.synthetic = unset" in help_text
    one_line(loopfit("train", "quickstart", "--schedule.decay_shape=sqrt"), "schedule.decay_shape",
             "choose one of linear, cosine, 1-sqrt")
    one_line(loopfit("train", "quickstart", "--train.steps=ten"), "train.steps", "expects int")
    one_line(loopfit("train", "quickstart", "--data.synthetic=random"), "data.synthetic and data.root",
             "remove the other")


# ---------------------------------------------------------------------------------- recipes and training data


def test_bad_optimizer_values_tokens_and_recipes_are_one_line_before_the_model_loads(fx, tmp_path):
    """The model is the truncated folder: a refusal that names the value, not the weights, came first."""
    import numpy as np

    np.save(tmp_path / "negative.npy", np.array([5, 7, -1, 9] * 100, dtype=np.int64))
    np.save(tmp_path / "past-vocab.npy", np.array([5, 7, 300, 9] * 100, dtype=np.int64))
    np.save(tmp_path / "floats.npy", np.ones(400, dtype=np.float32))
    torch.save({"ids": torch.arange(400)}, tmp_path / "mapping.pt")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"model": {"init_from": str(fx / "loop-cut")}, "data": {"synthetic": "pattern"},
                                  "train": {"out_dir": str(tmp_path / "run")}}))
    for override, words in [
        ("--optim.lr=-1e-3", ["optim.lr is -0.001", "finite number >= 0"]),
        ("--optim.adamw_lr=.nan", ["optim.adamw_lr is nan", "finite number >= 0"]),
        ("--optim.betas=[0.9,1.0]", ["optim.betas is [0.9, 1.0]", "[0, 1)"]),
        ("--optim.betas=[-0.1,0.9]", ["optim.betas", "[0, 1)"]),
    ]:
        one_line(loopfit("train", recipe, override), *words)
    data = ["--data.synthetic=null", "--data.seq_len=8"]
    one_line(loopfit("train", recipe, *data, f"--data.tokens={tmp_path / 'negative.npy'}"),
             "negative.npy holds negative token ids (down to -1)")
    one_line(loopfit("train", recipe, *data, f"--data.tokens={tmp_path / 'past-vocab.npy'}", "--data.vocab_size=256"),
             "past-vocab.npy holds token id 300, past data.vocab_size 256")
    one_line(loopfit("train", recipe, *data, f"--data.tokens={tmp_path / 'floats.npy'}"),
             "floats.npy holds an array of float32, not integer token ids")
    one_line(loopfit("train", recipe, *data, f"--data.tokens={tmp_path / 'mapping.pt'}"),
             "mapping.pt holds a dict, not integer token ids")
    dup = tmp_path / "dup.yaml"
    dup.write_text(f"model:\n  init_from: {fx / 'loop-cut'}\ntrain:\n  steps: 3\n  steps: 5\n")
    one_line(loopfit("train", dup), "dup.yaml is not valid YAML: key 'steps' is given twice (line 5)")
    nothing_written(tmp_path / "run")


def test_resuming_a_checkpoint_of_another_model_is_one_line(fx, tmp_path):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({
        "model": {"init_from": str(fx / "plain")}, "data": {"synthetic": "pattern", "seq_len": 8},
        "train": {"out_dir": str(tmp_path / "run"), "steps": 1, "batch_size": 2, "micro_batch_size": 2,
                  "progress": False, "tensorboard": False}}))
    assert loopfit("train", recipe).returncode == 0
    ckpt = tmp_path / "run/checkpoints/step-00000001"
    one_line(loopfit("train", recipe, f"--model.init_from={fx / 'loop'}", "--train.steps=2", "--resume"),
             f"checkpoint {ckpt} was made for another model than model.init_from",
             f"it was trained from {fx / 'plain'}", "resume with the recipe of that run", progress="Loading weights")


def test_new_eval_and_export_flags_refuse_bad_values_in_one_line(fx, tmp_path):
    one_line(loopfit("eval", fx / "loop-cut", "--log-to", tmp_path / "no-run", "--out", tmp_path / "ev"),
             "--log-to", "is not a training run (no readable recipe.yaml)")
    one_line(loopfit("eval", fx / "loop-cut", "--tasks", "lm:gsm8k_loopfit", "--include-path", tmp_path / "nowhere",
                     "--out", tmp_path / "ev"), "--include-path", "is not a folder")
    one_line(loopfit("export", fx / "loop", "--out", tmp_path / "hf"), "is a loopfit (recurrent) model",
             "trust_remote_code=True")
    nothing_written(tmp_path / "ev", tmp_path / "hf")
