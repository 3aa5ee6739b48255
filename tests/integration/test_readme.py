"""The README's commands work as written.

Every `loopfit ...`, `torchrun ... -m loopfit.cli ...`, `python -m loopfit.eval.harness ...` and `make ...` line
in the README's code blocks must parse with the real command-line parsers (a renamed flag fails here). The
block under "## The path" then runs end to end, in order, in an empty folder, on the real SmolLM2-135M, each
command with a few flags appended that make it short (fewer steps, documents and examples): SHORT below.
"""

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from loopfit.cli import VERBS, build_parser

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()

# appended to each command of the verb when the path runs in the test (README commands stay as users type them)
SHORT = {
    "analyze": ["--samples", "1", "--seq-len", "32", "--out", "analysis"],
    "convert": [],
    "prepare": ["--limit", "300"],
    "train": ["--train.steps=2", "--train.batch_size=2", "--train.micro_batch_size=2", "--data.seq_len=32",
              "--train.eval_every=0", "--checkpoint.every=2", "--train.progress=false", "--train.tensorboard=false",
              "--recurrence.mean=2", "--recurrence.backprop=1"],
    "eval": ["--limit", "1", "--max-new-tokens", "4", "--seq-len", "32", "--max-tokens", "64", "--batch-size", "1"],
    "compare": [],
    "generate": ["--max-new-tokens", "3"],
}


def code_blocks(text):
    """Contents of the fenced blocks without a language or marked as shell."""
    blocks, lang, lines = [], None, []
    for line in text.splitlines():
        if line.startswith("```"):
            if lang is None:
                lang, lines = line[3:].strip(), []
            else:
                if lang in ("", "sh", "bash", "shell"):
                    blocks.append("\n".join(lines))
                lang = None
        elif lang is not None:
            lines.append(line)
    return blocks


def commands(text, blocks=None):
    """Shell commands of the code blocks (continuations joined, comments dropped)."""
    out = []
    for block in blocks or code_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            if argv and (argv[0] in ("loopfit", "torchrun", "make")
                         or argv[:3] == ["python", "-m", "loopfit.eval.harness"]):
                out.append(argv)
    return out


def path_block():
    return commands(None, blocks=code_blocks(README.split("## The path", 1)[1])[:1])


def parse_loopfit(argv):
    verb = argv[0]
    assert verb in VERBS, f"README uses an unknown verb: {shlex.join(argv)}"
    parser, _ = build_parser(verb)
    try:
        parser.parse_args(argv[1:])
    except SystemExit as e:
        pytest.fail(f"README command does not parse ({e}): loopfit {shlex.join(argv)}")


def test_readme_has_commands_for_every_verb():
    used = {argv[1] for argv in commands(README) if argv[0] == "loopfit"}
    assert used >= set(VERBS) - {"quickstart"}, f"verbs without a README example: {set(VERBS) - used}"
    assert ["make", "quickstart"] in commands(README) and ["make", "test"] in commands(README)


def test_every_readme_command_parses():
    targets = set(re.findall(r"^([a-z-]+):", (ROOT / "Makefile").read_text(), re.M))
    found = commands(README)
    assert len(found) >= 20
    for argv in found:
        if argv[0] == "loopfit":
            parse_loopfit(argv[1:])
        elif argv[0] == "torchrun":
            assert "-m" in argv and argv[argv.index("-m") + 1] == "loopfit.cli", shlex.join(argv)
            parse_loopfit(argv[argv.index("-m") + 2:])
        elif argv[0] == "make":
            assert set(argv[1:]) <= targets, f"README names a make target the Makefile lacks: {shlex.join(argv)}"
        else:
            from lm_eval._cli.harness import HarnessCLI

            try:
                HarnessCLI()._parser.parse_args(["run", *argv[3:]])
            except SystemExit as e:
                pytest.fail(f"README lm-eval command does not parse ({e}): {shlex.join(argv)}")


@pytest.mark.real
def test_the_path_runs_end_to_end(tmp_path):
    steps = path_block()
    assert [a[1] for a in steps if a[0] == "loopfit"][:3] == ["analyze", "convert", "prepare"]
    for argv in steps:
        verb = argv[1]
        cmd = [sys.executable, "-m", "loopfit.cli", verb, *argv[2:], *SHORT[verb]]
        proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=900,
                              env={**__import__("os").environ, "OMP_NUM_THREADS": "2",
                                   "TOKENIZERS_PARALLELISM": "false"})
        assert proc.returncode == 0, f"{shlex.join(argv)} failed:\n{proc.stderr[-3000:]}"
    assert (tmp_path / "report" / "report.md").is_file()


def test_the_typical_path_of_loopfit_help_is_the_readmes():
    from loopfit.cli import EPILOG

    printed = [shlex.split(line) for line in EPILOG.splitlines() if line.strip().startswith("loopfit ")]
    assert len(printed) == 4 and all(argv in path_block() for argv in printed), printed


def test_the_python_api_the_readme_names_exists():
    import importlib

    names = re.findall(r"`(loopfit(?:\.\w+)+)`", README.split("every verb is also a Python function", 1)[1][:900])
    assert len(names) >= 10
    for dotted in names:
        module, _, attr = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), attr)), dotted


def test_every_flag_of_every_verb_is_described():
    for verb in VERBS:
        parser, _ = build_parser(verb)
        bare = [a.option_strings or [a.dest] for a in parser._actions if not a.help and a.dest != "help"]
        assert not bare, f"loopfit {verb} --help leaves {bare} undescribed"


def test_help_texts_carry_no_speed_up_figures():
    """Measured figures live in the README's Benchmarks and benchmarks/BENCHMARKS.md, with their conditions;
    a --help that quoted its own would drift from them."""
    for verb in VERBS:
        help_text = " ".join(build_parser(verb)[0].format_help().split())
        figures = re.findall(r"\b\d+(?:\.\d+)?x\b|\b\d+(?:\.\d+)?% (?:faster|slower|less|more|of the \w+ time)",
                             help_text)
        assert not figures, f"loopfit {verb} --help quotes {figures}: point to the README's Benchmarks instead"


def test_every_until_of_a_blend_is_listed_where_blends_are_documented():
    from loopfit.data.blend import TRIGGERS
    from loopfit.recipes import resolve, shipped
    from loopfit.train.config import describe_keys

    train_help = " ".join(describe_keys().split())
    phased = [text for text in (resolve(name).read_text() for name in shipped()) if "phases:" in text]
    assert len(phased) >= 7
    for kind in TRIGGERS:
        assert f"`{{{kind}: " in README, f"the README's blend section does not list until {kind}"
        assert f"{{{kind}: " in train_help, f"loopfit train --help (data.phases) does not list until {kind}"
        assert all(f"{{{kind}: " in text for text in phased), f"a shipped recipe with phases lacks until {kind}"
