"""Vision preference rows: TRL's format from datasets and from JSON Lines files with image paths, tokenised as TRL
1.16's vision collator does, packed with their images once per pair (shared prefix) or per segment (unshared), and
bad rows refused with the row number and what to do."""


import datasets
import pytest
import torch

import _vision
from fastdpo.data import VisionPairGrouping, load_rows, pack, tokenize_vision_pairs
from fastdpo.data.vision import images_fingerprint, open_image

trl = pytest.importorskip("trl")


def tokenized(family, rows, **kwargs):
    processor = _vision.processor(family)
    pairs, report = tokenize_vision_pairs(datasets.Dataset.from_list(rows), processor, **kwargs)
    return processor, pairs, report


def write_jsonl_with_images(root, rows):
    """``rows``' images as PNG files under root/images, the rows in root/data/pairs.jsonl naming them relatively."""
    return _vision.write_jsonl(root / "data" / "pairs.jsonl", rows, root / "images")


@pytest.mark.parametrize("family", _vision.FAMILIES)
@pytest.mark.parametrize("per_row", [1, 2])
def test_tokens_and_pixels_are_trls(family, per_row):
    """prompt + chosen and prompt + rejected are the token rows of TRL's DataCollatorForVisionPreference (padding
    removed), and the packed pixels (shared prefix: each image once) are its prompts' pixels for the chosen half."""
    from trl.trainer.dpo_trainer import DataCollatorForVisionPreference

    rows = _vision.vision_rows(3, per_row, entries=per_row == 2)
    processor, pairs, report = tokenized(family, rows)
    assert report == {"rows": 3, "kept": 3, "prompt_too_long": 0, "identical": 0}
    trl_batch = DataCollatorForVisionPreference(processor)([dict(row) for row in rows])
    trl_rows = [ids[mask.bool()].tolist() for ids, mask in zip(trl_batch["input_ids"], trl_batch["attention_mask"])]
    ours = [row["prompt_input_ids"] + row[f"{side}_input_ids"] for side in ("chosen", "rejected") for row in pairs]
    assert ours == trl_rows
    image_tokens = sum(t == processor.image_token_id for t in pairs[0]["prompt_input_ids"])
    assert image_tokens >= per_row
    batch = pack(list(pairs), VisionPairGrouping(prefix_sharing=True, image_processor=processor.image_processor))
    half = trl_batch["pixel_values"].shape[0] // 2      # TRL processes every prompt's images twice
    assert torch.equal(batch.images.pixel_values, trl_batch["pixel_values"][:half])
    if family == "qwen2_vl":
        assert torch.equal(batch.images.image_grid_thw, trl_batch["image_grid_thw"][:len(rows) * per_row])
        assert len({tuple(g) for g in batch.images.image_grid_thw.tolist()}) == 2      # two image sizes, two grids


def test_images_go_with_each_segment_holding_the_prompt():
    processor, pairs, _ = tokenized("llava", _vision.vision_rows(2, 2))
    assert pairs.features["images"] == datasets.List(datasets.Image(decode=False))
    for sharing, per_pair in ((True, 2), (False, 4)):
        grouping = VisionPairGrouping(prefix_sharing=sharing, image_processor=processor.image_processor)
        chosen, rejected = grouping.segments(pairs[0], 0)
        assert len(chosen.images) == 2 and len(rejected.images) == (0 if sharing else 2)
        batch = pack(list(pairs), grouping)
        assert batch.images.pixel_values.shape[0] == 2 * per_pair
        assert (batch.input_ids == processor.image_token_id).sum() == 2 * per_pair * 4   # 4 tokens per image


def test_json_lines_with_relative_image_paths(tmp_path):
    rows = _vision.vision_rows(2, 2)
    data = write_jsonl_with_images(tmp_path, rows)
    train, _ = load_rows(str(data))
    assert all(path.startswith(str(tmp_path / "images")) for row in train["images"] for path in row)
    processor = _vision.processor("qwen2_vl")
    from_files, _ = tokenize_vision_pairs(train, processor)
    in_memory, _ = tokenize_vision_pairs(datasets.Dataset.from_list(rows), processor)
    columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "image_digest"]
    assert from_files.select_columns(columns).to_list() == in_memory.select_columns(columns).to_list()
    assert images_fingerprint(from_files) == images_fingerprint(in_memory) == images_fingerprint(
        from_files.remove_columns("image_digest"))
    (tmp_path / "images" / "1-0.png").write_bytes(_png_of(_vision.images(1, seed=5)[0]))
    changed, _ = tokenize_vision_pairs(load_rows(str(data))[0], processor)
    assert images_fingerprint(changed) != images_fingerprint(from_files)


def _png_of(image):
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def test_implicit_prompt_and_single_image_column():
    rows = _vision.vision_rows(2, entries=False)
    explicit = tokenized("llava", rows)[1]
    implicit = [{"image": row["images"][0], "chosen": row["prompt"] + row["chosen"],
                 "rejected": row["prompt"] + row["rejected"]} for row in rows]
    _, pairs, _ = tokenized("llava", implicit)
    assert pairs.column_names == explicit.column_names
    assert pairs.remove_columns("images").to_list() == explicit.remove_columns("images").to_list()


def test_long_prompts_are_dropped_not_cut():
    rows = _vision.vision_rows(3, 2, entries=False)
    rows[1]["prompt"][0]["content"] = "x" * 200
    processor, pairs, report = tokenized("llava", rows, max_length=60)
    assert report["prompt_too_long"] == 1 and report["kept"] == 2
    assert all(len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) <= 60 for r in pairs)
    assert all(sum(t == processor.image_token_id for t in r["prompt_input_ids"]) == 8 for r in pairs)


def _bad(tmp_path):
    rows = _vision.vision_rows(3, 1)
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    return {
        "missing file": ({2: {"images": [str(tmp_path / "gone.png")]}}, r"row 2: images\[0\]: no image file .*gone.png"),
        "not an image": ({1: {"images": [str(not_an_image)]}}, r"row 1: images\[0\]: .*notes.png' is not an image"),
        "too many images": ({2: {"images": _vision.images(2)}}, r"row 2: 2 image\(s\) in the 'images' column but 1"),
        "too few images": ({0: {"images": []}}, r"row 0: 0 image\(s\) in the 'images' column but 1"),
        "image in a completion": ({i: {"chosen": [{"role": "assistant", "content": [{"type": "text", "text": "A"}]
                                                  + [{"type": "image"}] * (i == 1)}]} for i in range(3)},
                                  r"row 1: the chosen completion holds \{'type': 'image'\} entries"),
        "bad part": ({1: {"prompt": [{"role": "user", "content": [{"type": "video"}]}]}},
                     r"row 1: prompt\[0\] must be a dict with 'role' and 'content' strings \(or a content list"),
    }, rows


@pytest.mark.parametrize("case", ["missing file", "not an image", "too many images", "too few images",
                                  "image in a completion", "bad part"])
def test_bad_rows_are_refused_with_the_row(tmp_path, case):
    cases, rows = _bad(tmp_path)
    change, match = cases[case]
    for index, values in change.items():
        rows[index] = {**rows[index], **values}
    with pytest.raises(ValueError, match=match):
        tokenized("llava", rows)


def test_standard_rows_missing_images_column_and_other_values_are_refused():
    processor = _vision.processor("llava")
    standard = datasets.Dataset.from_list([{"images": [], "prompt": "p", "chosen": "a", "rejected": "b"}])
    with pytest.raises(ValueError, match="row 0: vision rows are conversational"):
        tokenize_vision_pairs(standard, processor)
    with pytest.raises(ValueError, match="need an 'images' column"):
        tokenize_vision_pairs(standard.remove_columns("images"), processor)
    with pytest.raises(ValueError, match=r"row 4: images\[1\] must be an image file path, a PIL image"):
        open_image(3, "row 4: images[1]")
