"""`fastdpo train` on a vision dataset: a JSON Lines file whose rows name image files beside it (generated here) and a
tiny LLaVA checkpoint with its processor. The run trains, logs TRL's metric names and saves an adapter that reloads to
the trained policy; bad vision input (a missing or non-image file, images and prompt entries that disagree, a text
model given images) stops the run before training with the row and what to do."""

import contextlib
import io
import json

import datasets
import pytest
import torch

import _vision
from _shared import write_tiny_run
from fastdpo import cli
from fastdpo.data import VisionPairGrouping, pack, tokenize_vision_pairs
from fastdpo.models import load_causal_lm, load_lora_adapter, load_processing_class, resolve_model
from fastdpo.train.forward import pair_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def write_rows(directory, rows) -> str:
    """``rows`` as ``directory/train.jsonl``, their images in ``directory/img``."""
    return _vision.write_jsonl(directory / "train.jsonl", rows, directory / "img")


def run(model_dir, data, out, *extra):
    with contextlib.redirect_stdout(io.StringIO()):
        return cli.train(["--model", str(model_dir), "--dataset", data, "--use-peft", "--lora-r", "4",
                          "--learning-rate", "1e-2", "--max-steps", "2", "--logging-steps", "1", "--max-length", "128",
                          "--output-dir", str(out), "--report-to", "none", "--save-strategy", "no",
                          "--disable-tqdm", "true", *extra])


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return _vision.write_tiny_vlm(tmp_path_factory.mktemp("llava"), "llava")


def test_train_on_json_lines_with_image_files(llava_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_CACHE", str(tmp_path / "cache"))
    rows = _vision.vision_rows(6, 2)
    data = write_rows(tmp_path / "data", rows)
    trainer, _ = run(llava_dir, data, tmp_path / "out")
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(k in h for h in logs for k in METRICS)
    assert logs[-1]["loss"] < logs[0]["loss"]

    # the saved adapter, on a fresh copy of the base model, gives the trained policy's log-probs
    source = resolve_model(str(llava_dir))
    processor = load_processing_class(source)
    reloaded = load_lora_adapter(load_causal_lm(source, dtype=torch.float32), str(tmp_path / "out")).eval()
    pairs, _ = tokenize_vision_pairs(datasets.Dataset.from_list(rows), processor)
    batch = pack(list(pairs), VisionPairGrouping(prefix_sharing=True, image_processor=processor.image_processor))
    trained = trainer.model.eval()
    with torch.no_grad():
        want, got = pair_logps(trained, batch), pair_logps(reloaded, batch)
        with trained.disable_adapter():
            base = pair_logps(trained, batch)
    assert torch.allclose(got.chosen, want.chosen, rtol=1e-5) and torch.allclose(got.rejected, want.rejected, rtol=1e-5)
    assert not torch.allclose(base.chosen, want.chosen, rtol=1e-3)   # the adapter is not a no-op


@pytest.mark.parametrize("case, match", [
    ("missing file", r"row 1: images\[0\]: no image file .*correct the path or remove the row"),
    ("not an image", r"row 1: images\[0\]: .* is not an image PIL can read .*replace the file or remove the row"),
    ("too many images", r"row 1: 2 image\(s\) in the 'images' column but 1 \{'type': 'image'\} entries .*one entry "
                        r"per image"),
])
def test_bad_vision_rows_stop_the_run_with_the_row(llava_dir, tmp_path, case, match):
    rows = _vision.vision_rows(3, 1)
    data = write_rows(tmp_path / "data", rows)
    lines = [json.loads(line) for line in open(data)]
    if case == "missing file":
        lines[1]["images"] = ["img/nowhere.png"]
    elif case == "not an image":
        (tmp_path / "data" / "img" / "1-0.png").write_text("not a picture")
    else:
        lines[1]["images"] = ["img/1-0.png", "img/0-0.png"]
    with open(data, "w") as f:
        f.writelines(json.dumps(line) + "\n" for line in lines)
    with pytest.raises(ValueError, match=match):
        run(llava_dir, data, tmp_path / "out")


def test_a_text_model_given_images_is_refused_with_the_row(tmp_path):
    model_dir, _ = write_tiny_run(tmp_path, pairs=2)
    rows = _vision.vision_rows(2, 1)
    rows[0]["images"] = []   # the first row holding an image is row 1
    data = write_rows(tmp_path / "data", rows)
    with pytest.raises(ValueError, match=r"train row 1 holds images, but LlamaForCausalLM is a text model: train a "
                                         r"vision-language model .* or drop the images column"):
        run(model_dir, data, tmp_path / "out")
