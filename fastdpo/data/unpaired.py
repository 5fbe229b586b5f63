"""Unpaired preference data (KTO): TRL's unpaired rows (``prompt``, ``completion``, boolean ``label``) into token ids,
each row with a KL completion (another row's completion, TRL 1.16's rotation), packed with the prompt once and the
completion and KL completion as two branches off it.

Formats (TRL's, detected from the columns and row 0): standard (strings) or conversational (message lists); an
explicit ``prompt``, or an implicit one (no ``prompt`` column: the completion is a whole dialogue, cut before its last
assistant turn); and paired rows (``chosen``/``rejected``), unpaired first as TRL's ``unpair_preference_dataset``.
"""

from __future__ import annotations

import logging
from collections import Counter

import datasets
from torch.utils.data import Sampler

from .formats import _HH_ASSISTANT, check_messages, describe, extract_prompt
from .packing import IGNORE_INDEX, Grouping, Segment, TokenBudgetBatchSampler
from .sft import _prompt_and_completion, _prompt_completion

logger = logging.getLogger(__name__)

UNPAIRED_COLUMNS = ("prompt_input_ids", "completion_input_ids", "label")
KL_COLUMN = "kl_completion_input_ids"
#: precomputed reference log-probs of each row's completion and KL completion (TRL 1.16's names)
REF_LOGPS, REF_KL_LOGPS = "ref_logps", "ref_KL_logps"
#: rows per ``datasets.map`` batch (its default), which orders TRL's unpaired rows: a batch's chosen, then its rejected
UNPAIR_BATCH = 1000
_DROP = "_drop"


def unpair_preference_rows(dataset: datasets.Dataset, num_proc: int | None = None) -> datasets.Dataset:
    """Preference pairs as unpaired rows, in TRL 1.16 ``unpair_preference_dataset``'s order: per ``datasets.map``
    batch of ``UNPAIR_BATCH`` pairs, its chosen completions (``label`` True), then its rejected ones (False), each with
    its pair's prompt. An implicit prompt (no ``prompt`` column, or a string one beside message lists) is split off
    first with ``fastdpo.data.extract_prompt``, as fastdpo's DPO does (TRL's cut differs on HH replies that share a
    first word).

    Returns:
        Exactly the columns ``prompt``, ``completion``, ``label``; twice the rows.

    Raises:
        ValueError: chosen and rejected of different types (the row named).
    """
    first = dataset[0]
    explicit = "prompt" in first and isinstance(first["prompt"], list) == isinstance(first["chosen"], list)
    return dataset.map(_unpair_batch, batched=True, batch_size=UNPAIR_BATCH, with_indices=True, num_proc=num_proc,
                       remove_columns=dataset.column_names, fn_kwargs={"explicit": explicit},
                       desc="Unpairing preference rows")


def _unpair_batch(batch, indices, *, explicit):
    prompts, chosen, rejected = [], [], []
    for i, index in enumerate(indices):
        if explicit:
            prompt, good, bad = batch["prompt"][i], batch["chosen"][i], batch["rejected"][i]
        else:
            try:
                prompt, good, bad = extract_prompt(batch["chosen"][i], batch["rejected"][i])
            except ValueError as e:
                raise ValueError(f"row {index}: {e}") from None
        prompts.append(prompt)
        chosen.append(good)
        rejected.append(bad)
    return {"prompt": prompts * 2, "completion": chosen + rejected,
            "label": [True] * len(indices) + [False] * len(indices)}


def tokenize_unpaired(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    max_length: int | None = 1024,
    kl_group_size: int | None = None,
    num_proc: int | None = None,
) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise unpaired rows as TRL 1.16 ``KTOTrainer._prepare_dataset`` does, and give each its KL completion.

    A string completion gets ``tokenizer.eos_token`` when it lacks it; the prompt and the whole row are tokenised
    (message lists rendered with the chat template, the prompt with the generation prompt) and the completion starts
    where the two diverge. A row whose prompt has ``max_length`` tokens or more is dropped, then the rows are cut into
    groups of ``kl_group_size`` consecutive rows, and within each group row i's KL completion is row i - 1's (the
    first row's, the last row's): TRL's rotation over its batches of ``per_device_train_batch_size``. Completions and
    KL completions keep their first ``max_length - len(prompt)`` tokens.

    Args:
        dataset: unpaired rows (``completion``, ``label``, optional ``prompt``) or preference pairs
            (``unpair_preference_rows``).
        tokenizer: a Hugging Face tokenizer; with a chat template for message lists.
        max_length: the most tokens of prompt + completion, or None.
        kl_group_size: rows per KL group (> 1), or None for no KL completions (``apo_zero_unpaired``).
        num_proc: worker processes for ``datasets.map`` (the KL rotation runs in one, on the rows' final order).

    Returns:
        (rows with exactly ``UNPAIRED_COLUMNS`` and, with ``kl_group_size``, ``KL_COLUMN``, in input order minus the
        dropped rows; report ``{"rows", "kept", "prompt_too_long", "desirable", "undesirable"}``, also logged).

    Raises:
        ValueError: no ``completion`` or ``label`` column (the present ones named), a label that is not a boolean,
            a malformed row (its index named: a value of another type than row 0's, an empty completion, an implicit
            prompt with no assistant turn to cut at, a prompt or completion without tokens), message lists and a
            tokenizer without a chat template, ``kl_group_size < 2``, no rows left.
    """
    if kl_group_size is not None and kl_group_size < 2:
        raise ValueError(f"kl_group_size must be at least 2 (a row's KL completion is another row's), got "
                         f"{kl_group_size}")
    if len(dataset) == 0:
        raise ValueError("dataset has no rows")
    if {"chosen", "rejected"} <= set(dataset.column_names) and "completion" not in dataset.column_names:
        dataset = unpair_preference_rows(dataset, num_proc)
    _check_columns(dataset)
    columns = [c for c in ("prompt", "completion", "label") if c in dataset.column_names]
    first = dataset.select_columns(columns)[0]
    conversational = isinstance(first["completion"], list)
    if conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError("message lists need a tokenizer with a chat template; this one has none")
    mapped = dataset.select_columns(columns).map(
        _tokenize_rows, batched=True, with_indices=True, remove_columns=[c for c in columns if c != "label"],
        num_proc=num_proc, desc="Tokenising unpaired rows",
        fn_kwargs=dict(tokenizer=tokenizer, conversational=conversational, max_length=max_length,
                       explicit="prompt" in first and isinstance(first["prompt"], list) == conversational),
        features=datasets.Features({"label": datasets.Value("bool"), _DROP: datasets.Value("bool"),
                                    **{c: datasets.Sequence(datasets.Value("int64")) for c in UNPAIRED_COLUMNS[:2]}}))
    kept = mapped.filter(lambda drop: [not d for d in drop], batched=True, input_columns=_DROP, num_proc=num_proc,
                         desc="Dropping rows whose prompt fills max_length").remove_columns(_DROP)
    labels = Counter(kept["label"])
    report = {"rows": len(dataset), "kept": len(kept), "prompt_too_long": len(dataset) - len(kept),
              "desirable": labels[True], "undesirable": labels[False]}
    logger.info("tokenised %d unpaired rows: kept %d (%d desirable, %d undesirable); dropped %d with prompt >= "
                "max_length", report["rows"], report["kept"], report["desirable"], report["undesirable"],
                report["prompt_too_long"])
    if not len(kept):
        raise ValueError(f"no rows left after filtering: {report}")
    # one process over the final order: a group is kl_group_size consecutive rows, as the KL batch sampler cuts them
    rows = kept.map(_truncate_and_rotate, batched=True, batch_size=kl_group_size or UNPAIR_BATCH,
                    fn_kwargs={"max_length": max_length, "kl": kl_group_size is not None},
                    desc="Adding KL completions" if kl_group_size else "Truncating completions")
    return rows.select_columns([*UNPAIRED_COLUMNS, *([KL_COLUMN] if kl_group_size else [])]), report


def _check_columns(dataset: datasets.Dataset) -> None:
    present = dataset.column_names
    if "completion" not in present:
        raise ValueError(f"unpaired rows need a 'completion' column (TRL's unpaired format: prompt, completion, "
                         f"label), or give preference pairs (chosen, rejected); columns present: {present}")
    if "label" not in present:
        raise ValueError(f"unpaired rows need a boolean 'label' column (true: the completion is desirable, false: "
                         f"undesirable); columns present: {present}")
    labels = dataset["label"]
    bad = next((i for i, label in enumerate(labels) if not isinstance(label, bool)), None)
    if bad is not None:
        raise ValueError(f"row {bad}: label must be true or false (desirable or undesirable), got "
                         f"{describe(labels[bad])}; write JSON true/false, or convert the column, e.g. "
                         "dataset.map(lambda row: {'label': row['label'] == 1})")


def _tokenize_rows(batch, indices, *, tokenizer, conversational, max_length, explicit):
    """``datasets.map`` body: (prompt ids, untruncated completion ids, drop marker) per row."""
    out = {"prompt_input_ids": [], "completion_input_ids": [], _DROP: []}
    for offset, index in enumerate(indices):
        completion = batch["completion"][offset]
        if explicit:
            prompt = batch["prompt"][offset]
        else:
            prompt, completion = _implicit_prompt(index, completion, conversational)
        prompt, completion = _prompt_completion(index, "prompt_completion",
                                                {"prompt": prompt, "completion": completion}, conversational)
        ids, mask = _prompt_and_completion(index, prompt, completion, tokenizer, conversational, completion_only=True,
                                           assistant_only=False, eos=tokenizer.eos_token)
        start = len(ids) - sum(mask)   # where the prompt's tokens and the whole row's diverge
        for name, part in (("prompt", ids[:start]), ("completion", ids[start:])):
            if not part:
                raise ValueError(f"row {index}: the {name} has no tokens (the {name} is scored from, or scores, the "
                                 "other, so each needs at least one)")
        out["prompt_input_ids"].append(ids[:start])
        out["completion_input_ids"].append(ids[start:])
        out[_DROP].append(max_length is not None and start >= max_length)
    return out


def _implicit_prompt(index, completion, conversational):
    """(prompt, completion) of a whole dialogue: cut before its last assistant turn."""
    if conversational:
        check_messages(index, "completion", completion)
        cut = max((i for i, m in enumerate(completion) if m["role"] == "assistant"), default=0)
    else:
        if not isinstance(completion, str):
            raise ValueError(f"row {index}: completion must be a str (standard format, as row 0), got "
                             f"{describe(completion)}")
        marker = completion.rfind(_HH_ASSISTANT)
        cut = marker + len(_HH_ASSISTANT) if marker >= 0 else 0
    if cut == 0:
        raise ValueError(f"row {index}: no 'prompt' column, and the completion has no assistant turn after a prompt to "
                         f"cut it at (a message with role 'assistant', or an HH '{_HH_ASSISTANT.strip()}' turn); add "
                         "a 'prompt' column")
    return completion[:cut], completion[cut:]


def _truncate_and_rotate(batch, *, max_length, kl):
    """One KL group (or a batch of rows without KL): completions, and with ``kl`` the rotated KL completions, cut to
    ``max_length - len(prompt)`` tokens (TRL cuts prompt + completion in its collator, from the untruncated ones)."""
    budgets = [None if max_length is None else max_length - len(p) for p in batch["prompt_input_ids"]]
    completions = batch["completion_input_ids"]
    if kl:
        batch[KL_COLUMN] = [c[:b] for c, b in zip(completions[-1:] + completions[:-1], budgets)]
    batch["completion_input_ids"] = [c[:b] for c, b in zip(completions, budgets)]
    return batch


class UnpairedGrouping(Grouping):
    """An unpaired row as the document ``prompt + completion`` and, with ``kl``, its KL completion: a branch off the
    prompt (``prefix_sharing``) or the document ``prompt + KL completion``; only completions are scored. Rows hold
    ``UNPAIRED_COLUMNS`` (and ``KL_COLUMN``); the batch carries ``label`` and, where present, the precomputed
    reference columns as ``row_values``.

    Raises:
        ValueError: an empty prompt or completion (named by its row).
    """

    def __init__(self, *, prefix_sharing: bool = False, kl: bool = True):
        self.prefix_sharing, self.kl = prefix_sharing, kl
        self.size = 2 if kl else 1
        self.ref_columns = (REF_LOGPS, REF_KL_LOGPS) if kl else (REF_LOGPS,)
        self.columns = ("label", *self.ref_columns)

    def segments(self, row: dict, index: int) -> list[Segment]:
        prompt, completion = row["prompt_input_ids"], row["completion_input_ids"]
        parts = {"prompt": prompt, "completion": completion, **({"KL completion": row[KL_COLUMN]} if self.kl else {})}
        empty = [name for name, ids in parts.items() if not ids]
        if empty:
            raise ValueError(f"row {index}: empty {' and '.join(empty)} token list; every row needs a prompt and a "
                             "completion of at least one token (tokenize_unpaired ensures it)")
        unscored = [IGNORE_INDEX] * len(prompt)
        segments = [Segment(prompt + completion, unscored + completion)]
        if self.kl:
            kl = parts["KL completion"]
            segments.append(Segment(kl, kl, prefix=len(prompt)) if self.prefix_sharing
                            else Segment(prompt + kl, unscored + kl))
        return segments


class GroupBatchSampler(Sampler[list[int]]):
    """Micro-batches of whole groups of ``group_size`` consecutive rows (KTO's KL groups, so that a micro-batch's KL
    completions are its own completions) under ``max_tokens``: ``TokenBudgetBatchSampler`` over the groups, in order or
    in a seeded shuffle of whole groups.

    Raises:
        ValueError: a group longer than ``max_tokens`` (named, with its rows), or no rows.
    """

    def __init__(self, lengths: list[int], group_size: int, max_tokens: int, *, shuffle: bool = True, seed: int = 0):
        if not lengths:
            raise ValueError("no rows to batch")
        self.groups = [list(range(s, min(s + group_size, len(lengths)))) for s in range(0, len(lengths), group_size)]
        sizes = [sum(lengths[i] for i in group) for group in self.groups]
        longest = max(range(len(sizes)), key=sizes.__getitem__)
        if sizes[longest] > max_tokens:
            rows = self.groups[longest]
            raise ValueError(f"max_tokens_per_batch={max_tokens} is smaller than KL group {longest} (rows {rows[0]}-"
                             f"{rows[-1]}: {sizes[longest]} tokens); a micro-batch holds whole groups of "
                             "per_device_train_batch_size rows. Raise the budget, or lower per_device_train_batch_size "
                             "or max_length.")
        self.group_batches = TokenBudgetBatchSampler(sizes, max_tokens, shuffle=shuffle, seed=seed)

    def set_epoch(self, epoch: int) -> None:
        self.group_batches.set_epoch(epoch)

    def __iter__(self):
        return iter([[i for g in batch for i in self.groups[g]] for batch in self.group_batches])

    def __len__(self) -> int:
        return len(self.group_batches)
