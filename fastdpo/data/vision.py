"""Vision preference rows in TRL's format, tokenised with a processor and packed with their images.

A row holds its images in an ``images`` column (a list per row; TRL's ``image`` column, one image per row, too) beside
conversational prompt, chosen and rejected message lists (explicit prompt or implicit). The prompt's content holds one
``{"type": "image"}`` entry per image, in order, or none: then, as TRL's ``prepare_multimodal_messages`` does, the
images go at the start of the first user message. An image is a PIL image (as ``datasets`` decodes them), a
``datasets.Image`` dict (bytes or path), or a file path; ``load_rows`` makes a local file's relative paths absolute.

``tokenize_vision_pairs`` renders the rows with the processor's chat template and expands each image into its
placeholder tokens (the processor's own count); ``VisionPairGrouping`` packs each pair's images with the segment(s)
holding its prompt, and turns a micro-batch's images into pixel values with the processor's image processor.
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass, replace
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher

from .formats import check_messages, describe, extract_prompt, row_texts
from .packing import ImageBatch, PairGrouping, Segment
from .tokenization import _check_limits, batch_columns, map_pairs, pair_columns

IMAGE_COLUMNS = ("images", "image")


def image_column(dataset: datasets.Dataset) -> str | None:
    """The dataset's image column (``images``, or TRL's one-image ``image``), or None for a text dataset."""
    return next((name for name in IMAGE_COLUMNS if name in dataset.column_names), None)


def row_images(value) -> list:
    """A row's image column value as a list of images (None: no image; a single image: a list of one)."""
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def open_image(value, where: str):
    """The PIL image of a path, a ``datasets.Image`` dict or a PIL image, fully read (so that a truncated file fails
    here).

    Raises:
        ValueError: naming ``where`` and what to do: a value of another type, a missing file, a file PIL cannot read.
    """
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value
    if isinstance(value, dict) and value.get("bytes") is not None:
        source, name = io.BytesIO(value["bytes"]), value.get("path") or "its bytes"
    elif isinstance(value, dict) and value.get("path") or isinstance(value, str):
        source = name = value if isinstance(value, str) else value["path"]
    else:
        raise ValueError(f"{where} must be an image file path, a PIL image or a datasets.Image value, got "
                         f"{describe(value)}")
    try:
        image = Image.open(source)
        image.load()
    except FileNotFoundError as e:
        raise ValueError(f"{where}: no image file {name!r}; relative paths in a data file start from its folder: "
                         "correct the path or remove the row") from e
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{where}: {name!r} is not an image PIL can read ({e}); replace the file or remove the row"
                         ) from e
    return image


def image_digest(images: list) -> str:
    """sha256 of PIL images' pixels (mode, size and bytes): what keys data by its images whatever their source."""
    h = hashlib.sha256()
    for image in images:
        h.update(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
    return h.hexdigest()


def images_fingerprint(dataset: datasets.Dataset) -> str | None:
    """sha256 over the images of a tokenised vision dataset, row by row (its ``image_digest`` column, or the images
    read again where it has none), for keys that must change with the images; None for a dataset without images."""
    if "image_digest" in dataset.column_names:
        digests = dataset["image_digest"]
    elif "images" in dataset.column_names:
        digests = [image_digest([open_image(v, f"row {i}: images") for v in row_images(value)])
                   for i, value in enumerate(dataset["images"])]
    else:
        return None
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def with_absolute_image_paths(dataset: datasets.Dataset, base: Path) -> datasets.Dataset:
    """``dataset`` with the relative file paths of its image column taken from ``base`` (a data file's folder), and a
    fingerprint that changes with the image files (their size and modification time, as ``datasets`` keys its own
    data files), so that no cached tokenisation outlives an edited image."""
    column = image_column(dataset)
    feature = dataset.features.get(column)
    if getattr(feature, "feature", feature) != datasets.Value("string"):
        return dataset
    paths = [_absolute(value, str(base)) for value in dataset[column]]
    stats = [[(p, *_stat(p)) for p in row_images(value)] for value in paths]
    return dataset.map(lambda _, i: {column: paths[i]}, with_indices=True, desc="Resolving image paths",
                       new_fingerprint=Hasher.hash((dataset._fingerprint, stats)))


def _absolute(value, base: str):
    paths = [p if p is None else os.path.normpath(os.path.join(base, p)) for p in row_images(value)]
    return paths if isinstance(value, list) else paths[0] if paths else None


def _stat(path: str | None) -> tuple:
    try:
        info = os.stat(path)
    except (OSError, TypeError):   # missing: tokenisation names the row
        return ()
    return info.st_size, info.st_mtime_ns


def tokenize_vision_pairs(dataset: datasets.Dataset, processor, *, max_length: int | None = 1024,
                          num_proc: int | None = None) -> tuple[datasets.Dataset, dict[str, int]]:
    """Tokenise vision preference rows (module docstring) as TRL 1.16's vision collator does: the prompt rendered with
    the processor's chat template (generation prompt added) and tokenised with its images by the processor, each
    completion the rendering of prompt + completion minus the prompt's, tokenised by its tokenizer; no special tokens.

    A prompt is never cut (its image tokens must stay whole, so ``max_prompt_length`` does not apply): a pair whose
    prompt has at least ``max_length`` tokens is dropped, the completions of the others keep their first
    ``max_length - len(prompt)`` tokens (TRL's ``keep_start``). Pairs with identical completions are dropped.

    Args:
        dataset: rows with an ``images`` (or ``image``) column and conversational ``chosen``/``rejected`` (and
            ``prompt``) message lists.
        processor: a ``transformers`` processor with an image processor, a tokenizer and a chat template.
        max_length: a positive int or None (no limit).

    Returns:
        (pairs, report): ``pairs`` has the columns of ``tokenize_pairs``, ``images`` (the rows' images as they were;
        ``datasets.Image`` values left undecoded) and ``image_digest`` (``image_digest`` of the row's images);
        ``report`` as ``tokenize_pairs``'.

    Raises:
        ValueError: no image column, standard-format rows, a processor without a chat template, no pairs left, and,
            naming the row and what to do: an image that is missing or not an image file, more or fewer images than
            the prompt's image entries, an image entry in a completion, and ``tokenize_pairs``' row errors.
    """
    column = image_column(dataset)
    if column is None:
        raise ValueError(f"vision rows need an 'images' column; columns present: {dataset.column_names}")
    _check_limits(max_length, None, "keep_start")
    columns, conversational = pair_columns(dataset)
    if not conversational:
        raise ValueError("row 0: vision rows are conversational (TRL's vision format): chosen and rejected must be "
                         "lists of {'role', 'content'} messages, the prompt's content holding a {'type': 'image'} "
                         "entry per image")
    if not getattr(processor, "chat_template", None):
        raise ValueError("vision rows need a processor with a chat template; this one has none")
    rows = undecoded(dataset.select_columns([*columns, column]), column)
    pairs, report = map_pairs(rows, _tokenize_vision_batch, num_proc=num_proc,
                              fn_kwargs=dict(processor=processor, column=column, max_length=max_length),
                              kept={column: rows.features[column], "image_digest": datasets.Value("string")})
    return pairs.rename_column(column, "images") if column != "images" else pairs, report


def undecoded(dataset: datasets.Dataset, column: str) -> datasets.Dataset:
    """``dataset`` with ``datasets.Image`` values of ``column`` left as bytes or paths: ``open_image`` then names the
    row of a bad one, and the collator, not every read of a row, decodes them."""
    feature = dataset.features[column]
    if getattr(feature, "feature", feature) != datasets.Image():
        return dataset
    return dataset.cast_column(column, datasets.List(datasets.Image(decode=False)) if hasattr(feature, "feature")
                               else datasets.Image(decode=False))


def first_row_with_images(dataset: datasets.Dataset) -> int | None:
    """The index of the first row of ``dataset`` holding an image, None where none does (or it has no image column)."""
    column = image_column(dataset)
    if column is None:
        return None
    return next((i for i, value in enumerate(undecoded(dataset.select_columns([column]), column)[column])
                 if row_images(value)), None)


def _tokenize_vision_batch(batch, indices, *, processor, column, max_length):
    """``datasets.map`` body of ``tokenize_vision_pairs`` (module level, so that it pickles and hashes)."""
    explicit = "prompt" in batch
    pairs, digests = [], []
    for i, index in enumerate(indices):
        images = [open_image(value, f"row {index}: {column}[{k}]") for k, value in enumerate(row_images(
            batch[column][i]))]
        messages = {name: batch[name][i] for name in ("prompt", "chosen", "rejected") if name in batch}
        for name, value in messages.items():
            check_messages(index, name, value, parts=True)
        if explicit:
            prompt, chosen, rejected = (multimodal_messages(value, len(images) if name == "prompt" else 0)
                                        for name, value in messages.items())
        else:
            prompt, chosen, rejected = extract_prompt(*(multimodal_messages(value, len(images))
                                                        for value in messages.values()))
            if not prompt:
                raise ValueError(f"row {index}: chosen and rejected share no leading message, so there is no prompt")
        _check_image_entries(index, column, len(images), prompt, chosen, rejected)
        texts = row_texts(index, True, prompt, chosen, rejected, processor, True, parts=True)
        if texts is None:
            pairs.append(None)
            digests.append("")
            continue
        prompt_ids = processor(images=images or None, text=[texts[0]], add_special_tokens=False)["input_ids"][0]
        chosen_ids, rejected_ids = processor.tokenizer(list(texts[1:]), add_special_tokens=False)["input_ids"]
        pairs.append((prompt_ids, chosen_ids, rejected_ids))
        digests.append(image_digest(images))
    return {**batch_columns(pairs, max_length, None, "keep_start"), "image_digest": digests}


def multimodal_messages(messages: list[dict], images: int) -> list[dict]:
    """TRL's ``prepare_multimodal_messages`` without the image objects (chat templates render only the entries):
    string contents become text parts, and ``images`` image entries open the first user message whose content is a
    string."""
    out, placed = [], False
    for message in messages:
        if isinstance(message["content"], str):
            parts = [{"type": "text", "text": message["content"]}]
            if message["role"] == "user" and not placed:
                parts, placed = [{"type": "image"} for _ in range(images)] + parts, True
            message = {**message, "content": parts}
        out.append(message)
    return out


def _check_image_entries(index, column: str, images: int, prompt, chosen, rejected) -> None:
    counts = {name: sum(part["type"] == "image" for message in messages for part in message["content"])
              for name, messages in (("prompt", prompt), ("chosen", chosen), ("rejected", rejected))}
    if counts["prompt"] != images:
        raise ValueError(f"row {index}: {images} image(s) in the {column!r} column but {counts['prompt']} "
                         "{'type': 'image'} entries in the prompt: give one entry per image, in order, or none (the "
                         "images then open the first user message)")
    misplaced = [name for name in ("chosen", "rejected") if counts[name]]
    if misplaced:
        raise ValueError(f"row {index}: the {' and '.join(misplaced)} completion holds {{'type': 'image'}} entries; "
                         "images belong to the prompt: move them there")


@dataclass(frozen=True)
class VisionPairGrouping(PairGrouping):
    """``PairGrouping`` for rows with an ``images`` column: the images go with each segment that holds the prompt
    (once per pair with ``prefix_sharing``, twice without), and ``pixels`` runs ``image_processor`` (a
    ``transformers`` image processor) on a micro-batch's images.

    Raises:
        ValueError: as ``PairGrouping``, and ``open_image``'s errors for an image that can no longer be read.
    """

    image_processor: object = None

    def segments(self, row: dict, index: int) -> list[Segment]:
        images = tuple(row_images(row["images"]))
        return [replace(s, images=images) if s.prefix == 0 else s for s in super().segments(row, index)]

    def pixels(self, images: list) -> ImageBatch:
        out = self.image_processor(images=[open_image(value, "an image of this micro-batch") for value in images],
                                   return_tensors="pt")
        return ImageBatch(out["pixel_values"], out.get("image_grid_thw"))
