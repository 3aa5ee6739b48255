"""Which parameters train (`train.trainable`), and when.

A set is `all`, `adapter` (the recurrent model's adapter), `core` (the looped blocks), `adapter+core`, or `lora`
(the low-rank factors of the core's linear layers). A frozen parameter has requires_grad off: it gets no
gradient, no optimizer state and no weight decay. The optimizers are built over every parameter that trains in
some phase, so the Muon / AdamW split follows the selection.

Phases: `adapter:0.1,all` trains the adapter alone for the first 10% of the steps, then everything (a phase
ends at a fraction of train.steps if its end is < 1, else at that step; the last phase has no end). Healing a
converted model this way first fits the new adapter to the intact pretrained layers around it, as the
retrofitting authors' adapter-only runs do, before the pretrained weights move.
"""

from .. import LoopfitError

SETS = ("all", "adapter", "core", "adapter+core", "lora")
PREFIXES = {"adapter": ("model.adapter.",), "core": ("model.core.",), "adapter+core": ("model.adapter.", "model.core.")}


def parse_phases(text, steps):
    """'adapter:0.1,all' -> [('adapter', 100), ('all', steps)] for steps=1000: (set, first step after the phase)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not parts:
        raise LoopfitError(f"train.trainable is {text!r}: choose one of {', '.join(SETS)}, or phases like "
                           "adapter:0.1,all")
    phases, last_end = [], 0
    for i, part in enumerate(parts):
        name, _, until = part.partition(":")
        if name not in SETS:
            raise LoopfitError(f"train.trainable names {name!r}: choose among {', '.join(SETS)} (phases like "
                               "adapter:0.1,all)")
        if i == len(parts) - 1:
            if until:
                raise LoopfitError(f"train.trainable's last phase {part!r} has an end: the last phase runs to the end "
                                   "of training, write it without ':'")
            end = steps
        else:
            try:
                value = float(until)
            except ValueError:
                raise LoopfitError(f"train.trainable phase {part!r} needs an end, like {name}:0.1 (a fraction of the "
                                   "steps) or {name}:100 (a step)") from None
            end = round(value * steps) if value < 1 else int(value)
            if not last_end < end < steps:
                raise LoopfitError(f"train.trainable phase {part!r} ends at step {end}: phase ends must increase and "
                                   f"lie between step 1 and train.steps ({steps})")
        phases.append((name, end))
        last_end = end
    return phases


def phase_at(phases, step):
    """The set that trains at 0-based `step`."""
    for name, end in phases:
        if step < end:
            return name
    return phases[-1][0]


def is_lora(name):
    """A LoRA factor: shared (lora_A / lora_B) or per loop (loop_lora_A / loop_lora_B)."""
    return name.rsplit(".", 1)[-1] in ("lora_A", "lora_B", "loop_lora_A", "loop_lora_B")


def selected(model, name):
    """Names of the parameters of `model` (unwrapped) that set `name` trains."""
    names = [n for n, _ in model.named_parameters()]
    if name == "all":
        return set(names)
    if name == "lora":
        return {n for n in names if is_lora(n)}
    return {n for n in names if n.startswith(PREFIXES[name])}


def check(model, phases, recurrent):
    """Refuse a set that selects no parameter of this model (before any training work)."""
    for name, _ in phases:
        if name in ("adapter", "core", "adapter+core") and not recurrent:
            raise LoopfitError(f"train.trainable {name} needs a recurrent loopfit model: model.init_from is a plain "
                               "model (no adapter or core); use all")
        if not selected(model, name):
            hint = (" (it has no LoRA factors: set lora.rank, see `loopfit train --help`)" if name == "lora" else "")
            raise LoopfitError(f"train.trainable {name} selects no parameter of this model{hint}: choose another set")


def apply(model, name):
    """Freeze every parameter outside set `name`; returns how many parameters (elements) train."""
    keep = selected(model, name)
    count = 0
    for n, p in model.named_parameters():
        p.requires_grad_(n in keep)
        count += p.numel() if n in keep else 0
    return count


def union(model, phases):
    """Names of the parameters some phase trains (the optimizers are built over all of them)."""
    return set().union(*(selected(model, name) for name, _ in phases))
