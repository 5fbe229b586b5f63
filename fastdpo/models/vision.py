"""Vision-language (image-text-to-text) models: the families fastdpo trains, their vision encoder (frozen, or trained
fully), and the forward inputs of a packed stream with images.

Two families of ``transformers`` models: LLaVA (``LlavaForConditionalGeneration``: a vision tower and a projector
whose features replace each image's placeholder tokens, 1-D positions) and Qwen2-VL / Qwen2.5-VL (a vision transformer
with its patch merger, a grid of tokens per image, 3-D multimodal RoPE). Any other vision-language model is refused,
naming its type. The language model is the decoder the forward hook of ``fastdpo.train.forward.label_logps`` reads,
and its ``lm_head`` the head of the fused log-probs, as for a text model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..data import PackedBatch


@dataclass(frozen=True)
class VisionFamily:
    """What fastdpo needs to know of a family of vision-language models.

    Attributes:
        encoder: the attributes, on the model's ``model`` (its base), of the vision tower and the projector.
        mrope: positions are 3-D multimodal RoPE (the base's ``get_rope_index``), else the stream's 1-D positions.
    """

    encoder: tuple[str, ...]
    mrope: bool = False


FAMILIES = {
    "llava": VisionFamily(("vision_tower", "multi_modal_projector")),
    "qwen2_vl": VisionFamily(("visual",), mrope=True),
    "qwen2_5_vl": VisionFamily(("visual",), mrope=True),
}


def vision_family(config) -> VisionFamily | None:
    """The family of a vision-language model's config, None for a text model's (no ``vision_config``).

    Raises:
        ValueError: a vision-language model of another family (named).
    """
    if getattr(config, "vision_config", None) is None:
        return None
    family = FAMILIES.get(config.model_type)
    if family is None:
        raise ValueError(f"{config.model_type!r} vision-language models are not supported: fastdpo trains the "
                         f"families {', '.join(FAMILIES)} (LLaVA, Qwen2-VL, Qwen2.5-VL) and text models; use one of "
                         "those")
    return family


def encoder_names(model: torch.nn.Module) -> list[str]:
    """The module names (in ``model``) of a vision-language model's vision tower and projector; [] for a text model."""
    family = vision_family(model.config)
    if family is None:
        return []
    encoder = [getattr(model.model, name) for name in family.encoder]
    return [name for name, module in model.named_modules() if any(module is m for m in encoder)]


def encoder_pattern(model: torch.nn.Module) -> str | None:
    """A regular expression (``re.fullmatch``) of the vision encoder's modules and everything in them, None for a text
    model: peft's ``exclude_modules`` keeps LoRA on the language model with it."""
    names = encoder_names(model)
    return rf"(?:{'|'.join(map(re.escape, names))})(?:\..*)?" if names else None


def set_encoder_trainable(model: torch.nn.Module, trainable: bool) -> None:
    """Freeze (the default for training) or unfreeze the vision tower and projector of a vision-language model."""
    modules = dict(model.named_modules())
    for name in encoder_names(model):
        modules[name].requires_grad_(trainable)


def model_inputs(lm: torch.nn.Module, batch: PackedBatch) -> dict[str, torch.Tensor]:
    """The keyword arguments of ``lm``'s forward for a packed stream: ``input_ids`` and ``position_ids``; with images
    their ``pixel_values`` (and Qwen2-VL's ``image_grid_thw``); for a model with 3-D RoPE, positions [4, 1, T]: the
    stream's (transformers reads packed sequences from them), then ``mrope_positions``.

    Args:
        lm: the transformers model (inside its wrappers: ``fastdpo.models.causal_lm``).

    Raises:
        ValueError: a batch with images for a text model; as ``vision_family``.
    """
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    family = vision_family(lm.config)
    if batch.images is not None:
        if family is None:
            raise ValueError(f"this micro-batch holds images, but {type(lm).__name__} is a text model: train a "
                             f"vision-language model ({', '.join(FAMILIES)}) or drop the images column")
        inputs["pixel_values"] = batch.images.pixel_values
        if batch.images.image_grid_thw is not None:
            inputs["image_grid_thw"] = batch.images.image_grid_thw
    if family is not None and family.mrope:
        inputs["position_ids"] = torch.cat([batch.position_ids[None], mrope_positions(lm, batch)])
    return inputs


def mrope_positions(lm: torch.nn.Module, batch: PackedBatch) -> torch.Tensor:
    """[3, 1, T] int64 multimodal RoPE positions (time, height, width) of a packed stream: each segment's as in its
    ``prompt + completion`` alone, given by the model's own ``get_rope_index`` on that virtual sequence (a branch's
    prompt read from its root), so a completion branching off a shared prompt is placed exactly as in its own
    sequence. A stream without images has its 1-D positions on all three axes, as text has."""
    if batch.images is None:
        return batch.position_ids[None].expand(3, -1, -1)
    ids = batch.input_ids[0].cpu()
    image = ids == lm.config.image_token_id
    first = image & ~torch.cat([image.new_zeros(1), image[:-1]])     # each image's first placeholder token
    ordinal = first.cumsum(0) - 1                                     # its image's index in the stream
    grids = batch.images.image_grid_thw.cpu()
    positions = torch.empty(3, ids.numel(), dtype=torch.long)
    for keys, own in _virtual_sequences(batch):
        rope, _ = lm.model.get_rope_index(ids[keys][None], mm_token_type_ids=image[keys][None].int(),
                                          image_grid_thw=grids[ordinal[keys][first[keys]]])
        positions[:, own] = rope[:, 0, keys.numel() - (own.stop - own.start):]
    return positions[:, None].to(batch.input_ids.device)


def _virtual_sequences(batch: PackedBatch) -> list[tuple[torch.Tensor, slice]]:
    """(stream positions of its prompt + completion, its own span in the stream) of each segment."""
    if batch.segments is None:
        cu = batch.cu_seqlens.tolist()
        return [(torch.arange(s, e), slice(s, e)) for s, e in zip(cu[:-1], cu[1:])]
    layout = batch.segments
    kv, cu_q, cu_k = layout.kv_index.cpu(), layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist()
    return [(kv[ks:ke], slice(s, e)) for s, e, ks, ke in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
