"""Tokenisation: preference rows into (prompt, chosen, rejected) token ids, prompt-only rows into prompt ids,
with TRL's truncation."""

from __future__ import annotations

import logging
from collections import Counter

import datasets

from .formats import check_messages, describe, row_texts

logger = logging.getLogger(__name__)

_TRUNCATION_MODES = ("keep_end", "keep_start")
_IDS_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_DROP = "_drop"


def tokenize_pairs(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    max_prompt_length: int | None = 512,
    truncation_mode: str = "keep_end",
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise preference rows into prompt, chosen and rejected token ids.

    The format is detected from the columns and row 0: ``chosen`` a list -> conversational, else
    standard; a ``prompt`` column -> explicit prompt, else implicit (``extract_prompt``), and as in
    TRL a string prompt beside message-list completions is ignored (implicit). Other columns are
    ignored. Conversational rows are rendered with the tokenizer's chat template: the
    prompt with the generation prompt, each completion as the rendering of prompt + completion minus
    the prompt's rendering. Prompt and completions are tokenised separately without special tokens;
    standard-format completions get ``tokenizer.eos_token_id`` appended (conversational ones end
    their turn through the template).

    Truncation (TRL's order): a prompt longer than ``max_prompt_length`` keeps its last
    (``"keep_end"``) or first (``"keep_start"``) tokens; then a pair whose prompt has at least
    ``max_length`` tokens is dropped, and otherwise each completion keeps its first
    ``max_length - len(prompt)`` tokens. Pairs whose completions are identical (as text, after
    extraction or rendering) are dropped.

    Args:
        dataset: rows in one of TRL's preference formats.
        tokenizer: a Hugging Face tokenizer; with a chat template for conversational data.
        max_length, max_prompt_length: token limits, positive ints or None (no limit).
        truncation_mode: ``"keep_end"`` or ``"keep_start"``, for the prompt.
        num_proc: worker processes for ``datasets.map``.

    Returns:
        (pairs, report): ``pairs`` has exactly the columns ``prompt_input_ids``, ``chosen_input_ids``,
        ``rejected_input_ids`` (lists of int64), in input order minus the dropped rows; ``report`` is
        ``{"rows", "kept", "prompt_too_long", "identical"}`` (also logged at INFO).

    Raises:
        ValueError: a missing ``chosen``/``rejected`` column (missing and present columns named); a
            malformed row (its index named): a value of the wrong type, a message that is not a dict
            with ``role`` and ``content`` strings, an empty completion (whitespace counts as content), an empty
            prompt message list, a template whose prompt rendering is not a prefix of the full
            rendering; conversational data and a tokenizer without a chat template; standard data
            and no ``eos_token_id``; bad limits or truncation mode; no pairs left after filtering.
    """
    _check_limits(max_length, max_prompt_length, truncation_mode)
    columns, conversational = pair_columns(dataset)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational data needs a tokenizer with a chat template; this one has none")
    if not conversational and tokenizer.eos_token_id is None:
        raise ValueError("standard-format completions end with eos_token_id, and this tokenizer has none")
    return map_pairs(dataset.select_columns(columns), _tokenize_batch, num_proc=num_proc, fn_kwargs=dict(
        tokenizer=tokenizer, conversational=conversational, max_length=max_length,
        max_prompt_length=max_prompt_length, truncation_mode=truncation_mode))


def pair_columns(dataset: datasets.Dataset) -> tuple[list[str], bool]:
    """The columns of a preference dataset that tokenisation reads (prompt if explicit, chosen, rejected), and whether
    its rows are conversational (row 0's ``chosen`` is a list).

    Raises:
        ValueError: a missing ``chosen``/``rejected`` column, no rows.
    """
    columns = _input_columns(dataset)
    first = dataset.select_columns(columns)[0]
    conversational = isinstance(first["chosen"], list)
    if conversational and isinstance(first.get("prompt"), str):
        # A string prompt beside message-list completions (HuggingFaceH4/ultrafeedback_binarized) repeats the
        # first user turn; TRL's maybe_extract_prompt ignores it and extracts the prompt from the messages.
        columns.remove("prompt")
    return columns, conversational


def map_pairs(rows: datasets.Dataset, tokenize_batch, *, fn_kwargs: dict, num_proc: int | None,
              kept: dict | None = None) -> tuple[datasets.Dataset, dict[str, int]]:
    """``rows`` tokenised by ``tokenize_batch`` (a batched ``datasets.map`` body with indices returning the id columns,
    ``kept``'s new columns and a drop reason per row), the dropped rows filtered out, and the report of
    ``tokenize_pairs``. ``kept``: {column: feature} of the output columns besides the ids; those of ``rows`` among
    them pass through as they are."""
    kept = kept or {}
    mapped = rows.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=[name for name in rows.column_names if name not in kept],
        features=datasets.Features({**{name: datasets.Sequence(datasets.Value("int64")) for name in _IDS_COLUMNS},
                                    **kept, _DROP: datasets.Value("string")}),
        fn_kwargs=fn_kwargs,
        num_proc=num_proc,
        desc="Tokenising preference pairs",
    )
    drops = Counter(mapped[_DROP])
    report = {
        "rows": len(rows),
        "kept": drops[""],
        "prompt_too_long": drops["prompt_too_long"],
        "identical": drops["identical"],
    }
    logger.info(
        "tokenised %d preference rows: kept %d; dropped %d with prompt >= max_length, %d with identical completions",
        report["rows"], report["kept"], report["prompt_too_long"], report["identical"],
    )
    if report["kept"] == 0:
        raise ValueError(f"no pairs left after filtering: {report}")
    pairs = mapped.filter(_kept, batched=True, input_columns=_DROP, num_proc=num_proc, desc="Dropping pairs")
    return pairs.remove_columns(_DROP), report


def tokenize_prompts(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_prompt_length: int | None = 512,
    truncation_mode: str = "keep_end",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Tokenise the prompts of a prompt-only dataset (online DPO) the way ``tokenize_pairs`` tokenises prompts.

    A ``prompt`` string (standard) is tokenised as is; a ``prompt`` message list (conversational) is rendered
    with the tokenizer's chat template and the generation prompt. No special tokens are added, and a prompt
    longer than ``max_prompt_length`` keeps its last (``"keep_end"``) or first (``"keep_start"``) tokens.
    Other columns are dropped.

    Args:
        dataset: rows with a ``prompt`` column, all of one format (that of row 0).
        tokenizer: a Hugging Face tokenizer; with a chat template for conversational prompts.
        max_prompt_length: positive int or None (no limit).
        truncation_mode: ``"keep_end"`` or ``"keep_start"``.
        num_proc: worker processes for ``datasets.map``.

    Returns:
        The dataset with exactly the columns ``prompt`` (the rows' own value, for judges and reward models) and
        ``prompt_input_ids`` (list of int64, non-empty), in input order.

    Raises:
        ValueError: no ``prompt`` column (the present columns named) or no rows; a malformed row (its index
            named): a prompt of another type than row 0's, an empty prompt string or message list, a message
            that is not a dict with ``role`` and ``content`` strings; conversational prompts and a tokenizer
            without a chat template; bad limits or truncation mode.
    """
    _check_limits(None, max_prompt_length, truncation_mode)
    if "prompt" not in dataset.column_names:
        raise ValueError(f"dataset lacks column 'prompt'; columns present: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("dataset has no rows")
    prompts = dataset.select_columns(["prompt"])
    conversational = isinstance(prompts[0]["prompt"], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational prompts need a tokenizer with a chat template; this one has none")
    return prompts.map(
        _tokenize_prompt_batch, batched=True, with_indices=True, num_proc=num_proc, desc="Tokenising prompts",
        fn_kwargs=dict(tokenizer=tokenizer, conversational=conversational, max_prompt_length=max_prompt_length,
                       truncation_mode=truncation_mode),
    )


def _tokenize_prompt_batch(batch, indices, *, tokenizer, conversational, max_prompt_length, truncation_mode):
    texts = []
    for index, prompt in zip(indices, batch["prompt"]):
        if conversational:
            check_messages(index, "prompt", prompt)
            if not prompt:
                raise ValueError(f"row {index}: prompt is an empty message list")
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        else:
            if not isinstance(prompt, str):
                raise ValueError(f"row {index}: prompt must be a str (standard format, as row 0), got {describe(prompt)}")
            if not prompt:
                raise ValueError(f"row {index}: the prompt is empty")
            texts.append(prompt)
    return {"prompt_input_ids": [_truncate_prompt(ids, max_prompt_length, truncation_mode)
                                 for ids in _encode(tokenizer, texts)]}


def _check_limits(max_length, max_prompt_length, truncation_mode) -> None:
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    if truncation_mode not in _TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {_TRUNCATION_MODES}, got {truncation_mode!r}")


def _input_columns(dataset: datasets.Dataset) -> list[str]:
    present = dataset.column_names
    missing = [name for name in ("chosen", "rejected") if name not in present]
    if missing:
        raise ValueError(f"dataset lacks column(s) {missing}; columns present: {present}")
    if len(dataset) == 0:
        raise ValueError("dataset has no rows")
    return [name for name in ("prompt", "chosen", "rejected") if name in present]


def _kept(reasons: list[str]) -> list[bool]:
    return [not reason for reason in reasons]


def _tokenize_batch(batch, indices, *, tokenizer, conversational, max_length, max_prompt_length, truncation_mode):
    """``datasets.map`` body (module level, so that it pickles and hashes for the cache).

    Texts are gathered first so that the tokenizer sees one batch per field; dropped rows keep empty
    id lists and a reason in the ``_drop`` marker column.
    """
    explicit = "prompt" in batch
    prompts = batch["prompt"] if explicit else [None] * len(indices)
    rows = [
        row_texts(index, explicit, prompt, chosen, rejected, tokenizer, conversational)
        for index, prompt, chosen, rejected in zip(indices, prompts, batch["chosen"], batch["rejected"])
    ]
    eos = [] if conversational else [tokenizer.eos_token_id]
    encoded = ((p, c + eos, r + eos)
               for p, c, r in zip(*(_encode(tokenizer, [row[k] for row in rows if row is not None]) for k in range(3))))
    pairs = [None if row is None else next(encoded) for row in rows]
    return batch_columns(pairs, max_length, max_prompt_length, truncation_mode)


def batch_columns(pairs: list[tuple[list[int], list[int], list[int]] | None], max_length, max_prompt_length,
                  truncation_mode) -> dict[str, list]:
    """A tokenising ``datasets.map`` body's columns from each row's (prompt, chosen, rejected) ids, or None for
    identical completions: the ids truncated (``_truncate``), and the drop reason (empty ids) of each dropped row."""
    out = {name: [] for name in (*_IDS_COLUMNS, _DROP)}
    for pair in pairs:
        reason, ids = "identical", ([], [], [])
        if pair is not None:
            truncated = _truncate(*pair, max_length, max_prompt_length, truncation_mode)
            reason, ids = ("prompt_too_long", ids) if truncated is None else ("", truncated)
        for name, value in zip(_IDS_COLUMNS, ids):
            out[name].append(value)
        out[_DROP].append(reason)
    return out


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    # Fast tokenizers fail on an empty batch (a batch of identical pairs gives one).
    return tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []


def _truncate_prompt(prompt_ids, max_prompt_length, truncation_mode):
    if max_prompt_length is None or len(prompt_ids) <= max_prompt_length:
        return prompt_ids
    return prompt_ids[-max_prompt_length:] if truncation_mode == "keep_end" else prompt_ids[:max_prompt_length]


def _truncate(prompt_ids, chosen_ids, rejected_ids, max_length, max_prompt_length, truncation_mode):
    """TRL's DPO truncation; None when the prompt alone fills ``max_length``."""
    prompt_ids = _truncate_prompt(prompt_ids, max_prompt_length, truncation_mode)
    if max_length is None:
        return prompt_ids, chosen_ids, rejected_ids
    budget = max_length - len(prompt_ids)
    if budget <= 0:
        return None
    return prompt_ids, chosen_ids[:budget], rejected_ids[:budget]
