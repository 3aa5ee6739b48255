"""`loopfit --help`, `loopfit VERB --help` and `loopfit --version` start at once: neither torch nor transformers is
imported, and the "loopfit" model type is still known to transformers' Auto classes whenever transformers is
imported."""

import subprocess
import sys

import pytest

from loopfit.cli import VERBS

PROBE = """
import sys
from loopfit.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers") if m in sys.modules), file=sys.stderr)
"""


@pytest.mark.parametrize("argv", [["--help"], ["--version"], []])
def test_top_level_help_and_version_import_neither_torch_nor_transformers(argv):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    assert "loopfit" in proc.stdout


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_each_verbs_help_imports_neither_torch_nor_transformers(verb):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(argv=[verb, "--help"])], capture_output=True,
                          text=True, timeout=60)
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr
    assert proc.stdout.startswith(f"usage: loopfit {verb}") and "--help" in proc.stdout, proc.stdout[:500]


@pytest.mark.parametrize("first", ["import loopfit; import transformers",
                                   "import transformers; import loopfit",
                                   "from loopfit.model import LoopfitConfig",
                                   "from loopfit import LoopfitForCausalLM"])
def test_the_auto_classes_know_loopfit_whatever_is_imported_first(first):
    code = (f"{first}\nfrom transformers import AutoConfig, AutoModelForCausalLM\n"
            "cfg = AutoConfig.for_model('loopfit', vocab_size=8, hidden_size=8, intermediate_size=16, "
            "num_attention_heads=2, num_key_value_heads=1)\n"
            "print(type(AutoModelForCausalLM.from_config(cfg)).__name__)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.stdout.strip() == "LoopfitForCausalLM", proc.stderr[-2000:]
