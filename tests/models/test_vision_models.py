"""Vision-language models: loaded with their processor from a checkpoint directory (the decoder on fastdpo's
attention, the vision tower on sdpa), LoRA on the language model only with the vision tower frozen or trained in full
(and both saved and reloaded), other families refused by name, and a vision encoder never made causal by the packed
attention paths."""

import pytest
import torch

import _vision
from _shared import tiny_llama
from fastdpo.models import (
    apply_lora,
    is_vision_model,
    load_causal_lm,
    load_lora_adapter,
    load_processing_class,
    resolve_model,
    set_encoder_trainable,
)
from fastdpo.models.vision import encoder_names


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return _vision.write_tiny_vlm(tmp_path_factory.mktemp("llava"), "llava")


def test_a_vision_checkpoint_loads_with_its_processor(llava_dir, tmp_path):
    source = resolve_model(str(llava_dir))
    assert is_vision_model(source)
    model = load_causal_lm(source, attn_implementation="packed_sdpa")
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert model.config.text_config._attn_implementation == "packed_sdpa"
    assert model.config.vision_config._attn_implementation == "sdpa"
    processor = load_processing_class(source)
    assert type(processor).__name__ == "LlavaProcessor" and processor.tokenizer.pad_token == "<pad>"
    text_dir = tmp_path / "text"
    tiny_llama().save_pretrained(text_dir)
    assert not is_vision_model(resolve_model(str(text_dir)))


def test_other_vision_families_are_refused_by_name(tmp_path):
    from transformers import PaliGemmaConfig

    PaliGemmaConfig().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="'paligemma' vision-language models are not supported: fastdpo trains"):
        is_vision_model(resolve_model(str(tmp_path)))


@pytest.mark.parametrize("family", _vision.FAMILIES)
def test_lora_goes_on_the_language_model_and_the_vision_tower_stays_frozen(family):
    model = _vision.tiny_model(family, _vision.processor(family))
    encoder = encoder_names(model)
    assert encoder == (["model.vision_tower", "model.multi_modal_projector"] if family == "llava" else ["model.visual"])
    peft_model = apply_lora(model, r=2, alpha=4, dropout=0.0)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name and "language_model" in name for name in trainable)
    assert not any("lora_" in name and any(e in name for e in encoder) for name, _ in peft_model.named_parameters())


def test_the_vision_tower_can_train_and_reloads_with_the_adapter(tmp_path):
    processor = _vision.processor("llava")
    model = apply_lora(_vision.tiny_model("llava", processor), r=2, alpha=4, dropout=0.0, train_vision=True)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert any("vision_tower" in name and "lora_" not in name for name in trainable)
    assert any("multi_modal_projector" in name for name in trainable)
    assert not any("lora_" in name and "vision_tower" in name for name in trainable)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    model.save_pretrained(tmp_path)
    reloaded = load_lora_adapter(_vision.tiny_model("llava", processor), str(tmp_path))
    theirs = dict(reloaded.named_parameters())
    for name, p in model.named_parameters():
        assert torch.equal(p, theirs[name]), name
    with pytest.raises(ValueError, match="this model has none"):
        apply_lora(tiny_llama(), train_vision=True)


def test_full_fine_tuning_freezes_the_encoder_unless_asked():
    model = _vision.tiny_model("qwen2_vl", _vision.processor("qwen2_vl"))
    set_encoder_trainable(model, False)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {name for name, _ in model.named_parameters() if name.startswith("model.visual.")}
    set_encoder_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("family", _vision.FAMILIES)
def test_packed_sdpa_leaves_a_vision_encoder_bidirectional(family):
    processor = _vision.processor(family)
    rows = _vision.vision_rows(1, 2)
    inputs = processor.image_processor(images=rows[0]["images"], return_tensors="pt")
    features = []
    for vision_attention in ("sdpa", "packed_sdpa"):
        model = _vision.tiny_model(family, processor)
        model.config.vision_config._attn_implementation = vision_attention
        with torch.no_grad():
            features.append(torch.cat(model.get_image_features(**inputs).pooler_output))
    assert torch.equal(features[0], features[1])
