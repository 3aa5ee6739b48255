"""`loopfit VERB ...`: each verb lives in its own module, which defines `add_arguments(parser)` and `run(args)`, and
optionally `RENAMED_FLAGS` ({old spelling: new spelling}, still accepted for one release).

Only the module of the verb being run is imported, so `loopfit --help` is instant; and a verb module imports torch,
transformers and the model inside the functions that use them, so its parser (`loopfit VERB --help`) is too.
"""

import argparse
import importlib
import inspect
import sys

# verb -> (module, one-line summary). Order follows the user's path: convert -> prepare -> train -> eval.
VERBS = {
    "analyze": ("loopfit.analyze", "per-layer importance on sample text; suggests (prelude, core, coda) layers"),
    "convert": ("loopfit.convert", "pretrained model (folder, GGUF or short name) -> recurrent loopfit model folder"),
    "prepare": ("loopfit.data.prepare", "text, JSONL, CSV, Parquet, Arrow, chats, generators -> token shards"),
    "train": ("loopfit.train.command", "continue pretraining a recurrent or plain model from a YAML recipe"),
    "eval": ("loopfit.eval.run", "loss and GSM8K / MATH accuracy as test-time recurrence grows"),
    "compare": ("loopfit.eval.compare", "equal-FLOPs comparison report of several runs (markdown + PNG)"),
    "generate": ("loopfit.generate", "generate text with a chosen number of loops, optionally exiting early"),
    "export": ("loopfit.export", "short name, GGUF or plain baseline -> a plain transformers folder"),
    "quickstart": ("loopfit.quickstart", "the whole path on a real small model, offline, on a CPU"),
}

EPILOG = """typical path:
  loopfit convert smollm2-135m --layers 4,8,4 --out runs/smol-484
  loopfit prepare general math --tokenizer smollm2-135m --out data/ --holdout 0.01
  loopfit train quickstart --model.init_from=runs/smol-484 --data.root=data --train.out_dir=runs/smol-484-cpt
  loopfit eval runs/smol-484-cpt/final --loops 1,2,4,8 --tasks loss,gsm8k --data data/math
run `loopfit VERB --help` for each verb's options.

vocabulary: r = loops of the core (--loops), d = loops of a speculative draft (--draft-loops),
step = one optimizer step (train.steps, quickstart --steps)."""


def options_of(parser, func):
    """`add(*flags, **kwargs)`: `parser.add_argument` with the default read from `func`'s signature (the parameter
    named like the option, or `param=`), so each default is written once, in the Python function. A list or tuple
    default becomes the comma-separated text a user would type. Help texts show it with %(default)s."""
    params = inspect.signature(func).parameters

    def add(*flags, param=None, **kwargs):
        name = param or kwargs.get("dest") or flags[0].lstrip("-").replace("-", "_")
        default = params[name].default
        if default is inspect.Parameter.empty:
            raise TypeError(f"{func.__name__}() has no default for {name}")
        if isinstance(default, (list, tuple)):
            default = ",".join(map(str, default))
        return parser.add_argument(*flags, default=default, **kwargs)

    return add


def renamed_flags(verb, argv, renamed):
    """`argv` with each deprecated flag spelling (`renamed`: old -> new) replaced by its new one, saying so once on
    stderr. The old spellings are not in the parser, so --help shows only the new ones. An old and a new spelling
    given together must agree: a LoopfitError otherwise."""
    argv, values = list(argv), {}
    for i, token in enumerate(argv):
        if token == "--":
            break
        flag, eq, value = token.partition("=")
        new = renamed.get(flag, flag)
        if new in renamed.values():
            argv[i] = new + eq + value
            values.setdefault(new, {})[flag] = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    for new, given in values.items():
        for old in given.keys() - {new}:
            if new in given and given[old] != given[new]:
                from . import LoopfitError

                raise LoopfitError(f"{old} {given[old]} and {new} {given[new]} disagree ({old} is the deprecated "
                                   f"name of {new}): give only {new}")
            print(f"loopfit {verb}: {old} is deprecated, use {new} (removed in the next release)", file=sys.stderr)
    return argv


def build_parser(verb):
    module_name, summary = VERBS[verb]
    module = importlib.import_module(module_name)
    doc = (module.__doc__ or summary).strip()
    parser = argparse.ArgumentParser(
        prog=f"loopfit {verb}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    module.add_arguments(parser)
    return parser, module


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in VERBS:
        top = argparse.ArgumentParser(
            prog="loopfit",
            description="Retrofit depth recurrence into a pretrained language model, train it, and measure it.",
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        top.add_argument("--version", action="version", version=f"loopfit {__import__('loopfit').__version__}")
        sub = top.add_subparsers(title="verbs", metavar="VERB")
        for verb, (_, summary) in VERBS.items():
            sub.add_parser(verb, help=summary)
        if argv and argv[0] not in ("-h", "--help", "--version"):
            top.error(f"unknown verb '{argv[0]}': choose one of {', '.join(VERBS)}")
        top.parse_args(argv or ["--help"])
        return 0

    from . import TRANSFORMERS_PROBLEM, LoopfitError

    if TRANSFORMERS_PROBLEM:  # before any verb module imports transformers' newer API
        print(f"loopfit {argv[0]}: error: {TRANSFORMERS_PROBLEM}", file=sys.stderr)
        return 2
    parser, module = build_parser(argv[0])
    try:
        args = parser.parse_args(renamed_flags(argv[0], argv[1:], getattr(module, "RENAMED_FLAGS", {})))
        result = module.run(args)
    except LoopfitError as e:
        print(f"loopfit {argv[0]}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"loopfit {argv[0]}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
