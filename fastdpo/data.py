"""Preference data: load a dataset, find each row's prompt, tokenise it into (prompt, chosen, rejected) ids.

Row formats are TRL's: standard (``prompt``/``chosen``/``rejected`` strings), implicit prompt (``chosen``/``rejected``
strings holding whole dialogues, e.g. Anthropic HH) and conversational (lists of ``{"role", "content"}`` messages,
with or without an explicit ``prompt`` list).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import datasets

logger = logging.getLogger(__name__)

# Longest first, so "x.jsonl.gz" is not taken for a bare ".gz".
_LOADERS = {
    ".jsonl.gz": "json", ".json.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
}
_HH_ASSISTANT = "\n\nAssistant:"
_TRUNCATION_MODES = ("keep_end", "keep_start")
_IDS_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_DROP = "_drop"


# ---- Loading -------------------------------------------------------------------------------------


def load_preference_dataset(
    source: str,
    *,
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    max_samples: int | None = None,
    seed: int = 42,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load a preference dataset (or any row dataset, e.g. the prompts of online DPO) and its optional eval set.

    Args:
        source: a local file (``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz``, ``.parquet``, ``.csv``; it
            holds one split, ``"train"``, as in ``datasets``), a local directory (splits inferred by
            ``datasets.load_dataset`` from the file names), or else a Hugging Face Hub dataset name.
            A source that does not exist is taken for a local path when it has a known extension, starts
            with ``/``, ``.`` or ``~``, or holds a backslash or more than one ``/`` (Hub names are
            ``name`` or ``owner/name``).
        split: the training split.
        eval_split: a split to return as the eval set.
        eval_fraction: in (0, 1): carve this share of the (capped) training rows off as the eval set,
            by ``Dataset.train_test_split`` with ``seed`` (the eval size is rounded up).
        max_samples: keep only the first ``max_samples`` rows of the training split, before the eval
            fraction is carved out, and of ``eval_split``.
        seed: the shuffle seed of the eval fraction.

    Returns:
        (train, eval) ``datasets.Dataset`` s; eval is None when neither eval option is given.

    Raises:
        FileNotFoundError: a path-like source that does not exist.
        ValueError: an unsupported file extension, a missing split (the available ones are listed),
            ``eval_split`` together with ``eval_fraction``, or an out-of-range fraction or sample cap.
    """
    if eval_split is not None and eval_fraction is not None:
        raise ValueError("give eval_split or eval_fraction, not both")
    if eval_fraction is not None and not 0 < eval_fraction < 1:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                    or max_samples < 1):
        raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")

    splits = _load_splits(source)
    train = _first_rows(_pick_split(splits, split, source), max_samples)
    if eval_split is not None:
        return train, _first_rows(_pick_split(splits, eval_split, source), max_samples)
    if eval_fraction is not None:
        parts = train.train_test_split(test_size=eval_fraction, seed=seed)
        return parts["train"], parts["test"]
    return train, None


def _loader_for(name: str) -> str | None:
    lowered = name.lower()
    return next((loader for ext, loader in _LOADERS.items() if lowered.endswith(ext)), None)


def _looks_like_path(source: str) -> bool:
    return (_loader_for(source) is not None or source.startswith(("/", ".", "~")) or "\\" in source
            or source.count("/") > 1)


def _load_splits(source: str) -> datasets.DatasetDict:
    path = Path(source).expanduser()
    if path.is_file():
        loader = _loader_for(path.name)
        if loader is None:
            raise ValueError(f"unsupported file type: {source!r}; supported extensions: {', '.join(_LOADERS)}")
        return datasets.load_dataset(loader, data_files=str(path))
    if path.is_dir():
        return datasets.load_dataset(str(path))
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such file or directory: {source!r}")
    return datasets.load_dataset(source)


def _pick_split(splits: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {source!r}; available splits: {sorted(splits)}")
    return splits[split]


def _first_rows(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


# ---- Prompt extraction ---------------------------------------------------------------------------


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


# ---- Tokenisation --------------------------------------------------------------------------------


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
    columns = _input_columns(dataset)
    first = dataset.select_columns(columns)[0]
    conversational = isinstance(first["chosen"], list)
    if conversational and isinstance(first.get("prompt"), str):
        # A string prompt beside message-list completions (HuggingFaceH4/ultrafeedback_binarized) repeats the
        # first user turn; TRL's maybe_extract_prompt ignores it and extracts the prompt from the messages.
        columns.remove("prompt")
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError("conversational data needs a tokenizer with a chat template; this one has none")
    if not conversational and tokenizer.eos_token_id is None:
        raise ValueError("standard-format completions end with eos_token_id, and this tokenizer has none")

    mapped = dataset.select_columns(columns).map(
        _tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=columns,
        features=datasets.Features(
            {**{name: datasets.Sequence(datasets.Value("int64")) for name in _IDS_COLUMNS},
             _DROP: datasets.Value("string")}
        ),
        fn_kwargs=dict(
            tokenizer=tokenizer, conversational=conversational, max_length=max_length,
            max_prompt_length=max_prompt_length, truncation_mode=truncation_mode,
        ),
        num_proc=num_proc,
        desc="Tokenising preference pairs",
    )
    drops = Counter(mapped[_DROP])
    report = {
        "rows": len(dataset),
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
            _check_messages(index, "prompt", prompt)
            if not prompt:
                raise ValueError(f"row {index}: prompt is an empty message list")
            texts.append(tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True))
        else:
            if not isinstance(prompt, str):
                raise ValueError(f"row {index}: prompt must be a str (standard format, as row 0), got {_describe(prompt)}")
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
        _row_texts(index, explicit, prompt, chosen, rejected, tokenizer, conversational)
        for index, prompt, chosen, rejected in zip(indices, prompts, batch["chosen"], batch["rejected"])
    ]
    kept = iter(zip(*(_encode(tokenizer, [row[k] for row in rows if row is not None]) for k in range(3))))
    eos = [] if conversational else [tokenizer.eos_token_id]
    out = {name: [] for name in (*_IDS_COLUMNS, _DROP)}
    for row in rows:
        reason, ids = "identical", ([], [], [])
        if row is not None:
            prompt_ids, chosen_ids, rejected_ids = next(kept)
            truncated = _truncate(prompt_ids, chosen_ids + eos, rejected_ids + eos,
                                  max_length, max_prompt_length, truncation_mode)
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


def _row_texts(index, explicit, prompt, chosen, rejected, tokenizer, conversational) -> tuple[str, str, str] | None:
    """(prompt, chosen, rejected) texts of one row, or None when its completions are identical.

    ``explicit``: the dataset has a prompt column; otherwise ``prompt`` is ignored and extracted.
    """
    if conversational:
        return _conversation_texts(index, explicit, prompt, chosen, rejected, tokenizer)
    return _string_texts(index, explicit, prompt, chosen, rejected)


def _string_texts(index, explicit, prompt, chosen, rejected):
    named = [("chosen", chosen), ("rejected", rejected)] + ([("prompt", prompt)] if explicit else [])
    for name, value in named:
        if not isinstance(value, str):
            raise ValueError(f"row {index}: {name} must be a str (standard format, as row 0), got {_describe(value)}")
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


def _conversation_texts(index, explicit, prompt, chosen, rejected, tokenizer):
    _check_messages(index, "chosen", chosen)
    _check_messages(index, "rejected", rejected)
    if not explicit:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if not prompt:
            raise ValueError(f"row {index}: chosen and rejected share no leading message, so there is no prompt")
    else:
        _check_messages(index, "prompt", prompt)
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


def _check_messages(index, name, messages) -> None:
    if not isinstance(messages, list):
        raise ValueError(
            f"row {index}: {name} must be a list of {{'role', 'content'}} messages (conversational format, as row 0), "
            f"got {_describe(messages)}"
        )
    for position, message in enumerate(messages):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ValueError(
                f"row {index}: {name}[{position}] must be a dict with 'role' and 'content' strings, "
                f"got {_describe(message)}"
            )


def _describe(value, limit: int = 120) -> str:
    text = repr(value)
    if len(text) > limit:
        text = text[:limit] + "..."
    return f"{type(value).__name__} {text}"
