"""SFT data: TRL's SFT row formats into token ids and labels, and padding-free packing of whole sequences.

Formats (TRL 1.16's, detected from the columns): language modelling (``dataset_text_field``, default ``text``),
prompt-completion (``prompt`` + ``completion``, strings or message lists), conversational (``messages``), and, for
SFT before DPO on the same file, preference rows (``chosen`` is the completion: an explicit ``prompt``, or an
implicit one split off with ``extract_prompt``).
"""

from __future__ import annotations

import bisect
import logging
from collections import Counter

import datasets

from .formats import check_messages, describe, extract_prompt
from .packing import IGNORE_INDEX, Grouping, PackedBatch, Segment, TokenBudgetBatchSampler, pack

logger = logging.getLogger(__name__)

_DROP = "_drop"


def sft_format(column_names: list[str], dataset_text_field: str = "text") -> str:
    """``"prompt_completion"``, ``"preference"``, ``"messages"`` or ``"text"``, from a dataset's columns.

    Raises:
        ValueError: none of the formats' columns (the present ones named).
    """
    columns = set(column_names)
    if {"prompt", "completion"} <= columns:
        return "prompt_completion"
    if "chosen" in columns and ("prompt" in columns or "rejected" in columns):
        return "preference"
    if "messages" in columns:
        return "messages"
    if dataset_text_field in columns:
        return "text"
    raise ValueError(f"no SFT columns: expected '{dataset_text_field}' (language modelling), 'prompt' + 'completion', "
                     f"'messages', or preference rows ('chosen' with 'prompt' or 'rejected'); "
                     f"columns present: {sorted(columns)}")


def tokenize_sft(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    dataset_text_field: str = "text",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool | None = None,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    eos_token: str | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise SFT rows into ``input_ids`` and ``labels`` (the token ids, ``-100`` where no loss is taken), as TRL
    1.16's ``SFTTrainer._prepare_dataset``.

    Strings are tokenised with the tokenizer's special tokens and end with ``eos_token`` (default the tokenizer's;
    appended to a text or completion that lacks it); message lists are rendered with the chat template and
    tokenised without special tokens. A prompt-completion row's completion starts where the prompt's tokens and
    the whole row's diverge (TRL's ``common_prefix_length``; a conversational prompt rendered with the generation
    prompt).

    Loss masks: ``completion_only_loss`` (None = True) keeps the completion tokens of prompt-completion and
    preference rows; ``assistant_only_loss`` (None = ``completion_only_loss is not False`` for ``messages`` rows,
    False otherwise; TRL's default is False) keeps the assistant turns of conversations. Assistant spans come from
    the template itself, without ``{% generation %}`` tags: turn i spans from the end of the rendering of messages
    [:i] with the generation prompt to the end of the rendering of messages [:i + 1] (its content and end-of-turn
    tokens); a token is in it when its first character is.

    Sequences longer than ``max_length`` keep their first (``"keep_start"``) or last (``"keep_end"``) tokens and
    are counted; a sequence left with no loss token is dropped and counted.

    Returns:
        (dataset with exactly ``input_ids`` and ``labels``, lists of int64, in input order minus the drops;
        report ``{"rows", "kept", "truncated" (kept sequences that were cut), "no_loss_tokens" (dropped)}``, also
        logged).

    Raises:
        ValueError: no SFT columns; a malformed row (its index named: a value of another type than row 0's, a
            message that is not a ``{"role", "content"}`` dict, an empty completion or conversation); message lists
            and a tokenizer without a chat template; a template whose renderings of message prefixes are not
            prefixes of the whole conversation; assistant-only loss with a slow tokenizer (no offsets);
            ``assistant_only_loss`` on string rows; bad limits; no sequence left.
    """
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length must be an int >= 2 or None, got {max_length!r}")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    if len(dataset) == 0:
        raise ValueError("dataset has no rows")
    fmt = sft_format(dataset.column_names, dataset_text_field)
    columns = {"prompt_completion": ["prompt", "completion"], "messages": ["messages"], "text": [dataset_text_field],
               "preference": [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]}[fmt]
    first = dataset.select_columns(columns)[0]
    conversational = isinstance(first[columns[0] if fmt != "preference" else "chosen"], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError("message lists need a tokenizer with a chat template; this one has none")
    if assistant_only_loss and not conversational:
        raise ValueError("assistant_only_loss needs conversational rows (message lists); these rows are strings")
    if assistant_only_loss is None:
        assistant_only_loss = fmt == "messages" and completion_only_loss is not False
    if assistant_only_loss and not getattr(tokenizer, "is_fast", False):
        raise ValueError("assistant-only loss maps assistant turns to tokens by character offsets, which needs a "
                         "fast tokenizer (tokenizer.is_fast)")
    mapped = dataset.select_columns(columns).map(
        _tokenize_rows, batched=True, with_indices=True, remove_columns=columns, num_proc=num_proc,
        features=datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int64")),
                                    "labels": datasets.Sequence(datasets.Value("int64")),
                                    _DROP: datasets.Value("string")}),
        fn_kwargs=dict(tokenizer=tokenizer, fmt=fmt, field=columns[0], conversational=conversational,
                       completion_only=completion_only_loss is not False, assistant_only=assistant_only_loss,
                       max_length=max_length, keep_start=truncation_mode == "keep_start",
                       eos=eos_token if eos_token is not None else tokenizer.eos_token),
        desc="Tokenising SFT rows",
    )
    reasons = Counter(mapped[_DROP])
    report = {"rows": len(dataset), "kept": len(dataset) - reasons["no_loss_tokens"], "truncated": reasons["truncated"],
              "no_loss_tokens": reasons["no_loss_tokens"]}
    logger.info("tokenised %d SFT rows: kept %d, truncated %d to max_length, dropped %d without loss tokens",
                report["rows"], report["kept"], report["truncated"], report["no_loss_tokens"])
    if report["kept"] == 0:
        raise ValueError(f"no sequences left after tokenisation: {report}")
    kept = mapped.filter(lambda reason: [r != "no_loss_tokens" for r in reason], batched=True, input_columns=_DROP,
                         num_proc=num_proc, desc="Dropping sequences without loss tokens")
    return kept.remove_columns(_DROP), report


def _tokenize_rows(batch, indices, *, tokenizer, fmt, field, conversational, completion_only, assistant_only,
                   max_length, keep_start, eos):
    """``datasets.map`` body: one row at a time into (ids, 0/1 loss mask), then labels, truncation and the drop marker."""
    out = {"input_ids": [], "labels": [], _DROP: []}
    for offset, index in enumerate(indices):
        row = {name: values[offset] for name, values in batch.items()}
        if fmt == "messages":
            ids, mask = _conversation(index, row[field], tokenizer, assistant_only)
        elif fmt == "text":
            ids = tokenizer(_with_eos(index, field, row[field], eos))["input_ids"]
            mask = [1] * len(ids)
        else:
            prompt, completion = _prompt_completion(index, fmt, row, conversational)
            ids, mask = _prompt_and_completion(index, prompt, completion, tokenizer, conversational, completion_only,
                                               assistant_only, eos)
        reason = ""
        if max_length is not None and len(ids) > max_length:
            cut = slice(None, max_length) if keep_start else slice(-max_length, None)
            ids, mask, reason = ids[cut], mask[cut], "truncated"
        if not any(mask[1:]):   # the first token is never a target
            reason = "no_loss_tokens"
        out["input_ids"].append(ids)
        out["labels"].append([t if m else IGNORE_INDEX for t, m in zip(ids, mask)])
        out[_DROP].append(reason)
    return out


def _with_eos(index, name, text, eos):
    if not isinstance(text, str):
        raise ValueError(f"row {index}: {name} must be a str (as row 0), got {describe(text)}")
    if not text:
        raise ValueError(f"row {index}: {name} is empty")
    return text if eos is None or text.endswith(eos) else text + eos


def _prompt_completion(index, fmt, row, conversational):
    """(prompt, completion) of a prompt-completion or preference row (``chosen`` is the completion)."""
    if fmt == "prompt_completion":
        prompt, completion = row["prompt"], row["completion"]
    elif "prompt" in row and isinstance(row["prompt"], list) == conversational:
        prompt, completion = row["prompt"], row["chosen"]
    else:   # implicit prompt (Anthropic HH), or a string prompt beside message lists (UltraFeedback)
        prompt, completion, _ = extract_prompt(row["chosen"], row["rejected"])
    for name, value in (("prompt", prompt), ("completion", completion)):
        if conversational:
            check_messages(index, name, value)
        elif not isinstance(value, str):
            raise ValueError(f"row {index}: {name} must be a str (standard format, as row 0), got {describe(value)}")
    if not completion:
        raise ValueError(f"row {index}: the completion is empty")
    return prompt, completion


def _prompt_and_completion(index, prompt, completion, tokenizer, conversational, completion_only, assistant_only, eos):
    if conversational:
        prompt_ids = _encode(tokenizer, _render(tokenizer, prompt, True))["input_ids"]
        ids, mask = _conversation(index, prompt + completion, tokenizer, assistant_only)
    else:
        prompt_ids = tokenizer(prompt)["input_ids"]
        ids = tokenizer(prompt + _with_eos(index, "completion", completion, eos))["input_ids"]
        mask = [1] * len(ids)
    if completion_only:
        start = next((i for i, (a, b) in enumerate(zip(prompt_ids, ids)) if a != b), min(len(prompt_ids), len(ids)))
        mask = [0] * start + mask[start:]
    return ids, mask


def _render(tokenizer, messages, generation_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _encode(tokenizer, text, offsets=False):
    return tokenizer(text, add_special_tokens=False, return_offsets_mapping=offsets)


def _conversation(index, messages, tokenizer, assistant_only) -> tuple[list[int], list[int]]:
    """Token ids of a rendered conversation and its loss mask (all ones, or the assistant turns' tokens)."""
    check_messages(index, "messages", messages)
    if not messages:
        raise ValueError(f"row {index}: messages is an empty list")
    text = _render(tokenizer, messages)
    encoded = _encode(tokenizer, text, offsets=assistant_only)
    if not assistant_only:
        return encoded["input_ids"], [1] * len(encoded["input_ids"])
    spans = []
    for turn, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before, through = _render(tokenizer, messages[:turn], True) if turn else "", _render(tokenizer, messages[:turn + 1])
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError(f"row {index}: the chat template renders messages[:{turn}] (with the generation prompt) "
                             f"or messages[:{turn + 1}] differently from the start of the whole conversation, so "
                             f"assistant turn {turn} cannot be located; pass assistant_only_loss=False")
        spans.append((len(before), len(through)))
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


class SequenceGrouping(Grouping):
    """An SFT row as one document: ``input_ids``, scored where ``labels`` (``tokenize_sft``'s; without them every
    token after the first) is not ``IGNORE_INDEX``."""

    def segments(self, row: dict, index: int) -> list[Segment]:
        return [Segment(row["input_ids"], row.get("labels", row["input_ids"]))]

    def length(self, row: dict) -> int:
        return len(row["input_ids"])


SEQUENCES = SequenceGrouping()


def pack_sequences(rows: list[dict]) -> PackedBatch:
    """``pack`` with ``SequenceGrouping``: one padding-free stream of whole sequences, ``position_ids`` restarting per
    sequence, ``logit_index`` the positions whose next token has a label, ``targets`` those labels,
    ``label_cu_seqlens`` each sequence's span in them."""
    return pack(rows, SEQUENCES)


class BestFitBatchSampler(TokenBudgetBatchSampler):
    """Micro-batches of whole sequences under ``max_tokens`` by best-fit decreasing (TRL's ``bfd`` packing, without
    its truncation at the budget): longest first, each into the fullest micro-batch it still fits, else a new one.
    The micro-batches are formed once; each epoch visits them in a new seeded order (as ``TokenBudgetBatchSampler``).

    Raises:
        ValueError: a sequence longer than ``max_tokens`` (named by index), or no sequences.
    """

    def __init__(self, lengths: list[int], max_tokens: int, *, shuffle: bool = True, seed: int = 0):
        if not lengths:
            raise ValueError("no sequences to batch")
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > max_tokens:
            raise ValueError(f"max_tokens_per_batch={max_tokens} is smaller than sequence {longest} "
                             f"({lengths[longest]} tokens): raise the budget or lower max_length")
        self.shuffle, self.seed, self.epoch = shuffle, seed, 0
        self.batches: list[list[int]] = []
        free: list[tuple[int, int]] = []   # (free tokens, batch number), sorted
        for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
            slot = bisect.bisect_left(free, (lengths[i], -1))
            if slot == len(free):
                self.batches.append([])
                room, batch = max_tokens, len(self.batches) - 1
            else:
                room, batch = free.pop(slot)
            self.batches[batch].append(i)
            bisect.insort(free, (room - lengths[i], batch))
