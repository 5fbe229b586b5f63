"""Preference row formats (TRL's): standard (``prompt``/``chosen``/``rejected`` strings), implicit prompt
(``chosen``/``rejected`` strings holding whole dialogues, e.g. Anthropic HH) and conversational (lists of
``{"role", "content"}`` messages, with or without an explicit ``prompt`` list): each row to its prompt,
chosen and rejected texts."""

from __future__ import annotations

_HH_ASSISTANT = "\n\nAssistant:"


def extract_prompt(chosen, rejected):
    """Split an implicit prompt off a preference pair (TRL's ``extract_prompt``, with an HH-aware cut).

    Strings: the prompt is the longest common prefix. When that prefix holds ``"\\n\\nAssistant:"``
    (Anthropic HH dialogues) it is cut back to end right after the last one, so both completions
    start with the assistant's reply (the two replies may share a first word, which the longest common
    prefix would otherwise swallow). Without it, TRL's rule: the split moves back by one character
    when the character before it is a space, so the completions start with that space.

    Message lists (``{"role", "content"}`` dicts): the prompt is the longest common prefix of messages,
    the completions are the rest.

    Args:
        chosen, rejected: both ``str`` or both lists of message dicts.

    Returns:
        (prompt, chosen_completion, rejected_completion), of the inputs' type. A completion is empty
        when one input is a prefix of the other.

    Raises:
        ValueError: inputs that are not both strings or both lists.
    """
    if isinstance(chosen, str) and isinstance(rejected, str):
        split = _string_prompt_end(chosen, rejected)
    elif isinstance(chosen, list) and isinstance(rejected, list):
        split = _common_prefix_len(chosen, rejected)
    else:
        raise ValueError(
            f"chosen and rejected must both be str or both be message lists, got "
            f"{type(chosen).__name__} and {type(rejected).__name__}"
        )
    return chosen[:split], chosen[split:], rejected[split:]


def _common_prefix_len(a, b) -> int:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def _string_prompt_end(chosen: str, rejected: str) -> int:
    end = _common_prefix_len(chosen, rejected)
    marker = chosen.rfind(_HH_ASSISTANT, 0, end)
    if marker >= 0:
        return marker + len(_HH_ASSISTANT)
    if end > 0 and chosen[end - 1] == " ":
        return end - 1
    return end


def row_texts(index, explicit, prompt, chosen, rejected, tokenizer, conversational,
              parts: bool = False) -> tuple[str, str, str] | None:
    """(prompt, chosen, rejected) texts of one row, or None when its completions are identical.

    ``explicit``: the dataset has a prompt column; otherwise ``prompt`` is ignored and extracted. ``parts``: message
    contents may be lists of text and image parts (``check_messages``); ``tokenizer`` may then be a processor.
    """
    if conversational:
        return _conversation_texts(index, explicit, prompt, chosen, rejected, tokenizer, parts)
    return _string_texts(index, explicit, prompt, chosen, rejected)


def _string_texts(index, explicit, prompt, chosen, rejected):
    named = [("chosen", chosen), ("rejected", rejected)] + ([("prompt", prompt)] if explicit else [])
    for name, value in named:
        if not isinstance(value, str):
            raise ValueError(f"row {index}: {name} must be a str (standard format, as row 0), got {describe(value)}")
    if not explicit:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
    if chosen == rejected:
        return None
    # Whitespace is content (a few HH replies are a lone space: the annotator preferred silence); only an
    # empty completion leaves nothing to score.
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not completion:
            raise ValueError(f"row {index}: the {name} completion is empty")
    return prompt, chosen, rejected


def _conversation_texts(index, explicit, prompt, chosen, rejected, tokenizer, parts):
    check_messages(index, "chosen", chosen, parts)
    check_messages(index, "rejected", rejected, parts)
    if not explicit:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise ValueError(f"row {index}: chosen and rejected share no leading message, so there is no prompt")
    else:
        check_messages(index, "prompt", prompt, parts)
        if not prompt:
            raise ValueError(f"row {index}: prompt is an empty message list")
    if chosen == rejected:
        return None
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        if not any(message["content"] for message in completion):
            raise ValueError(f"row {index}: the {name} completion has no message with content")

    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    chosen_text, rejected_text = (
        _completion_text(index, name, prompt, prompt_text, completion, tokenizer)
        for name, completion in (("chosen", chosen), ("rejected", rejected))
    )
    if chosen_text == rejected_text:
        return None
    return prompt_text, chosen_text, rejected_text


def _completion_text(index, name, prompt, prompt_text, completion, tokenizer) -> str:
    full = tokenizer.apply_chat_template(prompt + completion, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            f"row {index}: the chat template's rendering of prompt + {name} does not start with its rendering of the "
            f"prompt (with the generation prompt), so the {name} completion cannot be cut out of it"
        )
    return full[len(prompt_text):]


def check_messages(index, name, messages, parts: bool = False) -> None:
    """Raises ``ValueError`` naming the row unless ``messages`` is a list of ``{"role", "content"}`` dicts whose
    role and content are strings, or with ``parts`` (vision rows, TRL's multimodal messages) whose content is a string
    or a list of ``{"type": "text", "text": str}`` and ``{"type": "image"}`` parts."""
    if not isinstance(messages, list):
        raise ValueError(
            f"row {index}: {name} must be a list of {{'role', 'content'}} messages (conversational format, as row 0), "
            f"got {describe(messages)}"
        )
    for position, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and (isinstance(content, str) or parts and isinstance(content, list) and all(map(_is_part, content)))):
            also = " (or a content list of text and image parts)" if parts else ""
            raise ValueError(
                f"row {index}: {name}[{position}] must be a dict with 'role' and 'content' strings{also}, "
                f"got {describe(message)}"
            )


def _is_part(part) -> bool:
    return isinstance(part, dict) and (part.get("type") == "image"
                                       or part.get("type") == "text" and isinstance(part.get("text"), str))


def describe(value, limit: int = 120) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(value).__name__} {text}"
