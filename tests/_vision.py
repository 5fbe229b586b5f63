"""Tiny vision-language models and their processors, built from configs with random weights and assembled here (no
download), and images generated on the spot: for the vision tests and the vision step benchmark.

Two families: a LLaVA (CLIP vision tower, a projector, a Llama decoder; every image a fixed number of tokens) and a
Qwen2-VL (its own vision tower and patch merger, a grid of tokens per image that depends on the image's size, 3-D
multimodal RoPE). Both tokenizers are byte-level with the family's special tokens and a chat template in its style.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

FAMILIES = ("llava", "qwen2_vl")
LLAVA_SPECIALS = ["<image>"]
QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

_PARTS = "{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m['content'] %}" \
         "{% if p['type'] == 'image' %}IMAGE{% else %}{{ p['text'] }}{% endif %}{% endfor %}{% endif %}"
LLAVA_TEMPLATE = ("{% for m in messages %}{{ m['role'] | upper }}: " + _PARTS.replace("IMAGE", "<image>\n")
                  + "{{ '\n' }}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}")
QWEN_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
                 + _PARTS.replace("IMAGE", "<|vision_start|><|image_pad|><|vision_end|>")
                 + "<|im_end|>{{ '\n' }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}"
                 "{% endif %}")

#: the decoder of each tiny model (and, scaled up, of the benchmark's)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            initializer_range=0.1)   # weights large enough that positions and masks move the log-probs


def byte_tokenizer(specials: list[str]):
    """One token per byte, pad ``<pad>`` 0, eos ``</s>`` 1, then ``specials``; no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    names = ["<pad>", "</s>", "<unk>", *specials]
    vocab = {token: i for i, token in enumerate(names + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.add_special_tokens({"additional_special_tokens": specials})
    return fast


def llava_processor(image_size: int = 28):
    """LLaVA's processor: CLIP's image processing at ``image_size`` (a multiple of 14), (image_size / 14)² tokens
    per image."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    images = CLIPImageProcessorPil(size={"shortest_edge": image_size}, crop_size={"height": image_size,
                                                                                   "width": image_size})
    return LlavaProcessor(image_processor=images, tokenizer=byte_tokenizer(LLAVA_SPECIALS), patch_size=14,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          chat_template=LLAVA_TEMPLATE)


def _image_only_qwen2_vl_processor():
    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
        """Qwen2-VL's processor without its video processor, which needs torchvision (not installed here)."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = "<|image_pad|>", "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    return ImageOnlyQwen2VLProcessor


def qwen2_vl_processor(max_pixels: int = 56 * 84):
    """Qwen2-VL's processor: images resized to at most ``max_pixels`` pixels (multiples of 28 a side), one token per
    28 × 28 pixels."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    images = Qwen2VLImageProcessorPil(min_pixels=28 * 28, max_pixels=max_pixels, patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    return _image_only_qwen2_vl_processor()(image_processor=images, tokenizer=byte_tokenizer(QWEN_SPECIALS),
                                            chat_template=QWEN_TEMPLATE)


def processor(family: str):
    return {"llava": llava_processor, "qwen2_vl": qwen2_vl_processor}[family]()


def llava_config(processor, text: dict = TEXT):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    tokenizer, size = processor.tokenizer, processor.image_processor.crop_size["height"]
    return LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                       image_size=size, patch_size=14),
        text_config=LlamaConfig(**text, vocab_size=len(tokenizer), bos_token_id=None, eos_token_id=1, pad_token_id=0,
                                tie_word_embeddings=False),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"), vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")


def qwen2_vl_config(processor, text: dict = TEXT):
    from transformers import Qwen2VLConfig

    ids = {name: processor.tokenizer.convert_tokens_to_ids(name) for name in QWEN_SPECIALS}
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    section = [head_dim // 8, 3 * head_dim // 16, 3 * head_dim // 16]    # t, h, w halves of the rotary dims
    return Qwen2VLConfig(
        text_config=dict(**text, vocab_size=len(processor.tokenizer), bos_token_id=None, eos_token_id=1,
                         pad_token_id=0,
                         rope_parameters={"rope_type": "default", "mrope_section": section, "rope_theta": 10000.0}),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def tiny_model(family: str, processor, *, seed: int = 0, text: dict = TEXT, attn_implementation: str = "packed_sdpa"):
    """The family's model for ``processor``'s vocabulary, random weights (seeded), fp32, in eval mode; its decoder
    on ``attn_implementation``, its vision tower on sdpa."""
    import torch
    from transformers import LlavaForConditionalGeneration, Qwen2VLForConditionalGeneration

    import fastdpo.models  # noqa: F401  registers packed_sdpa

    config, cls = {"llava": (llava_config, LlavaForConditionalGeneration),
                   "qwen2_vl": (qwen2_vl_config, Qwen2VLForConditionalGeneration)}[family]
    config = config(processor, text)
    config.use_cache = False
    torch.manual_seed(seed)
    model = cls._from_config(config, attn_implementation={"text_config": attn_implementation, "vision_config": "sdpa"})
    return model.eval()


def write_tiny_vlm(directory, family: str = "llava", seed: int = 0):
    """A tiny checkpoint of ``family`` with its processor saved beside it (``AutoProcessor`` loads it back; LLaVA's
    only without torchvision, as Qwen2-VL's processor needs its video processor). Returns the directory."""
    proc = processor(family)
    tiny_model(family, proc, seed=seed).save_pretrained(directory)
    proc.save_pretrained(directory)
    return directory


#: (width, height) of generated images, in turn: two grids for Qwen2-VL's processor (4 × 4 and 2 × 6 patches of 14 pixels)
SIZES = ((60, 45), (90, 40))


def images(count: int, *, seed: int = 0, sizes=SIZES):
    """``count`` random RGB images, of ``sizes`` (width, height) in turn."""
    from PIL import Image

    g = np.random.default_rng(seed)
    return [Image.fromarray(g.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in
            (sizes[i % len(sizes)] for i in range(count))]


def vision_rows(count: int, images_per_row: int = 1, *, entries: bool = True, seed: int = 0, sizes=SIZES):
    """Conversational preference rows in TRL's vision format, the images (PIL) in an ``images`` column; with
    ``entries`` the prompts hold their image entries, else their contents are strings (TRL then puts the images at the
    start of the first user message)."""
    pictures = images(count * images_per_row, seed=seed, sizes=sizes)
    rows = []
    for i in range(count):
        text = f"What is in picture {i}?"
        content = [*[{"type": "image"}] * images_per_row, {"type": "text", "text": text}] if entries else text
        rows.append({"images": pictures[i * images_per_row:(i + 1) * images_per_row],
                     "prompt": [{"role": "user", "content": content}],
                     "chosen": [{"role": "assistant", "content": f"A cat, {i}."}],
                     "rejected": [{"role": "assistant", "content": f"Dogs {'and more dogs ' * (i % 3)}{i}."}]})
    return rows


def write_jsonl(data_file, rows, image_dir) -> str:
    """``rows`` (``vision_rows``) as the JSON Lines file ``data_file``, each image saved as a PNG in ``image_dir`` and
    named by its path relative to the file's folder (as TRL's local vision datasets are)."""
    data_file, image_dir = Path(data_file), Path(image_dir)
    data_file.parent.mkdir(parents=True, exist_ok=True)
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(data_file, "w") as f:
        for i, row in enumerate(rows):
            paths = []
            for k, image in enumerate(row["images"]):
                image.save(image_dir / f"{i}-{k}.png")
                paths.append(os.path.relpath(image_dir / f"{i}-{k}.png", data_file.parent))
            f.write(json.dumps({**row, "images": paths}) + "\n")
    return str(data_file)

