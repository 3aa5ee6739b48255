"""Each command-line default is written once, in the Python function the verb calls: argparse reads it from the
signature (loopfit.cli.options_of), so `loopfit VERB --help` and the Python API cannot disagree."""

import inspect

import pytest

from loopfit.analyze import analyze
from loopfit.cli import build_parser
from loopfit.convert import convert
from loopfit.data.prepare import prepare_one
from loopfit.eval.run import evaluate
from loopfit.generate import generate
from loopfit.quickstart import quickstart

VERBS = {"convert": (convert, ["SRC"]), "prepare": (prepare_one, ["x", "--tokenizer", "t", "--out", "o"]),
         "analyze": (analyze, ["m"]), "quickstart": (quickstart, []), "eval": (evaluate, ["m"]),
         "generate": (generate, ["m", "--prompt", "hi"])}


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_cli_defaults_are_the_functions_defaults(verb):
    func, required = VERBS[verb]
    parser, _ = build_parser(verb)
    args = vars(parser.parse_args(required))
    params = inspect.signature(func).parameters
    positional = {a.dest for a in parser._actions if not a.option_strings}  # e.g. analyze's MODEL is not `model=`
    shared = [name for name in args if name in params and name not in positional
              and params[name].default is not inspect.Parameter.empty]
    assert len(shared) >= 4, shared
    for name in shared:
        default = params[name].default
        expected = ",".join(map(str, default)) if isinstance(default, (list, tuple)) else default
        assert args[name] == expected, (verb, name, args[name], default)
    help_text = parser.format_help()
    assert "%(default)" not in help_text and "(default" in help_text


def test_quickstart_help_shows_the_signature_defaults():
    help_text = " ".join(build_parser("quickstart")[0].format_help().split())
    assert "(default 1,2,4,8,16)" in help_text and "(default smollm2-135m)" in help_text
    assert inspect.signature(quickstart).parameters["eval_loops"].default == (1, 2, 4, 8, 16)


def test_the_parsers_light_copies_of_the_models_choices_agree_with_the_model():
    """The parsers read these without importing the model (torch): they must be the model's own."""
    import loopfit.convert
    import loopfit.loops
    import loopfit.model

    assert loopfit.loops.DRAFT_TOKENS == loopfit.model.DRAFT_TOKENS
    assert loopfit.convert.ADAPTER_INITS == loopfit.model.ADAPTER_INITS
    assert loopfit.convert.STATE_INITS == loopfit.model.STATE_INITS
    choices = {a.dest: a.choices for a in build_parser("convert")[0]._actions}
    assert choices["adapter_init"] == loopfit.model.ADAPTER_INITS and choices["state_init"] == loopfit.model.STATE_INITS
