"""Loading a dataset (local files and directories, or Hub names) and carving off its eval set."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import datasets
from datasets.exceptions import DatasetGenerationError

from .vision import with_absolute_image_paths

# Longest first, so "x.jsonl.gz" is not taken for a bare ".gz".
_LOADERS = {
    ".jsonl.gz": "json", ".json.gz": "json", ".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv",
}


def load_rows(
    source: str,
    *,
    split: str = "train",
    eval_split: str | None = None,
    eval_fraction: float | None = None,
    max_samples: int | None = None,
    seed: int = 42,
) -> tuple[datasets.Dataset, datasets.Dataset | None]:
    """Load a dataset of rows (preference pairs, prompts for online DPO, SFT rows) and its optional eval set.

    Args:
        source: a local file (``.json``, ``.jsonl``, ``.json.gz``, ``.jsonl.gz``, ``.parquet``, ``.csv``; it
            holds one split, ``"train"``, as in ``datasets``), a local directory (splits inferred by
            ``datasets.load_dataset`` from the file names), or else a Hugging Face Hub dataset name. Relative image
            paths in a local dataset's ``images``/``image`` column (vision rows) start from its folder.
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
        try:
            return _absolute_images(datasets.load_dataset(loader, data_files=str(path)), path.parent)
        except (ValueError, DatasetGenerationError) as e:
            # pyarrow's and pandas' JSON errors name a byte position in a block, not the file or the line
            where = _json_syntax_error(path) if loader == "json" else None
            if where is None:
                raise
            raise ValueError(f"{source}: {where}") from e
    if path.is_dir():
        return _absolute_images(datasets.load_dataset(str(path)), path)
    if _looks_like_path(source):
        raise FileNotFoundError(f"no such file or directory: {source!r}")
    return datasets.load_dataset(source)


def _absolute_images(splits: datasets.DatasetDict, base: Path) -> datasets.DatasetDict:
    """A local dataset's image paths (vision rows) made absolute: relative ones start from the data's folder."""
    return datasets.DatasetDict({name: with_absolute_image_paths(split, base) for name, split in splits.items()})


def _pick_split(splits: datasets.DatasetDict, split: str, source: str) -> datasets.Dataset:
    if split not in splits:
        raise ValueError(f"split {split!r} not found in {source!r}; available splits: {sorted(splits)}")
    return splits[split]


def _first_rows(dataset: datasets.Dataset, max_samples: int | None) -> datasets.Dataset:
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.select(range(max_samples))


def _json_syntax_error(path: Path) -> str | None:
    """Where ``path`` (JSON Lines, or one JSON document starting with ``[``; gzipped for ``.gz``) first fails to
    parse, what was found there and what to do; None when it parses."""
    with (gzip.open if path.suffix == ".gz" else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        lines, fix = [text], "fix the file so that it is one JSON array of objects"
    else:
        lines, fix = text.splitlines(), "each line of a JSON Lines file must be one complete JSON object"
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except json.JSONDecodeError as e:
            lineno = e.lineno if len(lines) == 1 else i
            doc_lines = e.doc.splitlines()   # a JSON Lines line is its own document: e.lineno is 1
            shown = doc_lines[e.lineno - 1] if e.lineno <= len(doc_lines) else ""
            rest = e.doc[e.pos:]
            here = rest.split("\n", 1)[0][:20]
            found = (repr(here) if here.strip() else "the end of the line" if rest.strip() or len(lines) > 1
                     else "the end of the file")
            todo = "the file ends before its JSON does" if found == "the end of the file" else \
                f"correct or remove line {lineno}"
            return (f"line {lineno}, column {e.colno}: {e.msg}; found {found}{f' in {shown[:80]!r}' if shown else ''}\n"
                    f"What to do: {fix}; {todo}.")
    return None
