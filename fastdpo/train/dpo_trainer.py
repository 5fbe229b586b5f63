"""``DPOTrainer``: offline DPO-family training on ``transformers.Trainer`` — preference rows tokenised and packed
under a token budget, the reference live or precomputed once and cached."""

from __future__ import annotations

import datasets
import torch
from datasets.fingerprint import Hasher
from tqdm.auto import tqdm

from ..data import (
    PairGrouping,
    VisionPairGrouping,
    first_row_with_images,
    images_fingerprint,
    tokenize_pairs,
    tokenize_vision_pairs,
)
from ..data.packing import REF_COLUMNS
from ..models import causal_lm, vision_family
from .config import DPOConfig
from .reference import AdapterReference, PrecomputedReference, reference_logps
from .reference_cache import ReferenceKey, with_cached_ref_logps
from .trainer import PreferenceTrainer

TOKENIZED_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


class DPOTrainer(PreferenceTrainer):
    """Direct Preference Optimisation (Rafailov et al. 2023) and its family (``fastdpo.dpo_loss``'s losses) on
    ``transformers.Trainer``, with packed pairs and fused log-probs. The README's "Training" and "Reference
    options" sections describe the modes; ``DPOConfig`` documents every option.

    Args:
        model: the policy, a causal LM (or a ``peft.PeftModel``; with ``peft_config`` it is wrapped here).
        ref_model: a frozen reference model (with a PEFT policy only with ``args.force_use_ref_model``); None:
            the reference is the PEFT policy with its adapters disabled (or ``args.ref_adapter_name``), or a
            frozen copy of a fully fine-tuned policy, or nothing for a reference-free loss.
        args: a ``DPOConfig``.
        train_dataset, eval_dataset: raw preference rows in any of TRL's formats (tokenised here with
            ``fastdpo.data.tokenize_pairs``), TRL's vision rows with an ``images`` column (a vision-language model
            and its processor: ``fastdpo.data.tokenize_vision_pairs``; packed with their images, prompt and images
            once per pair with prefix sharing) or already tokenised pairs (with ``images`` for vision rows).
        processing_class: the tokenizer, or a vision-language model's processor (required for raw rows; saved with
            the model).
        peft_config: a ``peft`` config to wrap ``model`` with.

    Raises:
        ValueError: raw rows without a tokenizer, rows with images for a text model or without a processor (the first
            such row named), the errors of tokenisation and packing (malformed rows, pairs longer than the token
            budget), of ``DPOConfig`` and of ``PreferenceTrainer``.
    """

    tokenized_columns = TOKENIZED_COLUMNS

    def __init__(self, model, ref_model=None, args: DPOConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, **kwargs):
        args = args or DPOConfig(output_dir="fastdpo-output")
        self.image_processor = _image_processor(model, processing_class, train_dataset, eval_dataset)
        if self.image_processor is not None:
            self.tokenized_columns = (*TOKENIZED_COLUMNS, "images")
        super().__init__(model, ref_model, args=args, peft_config=peft_config, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        if self.reference is None:
            return
        if args.precompute_ref_log_probs:
            self.train_dataset = self._with_reference(self.train_dataset, "train")
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference(self.eval_dataset, "eval")
            self.reference = PrecomputedReference()   # the reference model is released: training never needs it
        elif set(REF_COLUMNS) <= set(self.train_dataset.column_names):
            self.reference = PrecomputedReference(fallback=self.reference)

    # ------------------------------------------------------------------ data
    def pair_grouping(self, prefix_sharing: bool) -> PairGrouping:
        if self.image_processor is None:
            return super().pair_grouping(prefix_sharing)
        return VisionPairGrouping(prefix_sharing, image_processor=self.image_processor)

    def tokenize(self, dataset, tokenizer, args: DPOConfig):
        if self.image_processor is not None:
            return tokenize_vision_pairs(dataset, tokenizer, max_length=args.max_length, num_proc=args.dataset_num_proc)
        return tokenize_pairs(dataset, getattr(tokenizer, "tokenizer", tokenizer), max_length=args.max_length,
                              max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
                              num_proc=args.dataset_num_proc)

    # ------------------------------------------------------- precomputed reference
    def _with_reference(self, dataset: datasets.Dataset, split: str) -> datasets.Dataset:
        """The dataset with reference log-prob columns, computed once per ``ReferenceKey`` (data, reference weights
        and config, layout, packing, precision) and cached on disk (``fastdpo.train.reference_cache``): each
        machine's main process computes or loads them first, the other processes then load its file."""
        ref = self.ref_model if self.ref_model is not None else self.accelerator.unwrap_model(self.model)
        # A reference adapter is part of the reference; disabled adapters are not.
        adapter = isinstance(self.reference, AdapterReference) and self.reference.ref_adapter_name is not None
        images = images_fingerprint(dataset)
        # a vision dataset's fingerprint holds only its images' paths: its key holds their content too
        data = dataset._fingerprint if images is None else Hasher.hash((dataset._fingerprint, images))
        key = ReferenceKey.of(ref, self.args, data=data, prefix_sharing=self.prefix_sharing, adapter=adapter)
        return with_cached_ref_logps(dataset, key, REF_COLUMNS, lambda: self._compute_reference(dataset, split),
                                     self.accelerator, f"reference log-probs ({split})")

    def _compute_reference(self, dataset: datasets.Dataset, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """[B] float32 chosen and rejected reference log-probs of every pair, in token-budget micro-batches."""
        model = self.ref_model if self.ref_model is not None else self.model
        rows = dataset.select_columns(list(self.tokenized_columns))
        chosen, rejected = torch.empty(len(rows)), torch.empty(len(rows))
        sampler = self.batch_sampler(rows, shuffle=False, seed=0, batch_size=self.args.per_device_eval_batch_size)
        was_training = model.training
        model.eval()
        try:
            for idx in tqdm(sampler, desc=f"reference log-probs ({split})", disable=self.args.disable_tqdm):
                batch = self._prepare_inputs(self.data_collator([rows[i] for i in idx]))
                with self.compute_loss_context_manager():
                    c, r = reference_logps(self.reference, self.model, batch)
                chosen[idx], rejected[idx] = c.float().cpu(), r.float().cpu()
        finally:
            model.train(was_training)
        return chosen, rejected


def _image_processor(model, processing_class, *datasets_):
    """The image processor of ``processing_class`` where a dataset holds images, else None.

    Raises:
        ValueError: images for a text model or without a processor, naming the first row that holds one.
    """
    rows = [(name, first_row_with_images(d)) for name, d in zip(("train", "eval"), datasets_) if d is not None]
    with_images = [(name, row) for name, row in rows if row is not None]
    if not with_images:
        return None
    lm = causal_lm(model)
    image_processor = getattr(processing_class, "image_processor", None)
    if vision_family(lm.config) is None or image_processor is None:
        split, row = with_images[0]
        what = (f"{type(lm).__name__} is a text model" if vision_family(lm.config) is None
                else f"the processing class ({type(processing_class).__name__}) has no image processor")
        raise ValueError(f"{split} row {row} holds images, but {what}: train a vision-language model (LLaVA, Qwen2-VL, "
                         "Qwen2.5-VL) with its processor as processing_class, or drop the images column")
    return image_processor
