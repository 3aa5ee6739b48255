"""One name per idea: loops r are `--loops` / `--draft-loops` / `--eval-loops` / `--gsm8k-loops`, the recipe key
`recurrence.eval_loops` and the `"loops"` key of result rows. For one release the old spellings (`--steps` of eval
and generate, `--draft-steps`, `--eval-steps`, `--gsm8k-steps`, `recurrence.eval_steps`, rows with `"steps"`) are
still read, with one notice line; an old and a new spelling that disagree are refused with one line, rc 2."""

import json

import pytest
import tiny_models
import torch
import yaml

from loopfit.cli import build_parser, main, renamed_flags
from loopfit.train import config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def folders(smollm2_tokenizer, tmp_path_factory):
    """A tiny recurrent model whose greedy tokens change with r (mean adapter) and a tiny plain Llama."""
    root = tmp_path_factory.mktemp("vocabulary")
    tok = smollm2_tokenizer
    torch.manual_seed(0)
    tiny_models.recurrent(len(tok), eos_token_id=tok.eos_token_id, adapter_init="mean", state_init="zeros",
                          mean_recurrence=6).save_pretrained(root / "loop")
    torch.manual_seed(0)
    tiny_models.llama(len(tok), eos_token_id=tok.eos_token_id).save_pretrained(root / "plain")
    for name in ("loop", "plain"):
        tok.save_pretrained(root / name)
    (root / "text.txt").write_text("\n\n".join(f"The keeper climbed {n} stairs at dusk." for n in range(20)))
    return root


def notices(err):
    return [line for line in err.splitlines() if "is deprecated" in line]


# ------------------------------------------------------------------------------------------------ eval


def eval_args(folders, out):
    return ["eval", str(folders / "loop"), "--tasks", "loss", "--data", str(folders / "text.txt"), "--seq-len", "16",
            "--max-tokens", "64", "--batch-size", "2", "--out", str(out)]


def test_eval_old_steps_flag_gives_the_same_results_with_one_notice(folders, tmp_path, capsys):
    assert main([*eval_args(folders, tmp_path / "new"), "--loops", "1,3"]) == 0
    assert notices(capsys.readouterr().err) == []
    assert main([*eval_args(folders, tmp_path / "old"), "--steps", "1,3"]) == 0
    assert notices(capsys.readouterr().err) == [
        "loopfit eval: --steps is deprecated, use --loops (removed in the next release)"]
    new, old = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("new", "old"))
    assert new["loops"] == old["loops"] == [1, 3] and "steps" not in new
    assert {(r["loops"], r["metric"]) for r in new["rows"]} == {(1, "loss"), (3, "loss"), (1, "perplexity"),
                                                                 (3, "perplexity")}
    assert [r["value"] for r in new["rows"]] == [r["value"] for r in old["rows"]]


@pytest.mark.parametrize("flags", [["--steps", "1,2", "--loops", "1,4"], ["--loops=2", "--steps=4"],
                                   ["--loops", "4", "--draft-steps", "1", "--draft-loops", "2"]])
def test_eval_old_and_new_flag_disagreeing_is_one_line_rc2(folders, tmp_path, capsys, flags):
    assert main([*eval_args(folders, tmp_path / "out"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "disagree" in err[0] and "deprecated name of --" in err[0], err
    assert not (tmp_path / "out").exists()


def test_eval_old_and_new_flag_agreeing_is_accepted(folders, tmp_path, capsys):
    assert main([*eval_args(folders, tmp_path / "out"), "--steps", "2", "--loops", "2"]) == 0
    assert len(notices(capsys.readouterr().err)) == 1
    assert json.loads((tmp_path / "out" / "results.json").read_text())["loops"] == [2]


def test_eval_old_draft_steps_is_read_as_draft_loops(folders, tmp_path, capsys):
    """The old spelling reaches the same check as the new one, and the error names the new flag."""
    args = ["eval", str(folders / "plain"), "--tasks", "gsm8k_1shot", "--limit", "1", "--out", str(tmp_path / "o")]
    assert main([*args, "--draft-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "loopfit eval: --draft-steps is deprecated, use --draft-loops (removed in the next release)"
    assert err[-1].startswith("loopfit eval: error: --draft-loops needs a loopfit (recurrent) model")


@pytest.mark.parametrize("verb, old", [("eval", "--steps"), ("eval", "--draft-steps"), ("generate", "--steps"),
                                       ("generate", "--draft-steps"), ("quickstart", "--eval-steps"),
                                       ("quickstart", "--gsm8k-steps"), ("quickstart", "--draft-steps")])
def test_old_flags_are_not_in_help_or_the_parser(verb, old):
    parser, module = build_parser(verb)
    options = " ".join(a for action in parser._actions for a in action.option_strings)
    assert old not in options.split() and module.RENAMED_FLAGS[old] in options.split()
    assert f"  {old} " not in parser.format_help()  # named only in the description's deprecation note
    if verb == "quickstart":
        assert "--steps" in options.split()  # optimizer steps: not renamed


# ------------------------------------------------------------------------------------------------ generate


def test_generate_old_flags_print_the_same_tokens_with_notices(folders, capsys):
    base = ["generate", str(folders / "loop"), "--prompt", "Hello there", "--max-new-tokens", "6"]
    assert main([*base, "--loops", "6", "--draft-loops", "2"]) == 0
    new_out, new_err = capsys.readouterr()
    assert main([*base, "--steps", "6", "--draft-steps", "2"]) == 0
    old_out, old_err = capsys.readouterr()
    assert old_out == new_out and notices(new_err) == []
    assert notices(old_err) == ["loopfit generate: --steps is deprecated, use --loops (removed in the next release)",
                                "loopfit generate: --draft-steps is deprecated, use --draft-loops (removed in the "
                                "next release)"]
    assert "6 loops per token" in old_err and "drafted at 2 loops" in old_err
    assert main([*base, "--steps", "3"]) == 0  # r really reaches the model: 3 loops decode other tokens here
    assert capsys.readouterr().out != new_out


def test_generate_old_and_new_flag_disagreeing_is_refused(folders, capsys):
    assert main(["generate", str(folders / "loop"), "--prompt", "x", "--steps", "3", "--loops", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loopfit generate: error: --steps 3 and --loops 4 disagree (--steps is the deprecated name of "
                   "--loops): give only --loops"]


# ------------------------------------------------------------------------------------------------ quickstart


def test_quickstart_old_flags_set_the_new_settings():
    from loopfit.quickstart import _settings

    argv = ["--eval-steps", "1,3", "--gsm8k-steps", "2", "--draft-steps", "0", "--steps", "7"]
    parser, module = build_parser("quickstart")
    old = parser.parse_args(renamed_flags("quickstart", argv, module.RENAMED_FLAGS))
    new = parser.parse_args(["--eval-loops", "1,3", "--gsm8k-loops", "2", "--draft-loops", "0", "--steps", "7"])
    assert vars(old) == vars(new) and new.draft_loops == 0
    settings = _settings(new)
    assert settings["eval_steps"] == [1, 3] and settings["gsm8k_steps"] == [2] and settings["steps"] == 7


@pytest.mark.parametrize("old, new", [("--eval-steps", "--eval-loops"), ("--gsm8k-steps", "--gsm8k-loops")])
def test_quickstart_old_flag_reaches_the_check_that_names_the_new_one(tmp_path, capsys, old, new):
    assert main(["quickstart", old, "0", "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"loopfit quickstart: {old} is deprecated, use {new} (removed in the next release)",
                   f"loopfit quickstart: error: {new} must be positive integers like 1,2,4,8, got '0'"]
    assert not (tmp_path / "qs").exists()


def test_quickstart_old_and_new_flag_disagreeing_is_refused(tmp_path, capsys):
    assert main(["quickstart", "--draft-steps", "1", "--draft-loops", "2", "--out", str(tmp_path / "qs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--draft-steps 1 and --draft-loops 2 disagree" in err[0]
    assert not (tmp_path / "qs").exists()


# ------------------------------------------------------------------------------------------------ recipes


def test_old_recipe_key_is_read_with_one_notice(monkeypatch, capsys):
    monkeypatch.setattr(config, "_NOTIFIED", set())
    cfg = config.load_recipe({"recurrence": {"eval_steps": 3}})
    assert cfg.recurrence.eval_loops == 3 and "eval_steps" not in cfg.to_dict()["recurrence"]
    assert config.load_recipe(overrides=["--recurrence.eval_steps=5"]).recurrence.eval_loops == 5
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["loopfit: recipe key recurrence.eval_steps is deprecated, use recurrence.eval_loops (removed in "
                   "the next release)"]  # once per process
    # an old-name override still wins over a recipe file written with the new name (as the shipped ones are)
    cfg = config.load_recipe({"recurrence": {"eval_loops": 32}}, ["--recurrence.eval_steps=4"])
    assert cfg.recurrence.eval_loops == 4


@pytest.mark.parametrize("source, overrides", [({"recurrence": {"eval_steps": 3, "eval_loops": 4}}, []),
                                               ({}, ["--recurrence.eval_loops=4", "--recurrence.eval_steps=3"])])
def test_old_and_new_recipe_key_disagreeing_is_refused(source, overrides):
    with pytest.raises(config.LoopfitError, match="sets both recurrence.eval_steps .* and recurrence.eval_loops"):
        config.load_recipe(source, overrides)
    assert config.load_recipe({"recurrence": {"eval_steps": 4, "eval_loops": 4}}).recurrence.eval_loops == 4


def test_train_cli_reads_the_old_key_and_refuses_both(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(config, "_NOTIFIED", set())
    recipe = {"model": {"init_from": str(folders / "loop")}, "data": {"synthetic": "pattern", "seq_len": 16},
              "recurrence": {"mean": 2, "backprop": 1, "eval_steps": 3},
              "train": {"steps": 1, "batch_size": 2, "micro_batch_size": 2, "progress": False, "tensorboard": False,
                        "eval_batches": 1, "out_dir": str(tmp_path / "run")},
              "checkpoint": {"every": 0}}
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path)]) == 0
    assert "recipe key recurrence.eval_steps is deprecated" in capsys.readouterr().err
    saved = yaml.safe_load((tmp_path / "run" / "recipe.yaml").read_text())
    assert saved["recurrence"]["eval_loops"] == 3 and "eval_steps" not in saved["recurrence"]
    recipe["recurrence"]["eval_loops"] = 4
    path.write_text(yaml.safe_dump(recipe))
    assert main(["train", str(path), "--train.out_dir=" + str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the recipe sets both recurrence.eval_steps (3) and recurrence.eval_loops (4)" in err[0]
    assert not (tmp_path / "run2").exists()


# ------------------------------------------------------------------------------------------------ old results


def test_compare_and_plots_read_old_results_files(tmp_path, capsys):
    """A results.json written before the rename (r under "steps") compares beside a new one."""
    from loopfit.eval.plots import plot_sweep

    def results(name, key, values):
        rows = [{"task": "loss", key: r, "metric": "loss", "value": v, "n": 64} for r, v in values.items()]
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"model": name, "recurrent": True, "tokenizer": None, key: list(values),
                                    "rows": rows}))
        return path

    old = results("old", "steps", {1: 3.5, 4: 2.25})
    new = results("new", "loops", {1: 3.0, 2: 2.5})
    assert main(["compare", str(old), str(new), "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| task | metric | run | training FLOPs | r=1 | r=2 | r=4 |" in report
    assert "| loss | loss | old |  | 3.5 |  | 2.25 |" in report and "| loss | loss | new |  | 3 | 2.5 |  |" in report
    assert (tmp_path / "report" / "loops.png").stat().st_size > 0
    rows = json.loads(old.read_text())["rows"]
    assert plot_sweep(rows, tmp_path / "sweep.png").stat().st_size > 0


def test_lm_eval_model_args_take_loops_as_another_name_of_num_steps(folders):
    from loopfit.eval.harness import LoopfitLM

    lm = LoopfitLM.create_from_arg_string(f"pretrained={folders / 'loop'},loops=6,draft_loops=2", {})
    assert (lm.num_steps, lm.draft_steps) == (6, 2)
    lm = LoopfitLM.create_from_arg_string(f"pretrained={folders / 'loop'},num_steps=5,loops=5", {})
    assert (lm.num_steps, lm.draft_steps) == (5, None)
    with pytest.raises(ValueError, match="num_steps=6 and loops=4 disagree"):
        LoopfitLM.create_from_arg_string(f"pretrained={folders / 'loop'},num_steps=6,loops=4", {})
