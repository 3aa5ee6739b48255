"""Which layers matter? Per-layer importance on sample text, and the (prelude, core, coda) layers it suggests.

  loopfit analyze smollm2-135m
  loopfit analyze path/to/model --text notes.txt --out analysis/

For each decoder layer i of a plain model (folder, .gguf file or short name):
  block influence  BI_i = 1 - mean over tokens of cos(h_in, h_out)   (ShortGPT; high = the layer changes a lot)
  loss increase    loss with layer i skipped (output := input) minus the full model's loss
Prints a table, writes OUT/importance.json and OUT/importance.png, and suggests a conversion: a prelude of
the first layers, then dropped layers, then a core of k layers right before the coda (the paper's shape),
with the dropped block placed where its layers cost the least loss when removed. The core size and the number
kept default to the paper's TinyLlama (4,8,4)-of-22 proportions; set them with --layers P,K,C (K core layers,
30 - P - K - C dropped for a 30-layer model; P and C are then moved to put the dropped block where it hurts least).
"""

import json
from pathlib import Path

from . import LoopfitError
from .io import atomic_file, check_writable

# ------------------------------------------------------------------------------------------------ measurements


def decoder_layers(model):
    """The decoder layers of a plain transformers causal LM, in order."""
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise LoopfitError(f"{type(model).__name__} has no model.layers: analyze takes a plain (base) causal LM; "
                           "for a loopfit model, analyze the base model it was converted from")
    return list(layers)


def _hidden(x):
    return x[0] if isinstance(x, tuple) else x


def cosine_distance(h_in, h_out, mask):
    """1 - mean cosine similarity over the unmasked tokens."""
    import torch

    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float(1 - (cos * mask).sum() / mask.sum())


def block_influence(model, input_ids, attention_mask):
    """[BI_0, ..., BI_{L-1}] from one forward pass with hooks on every layer."""
    layers, scores = decoder_layers(model), []
    mask = attention_mask.float()

    def hook(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        scores.append(cosine_distance(h_in, _hidden(output), mask))

    handles = [layer.register_forward_hook(hook, with_kwargs=True) for layer in layers]
    try:
        model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return scores


def lm_loss(model, input_ids, attention_mask):
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return float(model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss)


def loss_without(model, layer, input_ids, attention_mask):
    """The loss with `layer` skipped: its output replaced by its input."""

    def skip(module, args, kwargs, output):
        h_in = args[0] if args else kwargs["hidden_states"]
        return (h_in,) + tuple(output[1:]) if isinstance(output, tuple) else h_in

    handle = layer.register_forward_hook(skip, with_kwargs=True)
    try:
        return lm_loss(model, input_ids, attention_mask)
    finally:
        handle.remove()


def layer_importance(model, input_ids, attention_mask, progress=True):
    """{'base_loss', 'block_influence': [...], 'loss_increase': [...]} for every decoder layer."""
    import torch
    from tqdm.auto import tqdm

    with torch.no_grad():
        base = lm_loss(model, input_ids, attention_mask)
        bi = block_influence(model, input_ids, attention_mask)
        layers = decoder_layers(model)
        increase = [loss_without(model, layer, input_ids, attention_mask) - base
                    for layer in tqdm(layers, desc="remove layer", disable=not progress, leave=False)]
    return {"base_loss": base, "block_influence": bi, "loss_increase": increase}


# ------------------------------------------------------------------------------------------------ suggestion


def check_sizes(sizes, num_layers=None):
    """Refuse (p, k, c) that no suggestion can meet; with `num_layers` None only the counts themselves."""
    p, k, c = sizes
    if min(p, c) < 0:
        raise LoopfitError(f"--layers {p},{k},{c} has a negative count: P and C must be >= 0")
    if k < 1:
        raise LoopfitError(f"--layers {p},{k},{c}: the core is empty; K counts the looped layers and must be >= 1")
    if num_layers is not None and p + k + c > num_layers:
        raise LoopfitError(f"--layers {p},{k},{c} needs {p + k + c} layers but the model has {num_layers}: "
                           f"choose P + K + C <= {num_layers}")


def suggest_layers(loss_increase, sizes=None):
    """Paper-shaped layers: prelude 0..p-1, then d dropped layers, then a core of k, then the coda to the end.
    `sizes` (p, k, c) fixes the core size k and the number dropped d = L - p - k - c; the prelude/coda split
    is then chosen (each at least half its given size) so that the dropped block is the one whose layers cost the
    least loss when removed.
    Returns {'prelude', 'core', 'coda', 'dropped' (layer lists), 'dropped_loss_increase'}."""
    from .convert import default_layers

    n = len(loss_increase)
    p0, k, c0 = sizes or default_layers(n)
    check_sizes((p0, k, c0), n)
    d = n - p0 - k - c0
    # the prelude and coda may shrink to half their size (never to nothing) to move the dropped block
    lo, hi = (p0 + 1) // 2, n - d - k - (c0 + 1) // 2
    best = min(range(lo, hi + 1), key=lambda p: (round(sum(loss_increase[p : p + d]), 9), abs(p - p0)))
    return {"prelude": list(range(best)), "core": list(range(best + d, best + d + k)),
            "coda": list(range(best + d + k, n)), "dropped": list(range(best, best + d)),
            "dropped_loss_increase": sum(loss_increase[best : best + d])}


def span(ids):
    return f"{ids[0]}-{ids[-1]}" if len(ids) > 1 else str(ids[0]) if ids else "none"


def convert_command(source, s):
    p, k, c = len(s["prelude"]), len(s["core"]), len(s["coda"])
    return f"loopfit convert {source} --layers {p},{k},{c} --out OUT"  # core right before the coda


# ------------------------------------------------------------------------------------------------ text, report


def sample_batch(tokenizer, text_file=None, samples=4, seq_len=256):
    """`samples` rows of `seq_len` tokens from a text file, or from LAMBADA passages by default."""
    import torch

    from .eval.loss import pack, read_texts

    rows = pack(tokenizer, read_texts(text_file, "--text"), seq_len, samples * seq_len)
    return rows, torch.ones_like(rows)


def table(result):
    lines = ["| layer | block influence | loss increase when removed |", "|---:|---:|---:|"]
    for i, (bi, dl) in enumerate(zip(result["block_influence"], result["loss_increase"])):
        lines.append(f"| {i} | {bi:.4f} | {dl:+.4f} |")
    return "\n".join(lines)


def plot(result, path, title=""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["suggestion"]
    n = len(result["block_influence"])
    fig, axes = plt.subplots(2, 1, figsize=(max(6, n * 0.3), 6), sharex=True)
    colors = ["tab:blue" if i in s["prelude"] else "tab:orange" if i in s["core"] else
              "tab:green" if i in s["coda"] else "lightgrey" for i in range(n)]
    for ax, key, label in ((axes[0], "block_influence", "block influence (1 - cos)"),
                           (axes[1], "loss_increase", "loss increase when removed")):
        ax.bar(range(n), result[key], color=colors)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].set_xlabel("layer (blue prelude, orange core, green coda, grey dropped)")
    fig.suptitle(title)
    with atomic_file(path) as f:
        fig.savefig(f, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


def analyze(source, text=None, samples=4, seq_len=256, sizes=None, out=None, model=None, tokenizer=None):
    """Layer importance of a model (folder, .gguf, short name, or a loaded `model`/`tokenizer`) and the
    suggested layers; writes importance.json and importance.png into `out` when given."""
    if samples < 1 or seq_len < 2:
        raise LoopfitError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples} and {seq_len})")
    if out is not None:
        check_writable(out)
    if text is not None and not Path(text).is_file():
        raise LoopfitError(f"--text {text}: no such file; pass a .txt or .jsonl file (or leave it out for LAMBADA)")
    if model is None:
        from .loading import base_config, load_base

        if sizes is not None:  # refused before the model loads and the layers are measured
            check_sizes(sizes, base_config(source).num_hidden_layers)
        model, tokenizer = load_base(source)
    elif sizes is not None:
        check_sizes(sizes, len(decoder_layers(model)))
    input_ids, attention_mask = sample_batch(tokenizer, text, samples, seq_len)
    result = layer_importance(model.eval(), input_ids, attention_mask)
    result["suggestion"] = suggest_layers(result["loss_increase"], sizes)
    result.update(source=str(source), tokens=int(attention_mask.sum()),
                  convert_command=convert_command(source, result["suggestion"]))
    if out is not None:
        out = Path(out)
        with atomic_file(out / "importance.json", "w") as f:
            json.dump(result, f, indent=1)
        plot(result, out / "importance.png", f"{Path(str(source)).name}: layer importance")
    return result


def add_arguments(parser):
    parser.add_argument("model", metavar="MODEL", help="model folder, .gguf file, or short name (smollm2-135m, ...)")
    parser.add_argument("--text", help="sample text: .txt (blank-line separated) or .jsonl ('text'); default LAMBADA")
    from .cli import options_of

    option = options_of(parser, analyze)
    option("--samples", type=int, help="rows of sample text (default %(default)s)")
    option("--seq-len", type=int, help="tokens per row (default %(default)s)")
    parser.add_argument("--layers", metavar="P,K,C", help="sizes of prelude, core, coda (default: paper's proportions)")
    parser.add_argument("--out", help="folder for importance.json and importance.png (default analyze-NAME)")


def run(args):
    sizes = None
    if args.layers:
        try:
            sizes = tuple(int(x) for x in args.layers.split(","))
            assert len(sizes) == 3
        except (ValueError, AssertionError):
            raise LoopfitError(f"--layers '{args.layers}' must be three counts P,K,C like 4,8,4") from None
    out = Path(args.out or f"analyze-{Path(args.model).stem}")
    result = analyze(args.model, args.text, args.samples, args.seq_len, sizes, out)
    s = result["suggestion"]
    print(table(result))
    print(f"base loss {result['base_loss']:.4f} on {result['tokens']} tokens")
    print(f"suggested (p,k,c) = ({len(s['prelude'])},{len(s['core'])},{len(s['coda'])}): prelude {span(s['prelude'])}, "
          f"core {span(s['core'])}, coda {span(s['coda'])}, dropped {', '.join(map(str, s['dropped'])) or 'none'} "
          f"(summed loss increase {s['dropped_loss_increase']:+.4f})")
    print(result["convert_command"])
    print(f"wrote {out}/importance.json, importance.png")
