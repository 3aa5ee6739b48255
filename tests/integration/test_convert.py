"""`loopfit convert` through its public entry points: real offline models, folders written, bad input."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import loopfit
from loopfit.cli import main
from loopfit.convert import plan_layers
from loopfit.loading import load_base

SENTENCES = ["The quick brown fox jumps over the lazy dog near the river bank.", "Two plus two is", "Hello"]


@pytest.fixture(scope="session")
def smollm2_base():
    return load_base("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_tokenizer):
    """A small random Llama saved as a transformers folder with a real tokenizer."""
    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(smollm2_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=6,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    LlamaForCausalLM(cfg).save_pretrained(out)
    smollm2_tokenizer.save_pretrained(out)
    return out


def run_cli(*argv, capsys):
    rc = main(["convert", *map(str, argv)])
    err = capsys.readouterr().err.strip()
    return rc, err.splitlines()[-1] if rc else err  # the error is the last line (progress bars come before)


def left_padded(tokenizer):
    return tokenizer(SENTENCES, return_tensors="pt", padding=True, padding_side="left")


@pytest.mark.real
def test_real_smollm2_identity_conversion_matches_transformers(smollm2_base, tmp_path, capsys):
    """All 30 layers kept, passthrough adapter, r = 1: the saved folder reproduces SmolLM2 (<= 1e-4)."""
    base, tok = smollm2_base
    out = tmp_path / "smol-identity"
    rc, err = run_cli("smollm2-135m", "--prelude", "0-3", "--core", "4-25", "--coda", "26-29",
                      "--adapter-init", "passthrough", "--recurrence", "1", "--out", out, capsys=capsys)
    assert rc == 0, err
    report = json.loads((out / "parity.json").read_text())
    assert report["identity_max_abs_diff"] <= 1e-4
    assert abs(report["converted_loss"] - report["base_loss"]) <= 1e-4
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, loopfit.LoopfitForCausalLM)
    batch = left_padded(AutoTokenizer.from_pretrained(out))
    with torch.no_grad():
        ref = base(**batch).logits
        got = model(**batch, num_steps=1).logits
    keep = batch.attention_mask.bool()[..., None]
    assert ((got - ref).abs() * keep).max() <= 1e-4
    card = (out / "README.md").read_text()
    assert "| core (looped, default r = 1) | 4-25 | 22 |" in card and "Parity report" in card


@pytest.mark.real
def test_real_smollm2_gguf_path_equals_cached_folder(smollm2_gguf, smollm2_base):
    """Loading the GGUF file directly (dequantized, quantization config stripped) gives the same model."""
    from_gguf, tok = load_base(smollm2_gguf)
    ids = tok(SENTENCES[0], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(from_gguf(ids).logits, smollm2_base[0](ids).logits)
    assert getattr(from_gguf.config, "quantization_config", None) is None


@pytest.mark.real
def test_real_smollm2_paper_layers_and_generation(smollm2_base, tmp_path, capsys):
    """(4,8,4) with the paper's random adapter: layers go where the paper puts them, and the folder generates."""
    out = tmp_path / "smol-484"
    rc, err = run_cli("smollm2-135m", "--layers", "4,8,4", "--out", out, capsys=capsys)
    assert rc == 0, err
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["source_layers"]["core"] == list(range(18, 26)) and cfg["source_layers"]["coda"] == [26, 27, 28, 29]
    assert cfg["adapter_init"] == "random" and cfg["mean_recurrence"] == 4
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    batch = left_padded(tok)
    g = model.generate(**batch, num_steps=2, max_new_tokens=3, do_sample=False)
    assert g.shape == (3, batch.input_ids.shape[1] + 3)


@pytest.mark.real
def test_real_qwen25_identity_parity():
    """Qwen2.5-0.5B (q/k/v bias, untied head): identity conversion within 1e-4 of transformers."""
    from loopfit.convert import LayerPlan, build_loopfit

    base, tok = load_base("qwen2.5-0.5b")
    model = build_loopfit(base, LayerPlan([0, 1], list(range(2, 22)), [22, 23], 24), adapter_init="passthrough",
                          recurrence=1)
    batch = left_padded(tok)
    with torch.no_grad():
        ref = base(**batch).logits
        got = model(**batch, num_steps=1).logits
    keep = batch.attention_mask.bool()[..., None]
    assert ((got - ref).abs() * keep).max() <= 1e-4


def test_folder_loads_without_loopfit_installed(tiny_llama_dir, tmp_path, capsys):
    """The written model package is self-contained: where loopfit cannot be imported, trust_remote_code loads the
    folder, and its forward, generate and self-speculative generate equal the installed loopfit's."""
    from loopfit.model import MODEL_FILES

    out = tmp_path / "converted"
    rc, err = run_cli(tiny_llama_dir, "--layers", "1,2,1", "--recurrence", "3", "--out", out, capsys=capsys)
    assert rc == 0, err
    assert all((out / name).is_file() for name in MODEL_FILES)
    ids = torch.tensor([[5, 9, 3, 7, 1, 8], [0, 0, 4, 6, 2, 9]])
    mask = (ids != 0).long()
    script = f"""
import sys; sys.modules["loopfit"] = None  # make loopfit unimportable
import torch
torch.set_num_threads({torch.get_num_threads()})  # this process's thread count: the same float sums, bit for bit
try:
    import loopfit
    raise SystemExit("loopfit imported")
except ImportError:
    pass
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)
assert type(m).__module__.startswith("transformers_modules"), type(m).__module__
ids, mask = torch.tensor({ids.tolist()}), torch.tensor({mask.tolist()})
greedy = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
drafted = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0, draft_steps=1)
assert torch.equal(greedy, drafted), (greedy, drafted)
torch.save({{"logits": m(torch.arange(10)[None]).logits, "greedy": greedy}}, {str(tmp_path / "remote.pt")!r})
"""
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    remote = torch.load(tmp_path / "remote.pt")
    local = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(remote["logits"], local(torch.arange(10)[None]).logits)
    expected = local.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(remote["greedy"], expected)
    assert len(set(expected[0, -8:].tolist())) > 1  # a real continuation, not a constant token


def test_random_init_keeps_shape_and_config_but_draws_new_weights(tiny_llama_dir, tmp_path, capsys):
    """`--init random`: the control for what the pretrained layers buy. Same config and tensor shapes as the
    pretrained conversion, fresh weights (std initializer_range, reproducible by --seed), a loss at chance."""
    args = [tiny_llama_dir, "--layers", "2,2,1", "--adapter-init", "passthrough"]
    folders = {}
    runs = {"pretrained": [], "random": ["--init", "random"], "random-again": ["--init", "random"],
            "random-seed1": ["--init", "random", "--seed", "1"]}
    for name, extra in runs.items():
        folders[name] = tmp_path / name
        rc, err = run_cli(*args, *extra, "--out", folders[name], capsys=capsys)
        assert rc == 0, err
    config = {k: json.loads((f / "config.json").read_text()) for k, f in folders.items()}
    assert config["random"] == config["pretrained"]
    models = {k: AutoModelForCausalLM.from_pretrained(f) for k, f in folders.items()}
    weights = {k: m.state_dict() for k, m in models.items()}
    pre, rand = weights["pretrained"], weights["random"]
    assert {k: v.shape for k, v in rand.items()} == {k: v.shape for k, v in pre.items()}
    std = config["random"]["initializer_range"]
    matrices = [k for k, v in pre.items() if v.dim() == 2 and "adapter" not in k]
    assert len(matrices) == 2 + 7 * 5  # embeddings, head, 7 projections in each of 5 blocks
    for key in matrices:
        assert not torch.equal(rand[key], pre[key]), key
        assert abs(rand[key].std().item() - std) < 0.25 * std, key
        assert torch.equal(rand[key], weights["random-again"][key]), key  # same --seed, same draw
        assert not torch.equal(rand[key], weights["random-seed1"][key]), key
    assert torch.equal(rand["model.adapter.weight"], pre["model.adapter.weight"])  # passthrough: [0 | I] in both
    report = json.loads((folders["random"] / "parity.json").read_text())
    vocab = config["random"]["vocab_size"]
    assert abs(report["converted_loss"] - math.log(vocab)) < 0.1  # chance level: nothing learnt
    assert any("random init" in note for note in report["notes"])
    assert "randomly initialised" in (folders["random"] / "README.md").read_text()


def test_layer_plans():
    plan = plan_layers(22, (4, 8, 4))  # the paper's TinyLlama choice
    assert (plan.prelude, plan.core, plan.coda, plan.dropped) == (
        [0, 1, 2, 3], list(range(10, 18)), [18, 19, 20, 21], list(range(4, 10)))
    assert plan_layers(16, (4, 6, 4)).core == list(range(6, 12))
    assert plan_layers(16, prelude=[0, 1], core=list(range(10, 14)), coda=[14, 15]).dropped == list(range(2, 10))


BAD_INPUTS = {
    "overlap": (["--prelude", "0-3", "--core", "3-4", "--coda", "5-5"], "overlap"),
    "out-of-range": (["--prelude", "0-1", "--core", "2-9", "--coda", "10-11"], "has layers 0-5"),
    "empty-core": (["--layers", "2,0,2"], "core is empty"),
    "too-many": (["--layers", "3,3,3"], "needs 9 layers"),
    "reversed": (["--core", "4-2"], "is empty"),
    "r<1": (["--layers", "1,2,1", "--recurrence", "0"], "--recurrence must be >= 1"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_layer_specs_fail_cleanly(case, tiny_llama_dir, tmp_path, capsys):
    args, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    rc, err = run_cli(tiny_llama_dir, *args, "--out", out, capsys=capsys)
    assert rc == 2 and message in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _break(kind, src, tmp_path, smollm2_tokenizer):
    tmp_path.mkdir()
    if kind == "unsupported":
        d = tmp_path / "gpt2"
        GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2)).save_pretrained(d)
        return d, "unsupported architecture 'gpt2'"
    if kind == "not-gguf":
        f = tmp_path / "model.gguf"
        f.write_text("this is not a gguf file")
        return f, "is not a GGUF file"
    if kind == "missing":
        return tmp_path / "nowhere", "does not exist"
    d = tmp_path / "broken"
    d.mkdir()
    for f in src.iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    weights = d / "model.safetensors"
    if kind == "missing-weights":
        weights.unlink()
    elif kind == "corrupt-weights":
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    elif kind == "tokenizer-mismatch":
        LlamaForCausalLM(LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4)).save_pretrained(d)
        return d, "tokenizer belongs to another model"
    return d, "cannot read the weights"


@pytest.mark.parametrize("kind", ["unsupported", "not-gguf", "missing", "missing-weights", "corrupt-weights",
                                  "tokenizer-mismatch"])
def test_bad_sources_fail_cleanly(kind, tiny_llama_dir, tmp_path, capsys, smollm2_tokenizer):
    src, message = _break(kind, tiny_llama_dir, tmp_path / "src", smollm2_tokenizer)
    out = tmp_path / "out"
    rc, err = run_cli(src, "--layers", "1,1,0", "--out", out, capsys=capsys)
    assert rc == 2 and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_existing_output_needs_force(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc, err = run_cli(tiny_llama_dir, "--layers", "1,2,1", "--out", out, capsys=capsys)
    assert rc == 2 and "--force" in err and (out / "keep.txt").read_text() == "precious"
    rc, err = run_cli(tiny_llama_dir, "--layers", "1,2,1", "--out", out, "--force", capsys=capsys)
    assert rc == 0 and (out / "config.json").exists() and not (out / "keep.txt").exists()


def test_console_script_prints_one_line_error_without_traceback(tmp_path):
    loopfit_bin = Path(sys.executable).parent / "loopfit"
    res = subprocess.run([str(loopfit_bin), "convert", str(tmp_path / "nope"), "--out", str(tmp_path / "o")],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stderr.strip().startswith("loopfit convert: error:") and "Traceback" not in res.stderr
