"""Conversations as training tokens: the chat template renders them, the loss mask keeps the assistant turns.

    ids, mask = encode_chat(tokenizer, chat, template)   # mask[i] = 1 where token i is an assistant token

A conversation is rendered once whole; each assistant turn's characters are found by rendering the turns before
it with the generation prompt (`<|im_start|>assistant\\n`) and the turns through it, as TRL's assistant-only loss
and nanochat's chat SFT do. The mask covers the turn's text and its end-of-turn token (what the model must learn
to write, and to stop), not the template's headers, the user's or system's turns, nor the whitespace after a turn.
Tokens are matched to characters by the fast tokenizer's offsets, so the mask is exact where tokens cross the
edge of a turn.

Tokenizers without a chat template need one named: `chatml` or `plain` (below), or a Jinja file.
"""

from pathlib import Path

import numpy as np

from .. import LoopfitError

CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{{ message['role'] | capitalize + ': ' + message['content'] + '\\n\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}"
    ),
}


def resolve_template(tokenizer, name=None, what="the source"):
    """The Jinja text of the chat template to use: `name` (a CHAT_TEMPLATES key or a file), else the tokenizer's.
    Raises LoopfitError when neither exists."""
    if name:
        if name in CHAT_TEMPLATES:
            return CHAT_TEMPLATES[name]
        path = Path(name)
        if path.is_file():
            return path.read_text()
        raise LoopfitError(f"chat template '{name}' is neither a name ({', '.join(CHAT_TEMPLATES)}) nor a file: "
                           "fix --chat-template")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = template.get("default")
    if not template:
        raise LoopfitError(f"{what} holds conversations but tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has "
                           f"no chat template: name one with --chat-template ({', '.join(CHAT_TEMPLATES)} or a "
                           "Jinja file)")
    return template


def render(tokenizer, messages, template, add_generation_prompt=False):
    """The chat template's text of `messages` (a list of {role, content})."""
    try:
        return tokenizer.apply_chat_template(list(messages), chat_template=template, tokenize=False,
                                             add_generation_prompt=add_generation_prompt)
    except LoopfitError:
        raise
    except Exception as e:  # jinja raises TemplateError (and the template's own raise_exception) for what it refuses
        raise LoopfitError(f"the chat template refuses this conversation ({str(e).splitlines()[0][:160]}): "
                           "check its roles and order, or name another --chat-template") from None


def _generation_prompt(tokenizer, messages, template):
    try:
        return render(tokenizer, messages, template, add_generation_prompt=True)
    except LoopfitError:
        if messages:
            raise
        return ""  # a template that cannot render an empty conversation: the first turn starts the text


def assistant_spans(tokenizer, messages, template):
    """(text, [(start, end)]): the rendered conversation and the character span of each assistant turn."""
    messages = list(messages)
    text = render(tokenizer, messages, template)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = _generation_prompt(tokenizer, messages[:i], template)
        through = render(tokenizer, messages[: i + 1], template)
        if not (through.startswith(before) and text.startswith(through)):
            raise LoopfitError("the chat template does not render a conversation as its turns one after another "
                               "(turn " + str(i) + " changes what came before): name a --chat-template that does")
        end = len(through.rstrip())
        if end > len(before):
            spans.append((len(before), end))
    return text, spans


def encode_chat(tokenizer, chat, template):
    """(ids uint32, mask uint8) of a conversation: the template's tokens, mask 1 on assistant turns."""
    text, spans = assistant_spans(tokenizer, chat.messages, template)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    starts = np.asarray([s for s, _ in enc["offset_mapping"]], dtype=np.int64)
    mask = np.zeros(len(starts), dtype=np.uint8)
    for a, b in spans:
        mask[(starts >= a) & (starts < b)] = 1
    return np.asarray(enc["input_ids"], dtype=np.uint32), mask
