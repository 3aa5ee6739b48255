"""Convert a pretrained causal LM into a depth-recurrent loopfit model.

SRC is a transformers folder, a GGUF file, or the short name of a real model that installs offline
(smollm2-135m, qwen2.5-0.5b, gemma3-270m). Layers are chosen by counts, as in the paper (prelude = first p,
coda = last c, core = the r layers right before the coda; the layers in between are dropped), or by ranges.

examples:
  loopfit convert smollm2-135m --layers 4,8,4 --out runs/smol-484
  loopfit convert ./my-llama --prelude 0-3 --core 10-17 --coda 18-21 --recurrence 8 --out runs/llama-484
  loopfit convert model.gguf --layers 2,4,2 --adapter-init passthrough --state-init zeros --out runs/x
  loopfit convert smollm2-135m --layers 4,8,4 --init random --out runs/smol-484-random   # a control, see --init

The output folder is an ordinary transformers checkpoint: with loopfit imported,
AutoModelForCausalLM.from_pretrained(DIR) loads it; without loopfit, add trust_remote_code=True.
`loopfit convert DIR --refresh` gives a folder written by an earlier loopfit this loopfit's model file (its
weights and config untouched), so it also works with trust_remote_code on a newer transformers.
A parity report compares the converted model with the original (see --help of --no-parity).
"""

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import LoopfitError, __version__
from .io import check_writable
from .loading import base_config, check_family, is_recurrent, load_base, resolve_source

INITS = ("pretrained", "random")
# the model's choices, written here too so that `convert --help` need not import the model (torch); keep equal to
# loopfit.model.ADAPTER_INITS and STATE_INITS (a test checks)
ADAPTER_INITS = ("random", "passthrough", "state", "mean")
STATE_INITS = ("normal", "zeros", "embed")

# Conversion is plan layers -> map weights -> parity report -> write the folder; reading the base model (short
# names, GGUF, folders) is loopfit.loading's.

# Each family: how its config maps onto loopfit's block flags, and how its per-layer norms are named.
NORM_NAMES = {
    "pre": {"input_layernorm": "input_norm", "post_attention_layernorm": "pre_mlp_norm"},
    "post": {"post_attention_layernorm": "post_attn_norm", "post_feedforward_layernorm": "post_mlp_norm"},
    "sandwich": {"input_layernorm": "input_norm", "post_attention_layernorm": "post_attn_norm",
                 "pre_feedforward_layernorm": "pre_mlp_norm", "post_feedforward_layernorm": "post_mlp_norm"},
}


def _family_flags(cfg):
    check_family(cfg)  # an unsupported family or variant is refused here
    t = cfg.model_type
    bias = bool(getattr(cfg, "attention_bias", False))
    if t in ("llama", "mistral"):
        return dict(qkv_bias=bias, o_bias=bias, mlp_bias=bool(getattr(cfg, "mlp_bias", False)), norm_style="pre")
    if t == "qwen2":
        return dict(qkv_bias=True, o_bias=False, norm_style="pre")
    if t == "qwen3":
        return dict(qkv_bias=bias, o_bias=bias, qk_norm="head", norm_style="pre")
    if t == "olmo2":
        return dict(qkv_bias=bias, o_bias=bias, qk_norm="full", norm_style="post")
    # gemma3_text
    return dict(qkv_bias=bias, o_bias=bias, qk_norm="head", norm_style="sandwich", norm_offset=1.0,
                embed_scale=cfg.hidden_size**0.5, query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                final_logit_softcapping=getattr(cfg, "final_logit_softcapping", None))


def _layer_types(cfg):
    types = getattr(cfg, "layer_types", None)
    if types:
        return list(types)
    window = "sliding_attention" if getattr(cfg, "sliding_window", None) else "full_attention"
    return [window] * cfg.num_hidden_layers


def _rope(cfg, used_types):
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    if not params:
        params = {"rope_type": "default", "rope_theta": getattr(cfg, "rope_theta", 10000.0)}
    if any(t in params for t in ("full_attention", "sliding_attention")):  # nested by layer type (Gemma3)
        return {t: dict(params[t]) for t in used_types}
    return {t: params for t in used_types}


# ----------------------------------------------------------------------------------------------------------------
# Layer selection


@dataclass
class LayerPlan:
    prelude: list
    core: list
    coda: list
    num_base_layers: int

    @property
    def dropped(self):
        kept = set(self.prelude) | set(self.core) | set(self.coda)
        return [i for i in range(self.num_base_layers) if i not in kept]

    def describe(self):
        def span(ids):
            return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else (str(ids[0]) if ids else "none")

        return (f"(P,K,C) = ({len(self.prelude)},{len(self.core)},{len(self.coda)}): prelude {span(self.prelude)}, "
                f"core {span(self.core)}, coda {span(self.coda)}, dropped {_compact(self.dropped) or 'none'} "
                f"of {self.num_base_layers} layers")


def _compact(ids):
    runs, start = [], None
    for i, x in enumerate(ids):
        if start is None:
            start = x
        if i + 1 == len(ids) or ids[i + 1] != x + 1:
            runs.append(f"{start}-{x}" if x != start else str(x))
            start = None
    return ",".join(runs)


def default_layers(num_layers):
    """The paper's proportions, TinyLlama (4,8,4) of 22 layers, scaled to this depth."""
    p = max(1, round(num_layers * 4 / 22))
    return p, max(1, min(2 * p, num_layers - 2 * p)), p


def parse_range(text, what):
    """'3' or '0-3' (inclusive) -> [0, 1, 2, 3]."""
    try:
        a, _, b = text.partition("-")
        lo, hi = int(a), int(b) if b else int(a)
    except ValueError:
        raise LoopfitError(f"--{what} '{text}' is not a layer range: write it like 0-3 (inclusive) or 5") from None
    if hi < lo:
        raise LoopfitError(f"--{what} '{text}' is empty: write the lower layer first, like {hi}-{lo}")
    return list(range(lo, hi + 1))


def plan_layers(num_layers, layers=None, prelude=None, core=None, coda=None):
    """Choose prelude/core/coda base layers from counts (p, r, c) or from explicit ranges."""
    if layers is not None and any(x is not None for x in (prelude, core, coda)):
        raise LoopfitError("give either --layers P,K,C or --prelude/--core/--coda ranges, not both")
    if prelude is None and core is None and coda is None:
        p, r, c = layers if layers is not None else default_layers(num_layers)
        if min(p, c) < 0:
            raise LoopfitError(f"--layers {p},{r},{c} has a negative count: p and c must be >= 0 (layers, not indices)")
        if r < 1:
            raise LoopfitError("the core is empty: --layers P,K,C needs K >= 1 (K counts the looped layers)")
        if p + r + c > num_layers:
            raise LoopfitError(f"--layers {p},{r},{c} needs {p + r + c} layers but the model has {num_layers}: "
                               f"choose p + r + c <= {num_layers}")
        return LayerPlan(list(range(p)), list(range(num_layers - c - r, num_layers - c)),
                         list(range(num_layers - c, num_layers)), num_layers)
    if core is None:
        raise LoopfitError("the core is empty: give --core a range of layers to loop, like --core 10-17")
    plan = LayerPlan(prelude or [], core, coda or [], num_layers)
    for name, ids in (("prelude", plan.prelude), ("core", plan.core), ("coda", plan.coda)):
        bad = [i for i in ids if not 0 <= i < num_layers]
        if bad:
            raise LoopfitError(f"--{name} names layer {bad[0]} but the model has layers 0-{num_layers - 1}")
    segments = [s for s in (plan.prelude, plan.core, plan.coda) if s]
    for a, b in zip(segments, segments[1:]):
        if a[-1] >= b[0]:
            raise LoopfitError("layer ranges overlap or are out of order: prelude, core and coda must be "
                               f"increasing and disjoint (got prelude {plan.prelude}, core {plan.core}, "
                               f"coda {plan.coda})")
    return plan


# ----------------------------------------------------------------------------------------------------------------
# Building the loopfit model


def loopfit_config(base_cfg, plan, adapter_init="random", state_init="normal", recurrence=4, untie_head=False,
                   **extra):
    """The loopfit config for a base config and a layer plan; the head stays tied to the embeddings where the
    base's is, unless `untie_head`."""
    from .model import LoopfitConfig

    cfg = base_cfg.get_text_config()
    tied = bool(getattr(base_cfg, "tie_word_embeddings", False) or getattr(cfg, "tie_word_embeddings", False))
    types = _layer_types(cfg)
    kept_types = [types[i] for i in plan.prelude + plan.core + plan.coda]
    hidden_act = getattr(cfg, "hidden_act", None) or getattr(cfg, "hidden_activation", "silu")
    return LoopfitConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        hidden_act=hidden_act, rms_norm_eps=cfg.rms_norm_eps,
        max_position_embeddings=cfg.max_position_embeddings,
        initializer_range=getattr(cfg, "initializer_range", 0.02),
        sliding_window=getattr(cfg, "sliding_window", None), layer_types=kept_types,
        rope=_rope(cfg, sorted(set(kept_types))),
        num_prelude_layers=len(plan.prelude), num_core_layers=len(plan.core), num_coda_layers=len(plan.coda),
        mean_recurrence=recurrence, adapter_init=adapter_init, state_init=state_init,
        base_model_type=cfg.model_type, loopfit_version=__version__,  # a newer folder is refused by an older loopfit
        source_layers={"prelude": plan.prelude, "core": plan.core, "coda": plan.coda,
                       "num_base_layers": plan.num_base_layers},
        pad_token_id=getattr(cfg, "pad_token_id", None), bos_token_id=getattr(cfg, "bos_token_id", None),
        eos_token_id=getattr(cfg, "eos_token_id", None), tie_word_embeddings=tied and not untie_head,
        **_family_flags(cfg), **extra,
    )


def map_weights(base_state, base_cfg, plan):
    """Base state dict -> loopfit state dict (everything but the adapter). Every loopfit weight must be found."""
    norm_names = NORM_NAMES[_family_flags(base_cfg.get_text_config())["norm_style"]]
    prefix = "model.language_model." if any(k.startswith("model.language_model.") for k in base_state) else "model."
    out = {"model.embed_tokens.weight": base_state[f"{prefix}embed_tokens.weight"],
           "model.norm.weight": base_state[f"{prefix}norm.weight"],
           "lm_head.weight": base_state.get("lm_head.weight", base_state[f"{prefix}embed_tokens.weight"])}
    for segment, ids in (("prelude", plan.prelude), ("core", plan.core), ("coda", plan.coda)):
        for j, i in enumerate(ids):
            src = f"{prefix}layers.{i}."
            for key, tensor in base_state.items():
                if not key.startswith(src):
                    continue
                rest = key[len(src):]
                module, _, param = rest.rpartition(".")
                module = norm_names.get(module, module)
                out[f"model.{segment}.{j}.{module}.{param}"] = tensor
    return out


def build_loopfit(base_model, plan, **config_kwargs):
    """A loopfit model holding the base model's weights for the planned layers (fp32, eval mode)."""
    import torch

    from .model import LoopfitForCausalLM, init_adapter

    config = loopfit_config(base_model.config, plan, **config_kwargs)
    with torch.device("meta"):
        model = LoopfitForCausalLM(config)
    weights = map_weights(base_model.state_dict(), base_model.config, plan)
    weights["model.adapter.weight"] = torch.empty(config.hidden_size, 2 * config.hidden_size)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise LoopfitError(f"weights do not map onto the loopfit model (missing {sorted(missing)[:3]}, "
                           f"unexpected {sorted(unexpected)[:3]}): this checkpoint's layout is not supported")
    # clone: the base keeps its own tensors; with tie_word_embeddings the head then shares the embedding again
    model.load_state_dict({k: v.detach().clone().float() for k, v in weights.items()}, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    init_adapter(model.model.adapter.weight, config.adapter_init)
    model.model.init_rope()  # buffers were created on the meta device
    return model.eval()


def random_loopfit(base_model, plan, **config_kwargs):
    """A loopfit model of build_loopfit's shape and config with every weight drawn by the model's own init (normal
    with std config.initializer_range, norms at 1, the adapter per adapter_init): the control that shows what
    reusing the pretrained layers buys. Seed torch first for a reproducible draw."""
    from .model import LoopfitForCausalLM

    model = LoopfitForCausalLM(loopfit_config(base_model.config, plan, **config_kwargs))
    return model.float().eval()


# ----------------------------------------------------------------------------------------------------------------
# Parity report

SAMPLE_TEXT = (
    "The old lighthouse keeper climbed the stairs every evening at dusk. He counted one hundred and twelve steps, "
    "the same as his father had, and lit the lamp before the fishing boats came home. In winter the sea was grey "
    "and the wind howled against the glass, but the light never failed. When the village children asked him why "
    "he never missed a single night, he answered that a promise kept only on good days is not a promise at all."
)


@dataclass
class ParityReport:
    identity_max_abs_diff: float
    base_loss: float
    converted_loss: float
    converted_loops: int
    tokens: int
    notes: list = field(default_factory=list)

    def lines(self):
        return [
            f"identity check (every layer kept, passthrough adapter, r = 1): max |logit diff| = "
            f"{self.identity_max_abs_diff:.2e} over {self.tokens} tokens",
            f"loss on sample text: base {self.base_loss:.4f} (ppl {math.exp(self.base_loss):.1f}), converted at "
            f"r = {self.converted_loops} {self.converted_loss:.4f} (ppl {math.exp(min(self.converted_loss, 50)):.1f})",
            *self.notes,
        ]


def parity_report(base_model, model, tokenizer, plan, text=SAMPLE_TEXT, random_init=False):
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids
    split = len(plan.prelude)
    everything = LayerPlan(list(range(split)), list(range(split, plan.num_base_layers - len(plan.coda))),
                           list(range(plan.num_base_layers - len(plan.coda), plan.num_base_layers)),
                           plan.num_base_layers)
    with torch.no_grad():
        base_logits = base_model(ids).logits.float()
        identity = build_loopfit(base_model, everything, adapter_init="passthrough", state_init="zeros",
                                 recurrence=1)
        diff = (identity(ids, num_steps=1).logits.float() - base_logits).abs().max().item()
        del identity
        base_loss = torch.nn.functional.cross_entropy(base_logits[0, :-1], ids[0, 1:]).item()
        r = model.config.mean_recurrence
        conv_loss = model(ids, labels=ids, num_steps=r).loss.item()
    notes = []
    if random_init:
        notes.append(f"random init: every weight drawn afresh (normal, std {model.config.initializer_range}); only "
                     "the shape, config and tokenizer come from the base model")
    elif model.config.adapter_init == "random":
        notes.append("the random adapter (the paper's init) does not reproduce the base model: train to heal it")
    notes.append(head_line(model.config))
    return ParityReport(diff, base_loss, conv_loss, r, ids.shape[1], notes)


# ----------------------------------------------------------------------------------------------------------------
# Writing the folder


def head_line(config):
    """What the model card and parity report say of the output head."""
    if config.tie_word_embeddings:
        return "Output head: tied to the input embeddings (as in the base model)."
    extra = config.vocab_size * config.hidden_size
    return f"Output head: its own matrix, not tied to the embeddings ({extra / 1e6:.1f}M parameters)."


def model_card(config, plan, source, report, init="pretrained"):
    lines = [
        "---", "library_name: transformers", "tags: [loopfit, depth-recurrence]", "---", "",
        f"# loopfit recurrent model from `{source}`", "",
        f"Converted by loopfit from a {config.base_model_type} model with {plan.num_base_layers} layers"
        + (", with every weight randomly initialised (`--init random`): the base model's shape, not its weights."
           if init == "random" else "."), "",
        "| part | base layers | loopfit layers |", "|---|---|---|",
        f"| prelude | {_compact(plan.prelude) or 'none'} | {len(plan.prelude)} |",
        f"| core (looped, default r = {config.mean_recurrence}) | {_compact(plan.core)} | {len(plan.core)} |",
        f"| coda | {_compact(plan.coda) or 'none'} | {len(plan.coda)} |",
        f"| dropped | {_compact(plan.dropped) or 'none'} | |", "",
        f"Adapter init: `{config.adapter_init}`; state init: `{config.state_init}`"
        + (f" (sigma {config.state_init_std:.7f})" if config.state_init == "normal" else "") + "; "
        f"KV cache policy: `{config.cache_policy}`.", "", head_line(config), "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "import loopfit  # or pass trust_remote_code=True to both from_pretrained calls",
        "model = AutoModelForCausalLM.from_pretrained(DIR)",
        "inputs = AutoTokenizer.from_pretrained(DIR)(\"2 + 2 =\", return_tensors=\"pt\")",
        "out = model.generate(**inputs, num_steps=8, max_new_tokens=20)",
        "```",
    ]
    if report is not None:
        lines += ["", "## Parity report", "", *[f"- {line}" for line in report.lines()]]
    return "\n".join(lines) + "\n"


def save_folder(model, tokenizer, out, source, plan, report=None, dtype=None, force=False, init="pretrained"):
    import torch

    from .io import atomic_dir

    out = Path(out)
    if out.exists() and not force:
        raise LoopfitError(f"{out} already exists: choose another --out or pass --force to replace it")
    with atomic_dir(out, force=force) as tmp:
        to_save = model if dtype in (None, torch.float32) else model.to(dtype)
        to_save.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "README.md").write_text(model_card(model.config, plan, source, report, init))
        if report is not None:
            (tmp / "parity.json").write_text(json.dumps(report.__dict__, indent=2) + "\n")
    return out


def convert(source, out, layers=None, prelude=None, core=None, coda=None, adapter_init="random",
            state_init="normal", recurrence=4, dtype="auto", force=False, parity=True, seed=0, init="pretrained",
            untie_head=False, log=print):
    """Convert SOURCE into a loopfit folder at OUT; returns (model, ParityReport or None). `init="random"` keeps
    the planned shape and config but draws every weight afresh (see random_loopfit). A base whose head is tied
    to its embeddings keeps the tie unless `untie_head` (the head then trains as its own matrix)."""
    import torch

    if recurrence < 1:
        raise LoopfitError(f"--recurrence must be >= 1 (got {recurrence}): it is the default number of loops")
    if adapter_init not in ADAPTER_INITS or state_init not in STATE_INITS:
        raise LoopfitError(f"--adapter-init must be one of {ADAPTER_INITS}, --state-init one of {STATE_INITS}")
    if init not in INITS:
        raise LoopfitError(f"--init must be one of {', '.join(INITS)} (got {init!r})")
    if Path(out).exists() and not force:
        raise LoopfitError(f"{out} already exists: choose another --out or pass --force to replace it")
    check_writable(out)
    t0 = time.time()
    n_layers = base_config(source).num_hidden_layers
    plan = plan_layers(n_layers, layers, prelude, core, coda)  # checked before any weights are read
    base, tokenizer = load_base(source)
    log(f"loaded {base.config.model_type} with {n_layers} layers in {time.time() - t0:.0f}s; {plan.describe()}")
    torch.manual_seed(seed)  # the random inits: same seed, same model
    build = random_loopfit if init == "random" else build_loopfit
    model = build(base, plan, adapter_init=adapter_init, state_init=state_init, recurrence=recurrence,
                  untie_head=untie_head, source_model=source_name(source))
    report = parity_report(base, model, tokenizer, plan, random_init=init == "random") if parity else None
    for line in report.lines() if report else []:
        log(line)
    save_dtype = _save_dtype(dtype, source, base)
    save_folder(model, tokenizer, out, source, plan, report, save_dtype, force, init)
    log(f"wrote {out} ({save_dtype}) in {time.time() - t0:.0f}s")
    return model, report


def source_name(source):
    """What a converted folder records as its base model (`source_model`, read by `distill.teacher: base`): an
    offline short name as it is, a folder or GGUF file as its absolute path."""
    from .loading import OFFLINE_MODELS

    return str(source) if str(source) in OFFLINE_MODELS else str(Path(source).resolve())


def refresh_model_file(folder, log=print):
    """Replace a loopfit folder's model files by the installed loopfit's; weights and config stay as they are (the
    new modeling.py still answers a 0.1.0 config's `modeling.LoopfitConfig`)."""
    from .io import atomic_file
    from .model import model_files

    folder = Path(folder)
    if not is_recurrent(folder):
        raise LoopfitError(f"{folder} is not a loopfit model folder (no config.json of model_type 'loopfit'): "
                           "give a folder that `loopfit convert` or `loopfit train` wrote")
    for path in model_files():
        with atomic_file(folder / path.name, "w") as f:
            f.write(path.read_text())
    names = ", ".join(path.name for path in model_files())
    log(f"refreshed {names} in {folder} from loopfit {__import__('loopfit').__version__}")


def _save_dtype(dtype, source, base):
    import torch

    if dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    src = getattr(base.config, "dtype", None)
    kind, _ = resolve_source(source)
    return torch.float32 if kind == "gguf" or src is None else getattr(torch, str(src).replace("torch.", ""))


# ----------------------------------------------------------------------------------------------------------------
# CLI


def _counts(text):
    try:
        p, r, c = (int(x) for x in text.split(","))
    except ValueError:
        raise LoopfitError(f"--layers '{text}' must be three counts P,K,C like 4,8,4") from None
    if min(p, r, c) < 0:
        raise LoopfitError(f"--layers {text} has a negative count: P,K,C count layers (>= 0, K >= 1), like 4,8,4")
    return p, r, c


def add_arguments(parser):
    parser.add_argument("source", metavar="SRC", help="model folder, .gguf file, or short name (smollm2-135m, "
                        "qwen2.5-0.5b, gemma3-270m)")
    parser.add_argument("--out", help="output folder (must not exist unless --force)")
    parser.add_argument("--layers", metavar="P,K,C", help="counts: first P layers, K core layers right before the "
                        "last C (default: the paper's 4,8,4-of-22 proportions)")
    parser.add_argument("--prelude", metavar="A-B", help="explicit prelude layer range, e.g. 0-3")
    parser.add_argument("--core", metavar="A-B", help="explicit core (looped) layer range, e.g. 10-17")
    parser.add_argument("--coda", metavar="A-B", help="explicit coda layer range, e.g. 18-21")
    from .cli import options_of

    option = options_of(parser, convert)
    option("--adapter-init", choices=ADAPTER_INITS,
           help="random: the paper's (needs healing); passthrough: [0|I], equals the base with the dropped layers "
           "removed at any r; state: [I|0]; mean: [I/2|I/2] (default: %(default)s)")
    option("--state-init", choices=STATE_INITS,
           help="initial recurrent state: normal (truncated, sigma 0.0087), zeros, or embed (= prelude output) "
           "(default: %(default)s)")
    option("--recurrence", type=int, metavar="R", help="default number of loops (default %(default)s)")
    option("--dtype", choices=("auto", "float32", "bfloat16", "float16"),
           help="weights dtype on disk (auto: the source's; float32 for GGUF) (default %(default)s)")
    option("--init", choices=INITS,
           help="pretrained: the base model's weights; random: the same shape and config with every weight drawn "
           "afresh by the model's own init (normal, std initializer_range), a control for what reusing the "
           "pretrained layers buys (default: %(default)s)")
    option("--seed", type=int, help="seed of the random inits (adapter, --init random) (default %(default)s)")
    parser.add_argument("--untie-head", action="store_true", help="give the output head its own matrix where the "
                        "base ties it to the input embeddings (more parameters to train; default: keep the tie)")
    parser.add_argument("--force", action="store_true", help="replace --out if it exists")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity report against the original")
    parser.add_argument("--refresh", action="store_true", help="SRC is a loopfit folder: replace its model files "
                        "(configuration.py, modeling.py, depth.py, cache.py, losses.py, generation.py) by this "
                        "loopfit's (for folders written by an earlier loopfit); weights and config stay as they are")


def run(args):
    if args.refresh:
        return refresh_model_file(args.source, log=lambda line: print(line, file=sys.stderr))
    if not args.out:
        raise LoopfitError("--out DIR is required: the folder to write the recurrent model to")
    convert(
        args.source, args.out,
        layers=_counts(args.layers) if args.layers else None,
        prelude=parse_range(args.prelude, "prelude") if args.prelude else None,
        core=parse_range(args.core, "core") if args.core else None,
        coda=parse_range(args.coda, "coda") if args.coda else None,
        adapter_init=args.adapter_init, state_init=args.state_init, recurrence=args.recurrence,
        dtype=args.dtype, force=args.force, parity=not args.no_parity, seed=args.seed, init=args.init,
        untie_head=args.untie_head,
    )
