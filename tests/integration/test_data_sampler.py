"""Blends and BlendSampler: determinism, exact resume, mixture, phase switches, rank shares, packing."""

import math
import warnings

import numpy as np
import pytest
import torch

from loopfit import LoopfitError
from loopfit.data import BlendSampler, load_blend, open_dataset, prepare

SEQ, BATCH = 16, 8


@pytest.fixture(scope="module")
def data(tmp_path_factory, smollm2_tokenizer):
    root = tmp_path_factory.mktemp("data")
    a = root / "a.jsonl"
    b = root / "b.jsonl"
    a.write_text("".join(f'{{"text": "Story {i}: the river ran past {i % 13} old mills and a bridge."}}\n'
                         for i in range(300)))
    b.write_text("".join(f'{{"text": "Q: what is {i} plus {i}? A: {2 * i}"}}\n' for i in range(300)))
    prepare([f"a={a}", f"b={b}"], smollm2_tokenizer, root / "prepared", holdout=0.05, progress=False)
    return root / "prepared"


def two_phase(until):
    return {"phases": [{"name": "heal", "weights": {"a": 1}, "until": until},
                       {"name": "mix", "weights": {"a": 3, "b": 1}}]}  # fmt: skip


def sampler(data, blend=None, **kw):
    kw = {"seed": 0, "total_steps": 100, **kw}
    return BlendSampler(load_blend(blend or {"weights": {"a": 0.5, "b": 0.5}}, data), SEQ, kw.pop("batch", BATCH), **kw)


def run(s, steps, lr=None):
    return [s.batch(t, lr_fraction=None if lr is None else lr(t)) for t in steps]


def cosine(t, total=100):
    return 0.5 * (1 + math.cos(math.pi * t / total))


def same(xs, ys):
    return len(xs) == len(ys) and all(torch.equal(x[k], y[k]) for x, y in zip(xs, ys) for k in x)


# ---------------------------------------------------------------- blends


@pytest.mark.parametrize("blend, match", [
    ({"weights": {"a": -1, "b": 2}}, "weight of 'a' is negative"),
    ({"weights": {"a": 0, "b": 0.0}}, "all weights are zero"),
    ({"weights": {"a": "lots"}}, "not a number"),
    ({"weights": {"a": 1, "c": 1}}, "names dataset 'c', which is not prepared.*prepared in .*: a, b"),
    ({"phases": [{"weights": {"a": 1}}, {"weights": {"b": 1}}]}, "needs 'until'"),
    ({"phases": [{"weights": {"a": 1}, "until": {"step": 5}}]}, "last phase runs to the end"),
    ({"phases": [{"weights": {"a": 1}, "until": {"epoch": 2}}, {"weights": {"b": 1}}]}, "'until' must be one of"),
    ({"phases": [{"weights": {"a": 1}, "until": {"lr_fraction": 1.5}}, {"weights": {"b": 1}}]}, "between 0 and 1"),
    ({"phases": [{"weights": {"a": 1}, "until": {"step": 9}}, {"weights": {"a": 1}, "until": {"step": 5}},
                 {"weights": {"b": 1}}]}, "must increase"),
    ({"wieghts": {"a": 1}}, "unknown key 'wieghts'"),
])  # fmt: skip
def test_bad_blends(data, blend, match):
    with pytest.raises(LoopfitError, match=match) as e:
        load_blend(blend, data)
    assert "\n" not in str(e.value)


def test_blend_yaml_and_normalised_weights(data, tmp_path):
    path = tmp_path / "blend.yaml"
    path.write_text("phases:\n  - weights: {a: 9}\n    until: {fraction: 0.5}\n  - weights: {a: 9, b: 1}\n"
                    f"datasets:\n  b: {data / 'b'}\n")  # fmt: skip
    blend = load_blend(path, data)
    assert blend.phases[1].weights == {"a": 0.9, "b": 0.1} and blend.phases[0].until == ("fraction", 0.5)
    assert blend.datasets == {"a": data / "a", "b": data / "b"}
    with pytest.raises(LoopfitError, match="does not exist"):
        load_blend(tmp_path / "nope.yaml", data)


# ---------------------------------------------------------------- sampling


def test_deterministic_and_seeded(data):
    xs = run(sampler(data), range(5))
    assert same(xs, run(sampler(data), range(5)))
    assert not same(xs, run(sampler(data, seed=1), range(5)))
    assert same([sampler(data).batch(3)], [xs[3]])  # batch(step) does not depend on earlier calls
    x = xs[0]
    assert x["input_ids"].shape == (BATCH, SEQ) and x["input_ids"].dtype == torch.long
    assert torch.equal(x["labels"], x["input_ids"])


def test_resume_equals_uninterrupted(data):
    blend = two_phase({"lr_fraction": 0.6})
    full = sampler(data, blend)
    expected = run(full, range(60), cosine)
    assert full.state_dict()["phase_starts"] == [0, 44]  # cosine(44) <= 0.6 < cosine(43)

    first = sampler(data, blend)
    run(first, range(45), cosine)
    state = first.state_dict()
    resumed = sampler(data, blend, seed=0)
    resumed.load_state_dict(state)
    assert same(run(resumed, range(45, 60), cosine), expected[45:])
    # Resume before the switch too, and on a different number of ranks: the global stream is the same.
    early = sampler(data, blend)
    run(early, range(20), cosine)
    halves = [sampler(data, blend, rank=r, world_size=2) for r in range(2)]
    for h in halves:
        h.load_state_dict(early.state_dict())
    for t in range(20, 60):
        parts = [h.batch(t, cosine(t)) for h in halves]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), expected[t]["input_ids"])


def test_state_from_another_blend_is_refused(data):
    state = sampler(data).state_dict()
    with pytest.raises(LoopfitError, match="saved with blend="):
        sampler(data, {"weights": {"a": 1}}).load_state_dict(state)
    with pytest.raises(LoopfitError, match="saved with seq_len=16"):
        BlendSampler(load_blend({"weights": {"a": 0.5, "b": 0.5}}, data), 32, BATCH).load_state_dict(state)


def test_mixture_matches_weights(data):
    s = sampler(data, {"weights": {"a": 0.7, "b": 0.3}}, batch=10, max_epochs=100)
    picks = np.concatenate([s.batch(t)["dataset"].numpy() for t in range(300)])
    share_a = np.mean(picks == s.dataset_names.index("a"))
    assert abs(share_a - 0.7) < 0.01  # systematic sampling: within one slot per step of the weights
    per_step = [np.sum(s.batch(t)["dataset"].numpy() == 0) for t in range(50)]
    assert set(per_step) <= {7}  # 0.7 * 10 is whole: every batch holds exactly 7 from 'a'
    odd = sampler(data, {"weights": {"a": 0.55, "b": 0.45}}, batch=10, max_epochs=100)
    counts = [np.sum(odd.batch(t)["dataset"].numpy() == 0) for t in range(400)]
    assert set(counts) == {5, 6} and abs(np.mean(counts) - 5.5) < 0.15


def test_every_window_once_per_epoch(data):
    s = sampler(data, {"weights": {"a": 1}}, max_epochs=100)
    a = open_dataset(data / "a")
    windows = a.num_tokens // SEQ
    rows = []
    for t in range(-(-windows // BATCH)):
        _, draws = s.plan(t)
        ids = s.batch(t)["input_ids"].numpy()
        rows += [tuple(r) for r, k in zip(ids, draws) if k < windows]  # the first epoch's draws
    assert len(rows) == windows
    stream = a.tokens(0, a.num_tokens)
    candidates = [sorted(tuple(stream[o + i * SEQ : o + (i + 1) * SEQ]) for i in range(windows))
                  for o in range(a.num_tokens - windows * SEQ + 1)]  # fmt: skip
    assert sorted(rows) in candidates  # all windows of one offset, each exactly once


@pytest.mark.parametrize("until, switch", [
    ({"step": 17}, 17),
    ({"fraction": 0.3}, 30),
    ({"lr_fraction": 0.2}, 71),  # cosine over 100 steps decays to lr_start/5 at step 71 (the paper's switch)
])  # fmt: skip
def test_phase_switch_step(data, until, switch):
    s = sampler(data, two_phase(until))
    phases = [s.phase_at(t, cosine(t)) for t in range(100)]
    assert phases.index(1) == switch and phases[switch:] == [1] * (100 - switch)
    heal = [s.batch(t, cosine(t))["dataset"] for t in range(switch - 3, switch)]
    assert all((x == s.dataset_names.index("a")).all() for x in heal)
    # Known in advance from the schedule, the lr switch needs no lr_fraction per call.
    if "lr_fraction" in until:
        ahead = sampler(data, two_phase(until), lr_fraction_at=cosine)
        assert ahead.phase_at(99) == 1 and ahead.state_dict()["phase_starts"] == [0, switch]
        assert ahead.report()[0]["estimated"] is False
        with pytest.raises(LoopfitError, match="pass batch\\(step, lr_fraction="):
            sampler(data, two_phase(until)).batch(0)


def test_rank_shares_are_disjoint_and_complete(data):
    whole = run(sampler(data), range(6))
    for world in (2, 4, 8):
        ranks = [run(sampler(data, rank=r, world_size=world), range(6)) for r in range(world)]
        for t in range(6):
            assert torch.equal(torch.cat([ranks[r][t]["input_ids"] for r in range(world)]), whole[t]["input_ids"])
    with pytest.raises(LoopfitError, match="divide evenly"):
        sampler(data, world_size=3)


def test_docs_packing(data):
    long = 48  # longer than any one document here, so rows hold whole documents
    s = BlendSampler(load_blend({"weights": {"a": 1, "b": 1}}, data), long, BATCH, pack="docs")
    ds = {n: open_dataset(data / n) for n in s.dataset_names}
    eos = ds["a"].eos_token_id
    assert max(np.diff(ds["a"].doc_ends)) < long < 3 * min(np.diff(ds["a"].doc_ends))
    for t in range(4):
        x = s.batch(t)
        assert set(x) == {"input_ids", "labels", "dataset"}
        for row, label, d in zip(x["input_ids"], x["labels"], x["dataset"]):
            real = int((label != -100).sum())
            assert (label[:real] == row[:real]).all() and (row[real:] == eos).all()
            assert row[real - 1] == eos  # whole documents only: the last real token ends one
            assert row[0] == ds[s.dataset_names[d]].tokens(0, 1)[0]  # every row starts a document ("Story"/"Q")
    cut = sampler(data, {"weights": {"a": 1}}, pack="docs").batch(0)  # documents longer than seq_len are cut
    assert (cut["labels"] != -100).all()
    with pytest.raises(LoopfitError, match="unknown pack"):
        sampler(data, pack="rows")


def test_epoch_report_and_repeat_warning(data):
    a = open_dataset(data / "a").num_tokens // SEQ
    with pytest.warns(UserWarning, match="dataset 'a' will be repeated .* times \\(limit 2"):
        s = sampler(data, {"weights": {"a": 1}}, total_steps=3 * a // BATCH, max_epochs=2)
    [row] = s.report()
    assert abs(row["epochs"] - 3) < 0.05 and row["tokens_available"] == open_dataset(data / "a").num_tokens
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = sampler(data, {"weights": {"a": 1}}, total_steps=None, max_epochs=2)
        for t in range(2 * a // BATCH - 1):
            quiet.plan(t)
        with pytest.raises(UserWarning, match="dataset 'a' is now repeated"):
            for t in range(2 * a // BATCH - 1, 2 * a // BATCH + 2):
                quiet.plan(t)


def test_too_little_data(data):
    with pytest.raises(LoopfitError, match="fewer than seq_len"):
        BlendSampler(load_blend({"weights": {"a": 1}}, data), 10**7, 2)
    with pytest.raises(LoopfitError, match="pass total_steps"):
        BlendSampler(load_blend(two_phase({"fraction": 0.5}), data), SEQ, 2)
