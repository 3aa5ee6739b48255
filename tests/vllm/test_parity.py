"""vLLM's loopfit model against loopfit's own decoding: greedy tokens equal `generate(num_steps=r)` and prompt
logprobs equal the reference forward's, on tiny random models of every family and on the real SmolLM2.

Tolerances (fp32 on both sides; they differ only in matmul kernels and summation order):
- tokens: equal, except that at a step where the reference's two best logits are within TIE of each other the
  engines may pick different tokens; the sequences are compared up to that step.
- prompt logprobs: vLLM's are as close to the exact values (loopfit's model in fp64) as loopfit's own fp32 ones,
  within a factor ROUNDING_FACTOR, or within LOGPROB_FLOOR (REAL_LOGPROB_FLOOR on SmolLM2). Deep loops amplify
  rounding: at r = 16 loopfit's fp32 logprobs of the tiny models stray up to ~6e-3 from fp64, so a fixed tolerance
  would be either loose at r = 1 or fail at r = 16 on rounding alone. vLLM's CPU kernels (its own GEMM and paged
  attention) sum differently from torch's, more so over SmolLM2's longer rows: there at r = 16 vLLM strays ~6e-4
  from fp64 where loopfit's fp32 strays ~1e-4."""

import copy
import json

import pytest
import tiny_models
import torch
from vllm import SamplingParams
from vllm.inputs import TokensPrompt

from loopfit import LoopfitForCausalLM

TIE = 1e-3
LOGPROB_FLOOR = 1e-4
REAL_LOGPROB_FLOOR = 1e-3
ROUNDING_FACTOR = 3
NEW_TOKENS = 16
# longer than the tiny sliding windows (4 and 5 tokens), so prefill and decode both cross them
PROMPTS = [[5, 17, 99, 3], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [200, 13, 77, 42, 42, 8, 150, 61, 9, 250, 3, 4, 91,
                                                                   17, 33, 120, 6, 7, 200, 18]]
LLAMA3_ROPE = {"full_attention": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                  "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 16}}
FAMILIES = {**tiny_models.FAMILIES, "llama3-rope": dict(rope=LLAMA3_ROPE)}


def tiny_folder(family, path, seed=0, **overrides):
    """A tiny random loopfit model of `family`, saved (head_dim 32: the smallest vLLM's CPU attention takes;
    weights drawn wider than the default so that greedy tokens vary)."""
    torch.manual_seed(seed)
    model = tiny_models.recurrent(**{**FAMILIES[family], "head_dim": 32, "initializer_range": 0.2, **overrides})
    model.save_pretrained(path)
    return model.eval(), path


def reference(model, prompt, r, new_tokens=NEW_TOKENS):
    """loopfit's greedy tokens and each step's logits."""
    out = model.generate(torch.tensor([prompt]), num_steps=r, max_new_tokens=new_tokens, do_sample=False,
                         return_dict_in_generate=True, output_logits=True)
    return out.sequences[0, len(prompt):].tolist(), [x[0].float() for x in out.logits]


def reference_prompt_logprobs(model, prompt, r):
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompt]), num_steps=r).logits[0].float(), -1)
    return torch.tensor([logp[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)])


def assert_same_greedy(ref_tokens, ref_logits, got_tokens):
    """Equal tokens, or equal up to a step where the reference's top two logits are within TIE."""
    for i, (want, got) in enumerate(zip(ref_tokens, got_tokens)):
        if want != got:
            top = ref_logits[i].topk(2).values
            assert top[0] - top[1] < TIE, f"token {i}: vLLM {got}, loopfit {want}, reference margin {top[0] - top[1]}"
            return
    assert len(got_tokens) == len(ref_tokens)


def vllm_greedy(llm, prompts, new_tokens=NEW_TOKENS):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True, detokenize=False,
                            prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outs]
    logprobs = [torch.tensor([d[t].logprob for d, t in zip(o.prompt_logprobs[1:], p[1:])])
                for o, p in zip(outs, prompts)]
    return tokens, logprobs


def check_parity(model, llm, prompts, r, floor=LOGPROB_FLOOR):
    tokens, logprobs = vllm_greedy(llm, prompts)
    exact = copy.deepcopy(model).double()
    for prompt, got, got_logprobs in zip(prompts, tokens, logprobs):
        assert_same_greedy(*reference(model, prompt, r), got)
        want = reference_prompt_logprobs(exact, prompt, r)
        rounding = (reference_prompt_logprobs(model, prompt, r) - want).abs().max().item()
        err = (got_logprobs - want).abs().max().item()
        assert err <= max(floor, ROUNDING_FACTOR * rounding), \
            f"prompt logprobs {err} from fp64, loopfit's fp32 ones {rounding}"


@pytest.mark.parametrize("r", [1, 4, 16])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_greedy_tokens_and_prompt_logprobs_equal_loopfit(family, r, tmp_path, make_llm):
    model, folder = tiny_folder(family, tmp_path / family)
    llm = make_llm(folder, skip_tokenizer_init=True, hf_overrides={"mean_recurrence": r})
    check_parity(model, llm, PROMPTS, r)


@pytest.mark.parametrize("state_init", ["zeros", "embed"])
def test_r_defaults_to_the_folders_mean_recurrence_and_other_state_inits(state_init, tmp_path, make_llm):
    model, folder = tiny_folder("qwen3", tmp_path / "m", mean_recurrence=3, state_init=state_init)
    llm = make_llm(folder, skip_tokenizer_init=True)
    check_parity(model, llm, PROMPTS, 3)


def test_a_ring_cache_folder_is_served_with_the_exact_cache_and_says_so(tmp_path, make_llm, caplog):
    model, folder = tiny_folder("llama", tmp_path / "m", cache_policy="ring", cache_ring_size=1)
    with caplog.at_level("WARNING", logger="loopfit.serve"):
        llm = make_llm(folder, skip_tokenizer_init=True)
    notices = [r.getMessage() for r in caplog.records if r.name == "loopfit.serve"]
    assert len(notices) == 1 and "ring" in notices[0] and "exact cache" in notices[0], notices
    model.config.cache_policy = "exact"
    check_parity(model, llm, PROMPTS, 4)


def test_state_noise_is_loopfits(tmp_path):
    """The initial state drawn for each position is the inference path's, past one noise block too."""
    from loopfit.serve.vllm import state_noise_bank

    model, _ = tiny_folder("llama", tmp_path / "m", state_noise_seed=7)
    positions = torch.arange(600)[None]
    assert torch.equal(state_noise_bank(model.config, 600), model.model.state_noise(positions)[0])


@pytest.mark.real
@pytest.mark.parametrize("r", [1, 4, 16])
def test_real_smollm2_equals_loopfit(r, smollm2_loopfit, make_llm):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_loopfit)
    model = LoopfitForCausalLM.from_pretrained(smollm2_loopfit, dtype=torch.float32).eval()
    assert json.loads((smollm2_loopfit / "config.json").read_text())["base_model_type"] == "llama"
    prompts = [tok(text).input_ids for text in ("The capital of France is", "def fibonacci(n):",
                                                "Natalia sold 48 clips in April and half as many in May. How many")]
    llm = make_llm(smollm2_loopfit, hf_overrides={"mean_recurrence": r})
    check_parity(model, llm, prompts, r, REAL_LOGPROB_FLOOR)


@pytest.mark.parametrize("family", ["olmo2", "gemma3"])
def test_tensor_parallel_equals_loopfit(family, tmp_path, make_llm, monkeypatch):
    """Two tensor-parallel ranks (two worker processes on the CPU): heads split across ranks, OLMo-2's norm over
    all heads gathered, the head's vocabulary split."""
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")  # one core per rank (vLLM binds by NUMA node otherwise)
    model, folder = tiny_folder(family, tmp_path / family)
    llm = make_llm(folder, skip_tokenizer_init=True, tensor_parallel_size=2, hf_overrides={"mean_recurrence": 4})
    check_parity(model, llm, PROMPTS, 4)
