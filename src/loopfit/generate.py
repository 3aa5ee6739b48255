"""Generate text with a chosen number of loops, optionally stopping each token's loops early.

examples:
  loopfit generate runs/smol-484 --prompt "Natalia sold 48 clips in April and half as many in May." --loops 8
  loopfit generate runs/smol-484 --prompt "2 + 3 * 4 =" --loops 32 --exit kl:5e-4     # adaptive depth
  loopfit generate runs/smol-484 --prompt-file prompts.txt --loops 8 --warm-start      # one prompt per line
  loopfit generate smollm2-135m --prompt "Hello"                                        # a plain model: no loops
  loopfit generate runs/smol-484 --prompt "2 + 3 * 4 =" --loops 32 --draft-loops 2     # same tokens, faster

--exit stops a token's loops once its next-token distribution settles: kl:T (KL between successive loops
below T; 5e-4 to 1e-3 works for Huginn), entropy:T, latent:T (relative state change, e.g. 0.03), argmax:N
(unchanged for N loops). latent:T:M also looks at the next token when the state settles and stops only if its
top logit leads the runner-up by M; a near-tie loops on and looks again at twice the loops. latent decides on
the state, so it is the rule that saves wall time. The mean number of loops used is reported. --warm-start
starts each new token's state from the previous token's final state (continuous chain of thought) instead of
noise.

--draft-loops D decodes by exact self-speculation: each round drafts --draft-tokens K tokens at D loops (the
first D of the --loops r loops), then verifies all K in one pass that runs only loops D..r-1, keeping the tokens
r loops agree with. Greedy output is the r-loop output token for token; sampling keeps its distribution. Small D
drafts cheaply and a draft's loops are never wasted (verification continues from them); how many tokens a round
keeps depends on how much the model's tokens change past D loops. D = 2, K = 4 are a good start (see
benchmarks/BENCHMARKS.md); a batch advances by its shortest kept prefix, so it gains most at batch 1.

--steps and --draft-steps are the deprecated names of --loops and --draft-loops (removed in the next release).
"""

import sys
import time

from . import LoopfitError
from .loops import DRAFT_TOKENS, check_speculation

RENAMED_FLAGS = {"--steps": "--loops", "--draft-steps": "--draft-loops"}  # old names, accepted for one release


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="loopfit or transformers folder, GGUF file, or short name")
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="a prompt (repeat for a batch)")
    src.add_argument("--prompt-file", help="a text file with one prompt per line")
    from .cli import options_of

    option = options_of(parser, generate)
    option("--loops", type=int, metavar="R", help="loops r per token (default: the model's mean_recurrence); with "
           "--exit, the most loops a token may use")
    parser.add_argument("--exit", dest="exit_criterion", metavar="RULE", help="adaptive exit rule, e.g. kl:5e-4")
    parser.add_argument("--warm-start", action="store_true", help="continuous chain of thought: carry the state")
    parser.add_argument("--draft-loops", type=int, metavar="D", help="self-speculative decoding: draft at D loops, "
                        "verify at --loops (same greedy tokens, faster; D < r; try 2)")
    option("--draft-tokens", type=int, metavar="K", help="tokens drafted per round with --draft-loops "
           "(default %(default)s)")
    option("--max-new-tokens", type=int, help="tokens to generate (default %(default)s)")
    option("--temperature", type=float, help="0 = greedy (default %(default)s)")
    option("--top-p", type=float, help="nucleus sampling mass (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of torch's random numbers (sampling with --temperature > 0) (default %(default)s)")
    parser.add_argument("--chat", action="store_true", help="wrap each prompt in the tokenizer's chat template")


def check_arguments(prompts, loops=None, exit_criterion=None, max_new_tokens=64, temperature=0.0, top_p=1.0,
                    draft_loops=None, draft_tokens=DRAFT_TOKENS, warm_start=False):
    """Refuse bad generation settings with one line, before any model is loaded (what needs the model is
    `check_speculation`'s)."""
    from .model import exit_rule

    if draft_loops is not None:
        if exit_criterion or warm_start:
            raise LoopfitError(f"--draft-loops does not combine with {'--exit' if exit_criterion else '--warm-start'}"
                               ": choose one")
        if draft_loops < 1 or draft_tokens < 1:
            raise LoopfitError(f"--draft-loops and --draft-tokens must be >= 1 (got {draft_loops} and {draft_tokens})")
        if loops is not None and draft_loops >= loops:
            raise LoopfitError(f"--draft-loops {draft_loops} must be below --loops {loops}: the draft runs the first D "
                               "of the r loops")

    if not prompts or any(not str(p).strip() for p in prompts):
        raise LoopfitError("a prompt is empty: give some text to continue, e.g. --prompt \"Once upon a time\"")
    if loops is not None and loops < 1:
        raise LoopfitError(f"--loops must be >= 1 (got {loops})")
    if max_new_tokens < 1:
        raise LoopfitError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    if temperature < 0:
        raise LoopfitError(f"--temperature must be >= 0 (got {temperature}); 0 is greedy")
    if not 0 < top_p <= 1:
        raise LoopfitError(f"--top-p must be in (0, 1] (got {top_p}); 1 keeps every token")
    if exit_criterion:
        try:
            exit_rule(exit_criterion)
        except ValueError as e:
            raise LoopfitError(str(e)) from None


def chat_prompts(tokenizer, prompts):
    """Each prompt as a user turn in the tokenizer's chat template (transformers renders it in a jinja sandbox),
    or one line saying why the template cannot be used."""
    try:
        return [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                              add_generation_prompt=True) for p in prompts]
    except Exception as e:  # jinja2's SecurityError and TemplateError, transformers' ValueError, the sandbox's limits
        first = (str(e).splitlines() or [""])[0][:160]
        raise LoopfitError(f"--chat: the tokenizer's chat template cannot be rendered ({type(e).__name__}: {first}): "
                           "drop --chat, or fix chat_template in the model's tokenizer_config.json") from None


def check_context(tokenizer, prompts, max_new_tokens, context):
    """Refuse prompts that, with max_new_tokens, do not fit the model's context (one line, nothing run)."""
    if not context:
        return
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=True)["input_ids"]]
    longest = max(lengths)
    if longest + max_new_tokens > context:
        which = lengths.index(longest) + 1
        raise LoopfitError(f"prompt {which} has {longest} tokens: with --max-new-tokens {max_new_tokens} it does not "
                           f"fit the model's context of {context} tokens; shorten it (or split the file into more "
                           "prompts, one per line)")


def generate(model, tokenizer, prompts, loops=None, exit_criterion=None, warm_start=False, max_new_tokens=64,
             temperature=0.0, top_p=1.0, chat=False, draft_loops=None, draft_tokens=DRAFT_TOKENS):
    """Generate continuations for a batch of prompts (left padded) at `loops` r per token. Returns (texts, mean
    loops or None). `draft_loops` decodes by exact self-speculation (`draft_tokens` a round)."""
    import torch

    from .loading import is_recurrent

    check_arguments(prompts, loops, exit_criterion, max_new_tokens, temperature, top_p, draft_loops, draft_tokens,
                    warm_start)
    check_speculation(model, loops, draft_loops, draft_tokens, exit_criterion, warm_start)

    if chat:
        prompts = chat_prompts(tokenizer, prompts)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    check_context(tokenizer, prompts, max_new_tokens, getattr(model.config, "max_position_embeddings", None))
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, do_sample=temperature > 0,
                  **({"temperature": temperature, "top_p": top_p} if temperature > 0 else {}))
    cache = None
    if is_recurrent(model):
        cache = model.new_cache()
        kwargs.update(num_steps=loops, exit_criterion=exit_criterion, warm_start=warm_start, past_key_values=cache)
        if draft_loops is not None:
            kwargs.update(draft_steps=draft_loops, draft_tokens=draft_tokens)
            del kwargs["exit_criterion"], kwargs["warm_start"]
    elif exit_criterion or warm_start:
        raise LoopfitError("--exit and --warm-start need a loopfit (recurrent) model; this one is plain")
    try:
        with torch.no_grad():
            out = model.generate(**batch, **kwargs)
    except ValueError as e:
        if "exit rule" in str(e):
            raise LoopfitError(str(e)) from None
        raise
    texts = tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)
    loops = torch.stack(cache.loops_used).float().mean().item() if cache is not None and cache.loops_used else None
    return texts, loops


def _context_of(source):
    """max_position_embeddings from a folder's config.json or a base model's config, without the weights."""
    import json
    from pathlib import Path

    from .loading import base_config

    folder = Path(source)
    if folder.is_dir():
        try:
            return json.loads((folder / "config.json").read_text()).get("max_position_embeddings")
        except (OSError, ValueError):
            return None
    return getattr(base_config(source), "max_position_embeddings", None)


def run(args):
    import torch

    from .loading import load, load_tokenizer

    prompts = args.prompt
    if args.prompt_file:
        try:
            prompts = [line for line in open(args.prompt_file, encoding="utf-8").read().splitlines() if line.strip()]
        except OSError as e:
            raise LoopfitError(f"cannot read --prompt-file {args.prompt_file}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise LoopfitError(f"--prompt-file {args.prompt_file} is not UTF-8 text (byte {e.start}): convert it, "
                               "e.g. `iconv -f latin1 -t utf-8`") from None
        if not prompts:
            raise LoopfitError(f"--prompt-file {args.prompt_file} has no prompts: write one per line")
    check_arguments(prompts, args.loops, args.exit_criterion, args.max_new_tokens, args.temperature, args.top_p,
                    args.draft_loops, args.draft_tokens, args.warm_start)
    # the prompts against the tokenizer (chat template, context length) before the weights load
    tokenizer = load_tokenizer(args.model, pad=True)
    inputs = chat_prompts(tokenizer, prompts) if args.chat else prompts
    check_context(tokenizer, inputs, args.max_new_tokens, _context_of(args.model))
    torch.manual_seed(args.seed)
    model, tokenizer = load(args.model)
    t0 = time.time()
    texts, used = generate(model, tokenizer, inputs, args.loops, args.exit_criterion, args.warm_start,
                           args.max_new_tokens, args.temperature, args.top_p, False, args.draft_loops,
                           args.draft_tokens)
    for prompt, text in zip(prompts, texts):
        print(f"{prompt}{text}\n")
    loops = args.loops or getattr(model.config, "mean_recurrence", None)
    summary = f"{len(prompts)} prompt(s), {time.time() - t0:.1f}s"
    if used is not None:
        summary += f", mean loops per token {used:.2f} of at most {loops} ({args.exit_criterion})"
    elif loops:
        summary += f", {loops} loops per token"
    if args.draft_loops is not None:
        summary += f", drafted at {args.draft_loops} loops, {args.draft_tokens} tokens a round"
    print(summary, file=sys.stderr)
