"""Continue pretraining a recurrent loopfit model (or a plain transformers causal LM, the baseline) from a recipe.

  loopfit train RECIPE.yaml [--section.key=value ...]        start a run from model.init_from (weights only)
  loopfit train RECIPE.yaml --resume                          continue the run in train.out_dir (full state)
  torchrun --nproc-per-node 8 -m loopfit.cli train RECIPE.yaml --distributed.strategy=fsdp

Starting and resuming are different operations. Without --resume, the weights of `model.init_from` (a
converted loopfit folder, or any folder AutoModelForCausalLM loads) are the starting point and the optimizer,
schedule and curriculum start fresh; an out_dir that already holds checkpoints is refused. With --resume the
newest intact checkpoint in out_dir restores model, optimizer (Muon momentum included), step, data position
and RNG, so the run continues as if never stopped (bit for bit on CPU). A corrupt newest checkpoint is
skipped with a message. `--resume PATH` picks a checkpoint folder.

Each micro-batch of a recurrent model draws (n, k) loops (recurrence.*: Poisson-lognormal depth seeded by step
and micro-batch, the same on every rank; curriculum of the mean or the backprop depth, or a fixed r; or one draw
per step with recurrence.depth_per=step), runs n loops without and k with gradients, and each step updates with
Muon + AdamW (optim.*) under an lr schedule (schedule.*: wsd, cosine, constant, cpt). The global batch is
train.batch_size sequences = micro_batch_size x ranks x accumulation steps. The loss of a loopfit model is computed
chunk by chunk without the full fp32 logits; train.compile and train.activation_checkpointing trade start-up time
and recomputation for speed and memory (see loopfit.train.performance).

With a `distill.teacher` the loss is alpha * CE + (1 - alpha) * T^2 * KL(teacher || student), both heads chunked
(loopfit.train.distill); `train.trainable` freezes all but a set of parameters, per phase (loopfit.train.trainable).

Writes to train.out_dir: metrics.jsonl / metrics.csv / tb/ (loss, lr, grad norm, n and k (the step's mean over its
micro-batches), tokens, FLOPs by the paper's count (`flops`: adapter and final norm left out, as the authors count)
and the full count (`flops_full`), tokens/s, MFU by both counts; with a teacher also ce, kl and flops_teacher),
checkpoints/step-N/ (every checkpoint.every steps, at the end, and on SIGTERM/SIGINT), and final/, a folder
from_pretrained loads. A non-finite loss stops the run with a checkpoint of the last good state (or, with
train.on_nonfinite=skip, drops that step).
"""

from .config import describe_keys


def add_arguments(parser):
    parser.add_argument("recipe", help="YAML recipe file, or the name of a shipped one "
                        "(quickstart, tinyllama-448, ...); every key can be overridden as --section.key=value")
    parser.add_argument("--resume", nargs="?", const="latest", default=None, metavar="CHECKPOINT",
                        help="continue the run in train.out_dir from its newest intact checkpoint (or CHECKPOINT)")
    parser.epilog = "recipe keys and defaults (override any as --section.key=value):\n" + describe_keys()
    known = parser.parse_known_args

    def parse_args(args=None, namespace=None):
        ns, rest = known(args, namespace)
        bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
        if bad:
            parser.error(f"unrecognized arguments: {' '.join(bad)} (recipe overrides look like --optim.lr=3e-4)")
        ns.overrides = rest
        return ns

    parser.parse_args = parse_args


def run(args):
    from .trainer import train

    result = train(args.recipe, getattr(args, "overrides", ()), resume=args.resume)
    return {"SIGTERM": 143, "SIGINT": 130}.get(result.get("stopped"), 0)
