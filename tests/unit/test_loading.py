"""`loopfit.loading`, the one way in: one answer to "is this model recurrent?" for models, configs and folders,
and one tokenizer loader with one pad policy (as saved unless pad=True; the padding side stays the caller's)."""

import json

import pytest
import tiny_models
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from loopfit import LoopfitError
from loopfit.loading import is_recurrent, load, load_tokenizer


def _no_pad_tokenizer():
    """A real word-level tokenizer saved without a pad token."""
    raw = Tokenizer(models.WordLevel({"<eos>": 0, "[UNK]": 1, "hello": 2, "world": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<eos>", unk_token="[UNK]")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("loading")
    for name, model in (("loop", tiny_models.recurrent(4)), ("plain", tiny_models.llama(4))):
        model.save_pretrained(root / name)
        _no_pad_tokenizer().save_pretrained(root / name)
    return root


def test_is_recurrent_gives_one_answer_for_models_configs_dicts_and_folders(folders):
    loop, plain = tiny_models.recurrent(4), tiny_models.llama(4)
    assert [is_recurrent(x) for x in (loop, loop.config, loop.config.to_dict(), folders / "loop",
                                      str(folders / "loop"))] == [True] * 5
    assert [is_recurrent(x) for x in (plain, plain.config, plain.config.to_dict(), folders / "plain",
                                      folders / "missing", "smollm2-135m")] == [False] * 6
    assert is_recurrent(torch.compile(loop)) and not is_recurrent(torch.compile(plain))  # wrappers forward .config
    (folders / "torn").mkdir()
    (folders / "torn" / "config.json").write_text('{"model_type": "loop')
    assert not is_recurrent(folders / "torn")


def test_tokenizers_come_as_saved_and_pad_with_eos_only_when_asked(folders):
    as_saved = load_tokenizer(folders / "plain")
    assert as_saved.pad_token is None
    padded = load_tokenizer(folders / "plain", pad=True)
    assert padded.pad_token == "<eos>" and padded.padding_side == as_saved.padding_side
    # an object: padded in place
    assert load_tokenizer(as_saved, pad=True) is as_saved and as_saved.pad_token == "<eos>"
    padded.padding_side = "left"
    assert load_tokenizer(padded, pad=True).padding_side == "left"  # the caller's padding side is left alone


def test_load_pads_and_knows_recurrence_and_folder_tokenizers_are_saved_unchanged(folders):
    for name, recurrent in (("loop", True), ("plain", False)):
        model, tok = load(folders / name)
        assert is_recurrent(model) is recurrent and not model.training and tok.pad_token == "<eos>"
    saved = json.loads((folders / "plain" / "tokenizer_config.json").read_text())
    assert saved.get("pad_token") is None  # loading never wrote back into the folder


def test_a_folder_without_tokenizer_is_one_line_naming_the_fix(folders, tmp_path):
    tiny_models.llama(4).save_pretrained(tmp_path / "bare")
    with pytest.raises(LoopfitError, match=r"no tokenizer in .*bare.*save_pretrained") as e:
        load_tokenizer(tmp_path / "bare")
    assert "\n" not in str(e.value)
    with pytest.raises(LoopfitError, match="tokenizer 'nowhere' does not exist"):
        load_tokenizer("nowhere")


@pytest.mark.parametrize(("name", "key", "layers", "kind"), [
    ("loop", "num_core_layers", 3, "the model it describes needs 9 weight"),
    ("loop", "num_core_layers", 1, "the weights hold 9 the model it describes has no place for"),
    ("plain", "num_hidden_layers", 3, "the model it describes needs 9 weight"),
    ("plain", "num_hidden_layers", 1, "the weights hold 9 the model it describes has no place for")])
def test_a_config_whose_layer_counts_disagree_with_the_weights_is_refused(folders, tmp_path, name, key, layers, kind):
    import shutil

    folder = tmp_path / name
    shutil.copytree(folders / name, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = layers
    cfg.pop("layer_types", None)
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(LoopfitError, match=rf"weights in {folder} do not match its config.json: {kind}.* and 6 "
                                           r"more\); restore the config.json"):
        load(folder)
