"""Vision DPO against TRL 1.16's DPOTrainer on the same tiny model and rows, both families, one and two images per
prompt: per-completion log-probs, the loss and every trainable gradient (LoRA on the language model, and the vision
tower and projector trained in full) agree in fp32, in the shared-prefix layout (each pair's images through the vision
tower once, its prompt through the decoder once) and in the unshared one.

The comparison can fail: a stream whose rejected tokens also see the chosen completion, one whose rejected branch
lost its images, and Qwen2-VL positions that are 1-D instead of multimodal all move the log-probs past the
tolerance. Every reference mode gives that reference's log-probs of a packed vision batch, and the precomputed ones
are cached under a key that holds the images' pixels."""

from dataclasses import replace

import datasets
import pytest
import torch

import _vision
from _reference import rel_err
from fastdpo.data import VisionPairGrouping, pack, tokenize_vision_pairs
from fastdpo.models import vision as vision_models
from fastdpo.train import DPOConfig, DPOTrainer
from fastdpo.train.forward import pair_logps
from fastdpo.train.reference import reference_logps

trl = pytest.importorskip("trl")

TOL = 1e-5


def lora_config(train_vision: bool = False, family: str = "llava"):
    from peft import LoraConfig

    encoder = ["vision_tower", "multi_modal_projector"] if family == "llava" else ["visual"]
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                      exclude_modules=None if train_vision else rf".*({'|'.join(encoder)}).*",
                      modules_to_save=encoder if train_vision else None)


def randomised(model) -> None:
    """The same seeded random LoRA weights on every side (LoRA's B starts at zero: the policy would be its reference;
    its A from the global generator)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def trl_side(family, processor, rows, peft_config, tmp_path):
    """TRL 1.16's loss, per-completion log-probs ([B] chosen, [B] rejected) and trainable gradients."""
    model = _vision.tiny_model(family, processor, attn_implementation="sdpa")
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False, max_length=None,
                         gradient_checkpointing=False, disable_tqdm=True)
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             processing_class=processor, peft_config=peft_config)
    randomised(trainer.model)
    inputs = trainer.data_collator([dict(row) for row in rows])
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, inputs)
    loss.backward()
    kwargs = {k: v for k, v in inputs.items() if k != "completion_mask"}
    with torch.no_grad():
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        sums = trainer.model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True).log_probs.sum(1)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), sums.chunk(2), grads


def fastdpo_side(family, processor, rows, peft_config, tmp_path, prefix_sharing):
    model = _vision.tiny_model(family, processor)
    args = DPOConfig(output_dir=str(tmp_path / "fastdpo"), report_to=[], use_cpu=True, max_length=None,
                     max_tokens_per_batch=4096, prefix_sharing=prefix_sharing, disable_tqdm=True)
    trainer = DPOTrainer(model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=processor,
                         peft_config=peft_config)
    randomised(trainer.model)
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    assert batch.num_rows == len(rows) and (batch.segments is not None) == prefix_sharing
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    with torch.no_grad():
        policy = pair_logps(trainer.model, batch)
    grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.requires_grad}
    return loss.detach(), (policy.chosen, policy.rejected), grads


def assert_matches(ours, theirs):
    (loss, (chosen, rejected), grads), (trl_loss, (trl_chosen, trl_rejected), trl_grads) = ours, theirs
    assert rel_err(chosen, trl_chosen) <= TOL and rel_err(rejected, trl_rejected) <= TOL
    assert rel_err(loss, trl_loss) <= TOL, (loss.item(), trl_loss.item())
    assert grads.keys() == trl_grads.keys()
    for name, grad in grads.items():
        if grad is None or trl_grads[name] is None:
            # layers past the vision feature layer LLaVA reads feed nothing: no gradient on either side
            assert grad is None and trl_grads[name] is None, name
            continue
        if name.endswith("k_proj.bias"):
            # attention's softmax is invariant to a shift shared by every key: this gradient is zero up to rounding
            assert max(grad.abs().max(), trl_grads[name].abs().max()) < 1e-7, name
            continue
        assert trl_grads[name].abs().sum() > 0, name
        assert rel_err(grad, trl_grads[name]) <= TOL, name


@pytest.mark.parametrize("family", _vision.FAMILIES)
@pytest.mark.parametrize("per_row", [1, 2])
def test_logps_loss_and_gradients_equal_trls(family, per_row, tmp_path):
    processor = _vision.processor(family)
    rows = _vision.vision_rows(3, per_row, entries=per_row == 2)
    theirs = trl_side(family, processor, rows, lora_config(family=family), tmp_path)
    for sharing in (True, False):
        assert_matches(fastdpo_side(family, processor, rows, lora_config(family=family), tmp_path, sharing), theirs)


def test_a_trained_vision_tower_gets_trls_gradients(tmp_path):
    """The vision tower and projector trained in full: their gradient sums both completions' through the one pass."""
    processor = _vision.processor("llava")
    rows = _vision.vision_rows(2, 2)
    theirs = trl_side("llava", processor, rows, lora_config(True), tmp_path)
    ours = fastdpo_side("llava", processor, rows, lora_config(True), tmp_path, True)
    assert any("vision_tower" in name for name in ours[2])
    assert_matches(ours, theirs)


# ---------------------------------------------------------------- the comparison can fail
@pytest.fixture(scope="module")
def qwen_pairs():
    processor = _vision.processor("qwen2_vl")
    rows = _vision.vision_rows(2, 2)
    pairs, _ = tokenize_vision_pairs(datasets.Dataset.from_list(rows), processor)
    model = _vision.tiny_model("qwen2_vl", processor)
    grouping = VisionPairGrouping(prefix_sharing=True, image_processor=processor.image_processor)
    batch = pack(list(pairs), grouping)
    with torch.no_grad():
        unshared = pair_logps(model, pack(list(pairs), replace(grouping, prefix_sharing=False)))
    return model, batch, torch.cat([unshared.chosen, unshared.rejected])


def error(model, batch, want) -> float:
    with torch.no_grad():
        got = pair_logps(model, batch)
    return rel_err(torch.cat([got.chosen, got.rejected]), want)


def test_shared_equals_unshared_and_a_peeking_rejected_branch_fails(qwen_pairs):
    model, batch, want = qwen_pairs
    assert error(model, batch, want) <= TOL
    layout = batch.segments
    cu_q, cu_k, kv = layout.cu_seqlens_q.tolist(), layout.cu_seqlens_k.tolist(), layout.kv_index.tolist()
    # the first pair's rejected branch keys: its prompt, then (wrongly) the chosen completion, then itself
    prompt = cu_k[2] - cu_k[1] - (cu_q[2] - cu_q[1])
    peeking = kv[cu_k[1]:cu_k[1] + prompt] + list(range(cu_q[0] + prompt, cu_q[1])) + kv[cu_k[1] + prompt:cu_k[2]]
    kv_index = torch.tensor(kv[:cu_k[1]] + peeking + kv[cu_k[2]:])
    cu_k = torch.tensor(cu_k[:2] + [k + cu_q[1] - cu_q[0] - prompt for k in cu_k[2:]], dtype=torch.int32)
    peek = replace(layout, kv_index=kv_index, cu_seqlens_k=cu_k, max_seqlen_k=int(cu_k.diff().max()))
    assert error(model, replace(batch, segments=peek), want) > 1e-3


def test_a_rejected_branch_without_its_images_fails(qwen_pairs, monkeypatch):
    """The unshared layout with the rejected documents' image features zeroed (their images dropped)."""
    model, batch, want = qwen_pairs
    original = model.model.get_image_features

    def drop_every_other_pairs_images(pixel_values, image_grid_thw, **kwargs):
        out = original(pixel_values, image_grid_thw, **kwargs)
        per_row = 2
        out.pooler_output = tuple(f * 0 if (i // per_row) % 2 else f for i, f in enumerate(out.pooler_output))
        return out

    processor = _vision.processor("qwen2_vl")
    pairs = tokenize_vision_pairs(datasets.Dataset.from_list(_vision.vision_rows(2, 2)), processor)[0]
    unshared = pack(list(pairs), VisionPairGrouping(prefix_sharing=False, image_processor=processor.image_processor))
    assert error(model, unshared, want) <= TOL
    monkeypatch.setattr(model.model, "get_image_features", drop_every_other_pairs_images)
    assert error(model, unshared, want) > 1e-3


def test_one_dimensional_positions_fail_for_qwen2_vl(qwen_pairs, monkeypatch):
    model, batch, want = qwen_pairs
    monkeypatch.setattr(vision_models, "mrope_positions", lambda lm, b: b.position_ids[None].expand(3, -1, -1))
    assert error(model, batch, want) > 1e-3


# ---------------------------------------------------------------- every reference mode
def random_lora(model, adapter: str, seed: int) -> None:
    """Seeded random weights for ``adapter``'s LoRA matrices (B starts at zero: the adapter would be a no-op)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted((n, p) for n, p in model.named_parameters() if "lora_" in n and f".{adapter}." in n):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def qwen_policy(processor, seed: int = 3, model_seed: int = 0):
    from peft import get_peft_model

    policy = get_peft_model(_vision.tiny_model("qwen2_vl", processor, seed=model_seed), lora_config(family="qwen2_vl"))
    random_lora(policy, "default", seed)
    return policy


@pytest.mark.parametrize("mode", ["adapters disabled", "reference adapter", "separate model", "precomputed"])
def test_every_reference_mode_gives_the_references_logps(mode, tmp_path):
    """Each reference's log-probs of the trainer's packed vision batch are those of that reference model alone."""
    processor = _vision.processor("qwen2_vl")
    rows = _vision.vision_rows(3, 2)
    policy, ref_model, options = qwen_policy(processor), None, {}
    want_model = _vision.tiny_model("qwen2_vl", processor)       # the policy's base
    if mode == "reference adapter":
        policy.add_adapter("reference", lora_config(family="qwen2_vl"))
        random_lora(policy, "reference", 4)
        want_model = qwen_policy(processor, seed=4)
        options = dict(model_adapter_name="default", ref_adapter_name="reference")
    elif mode == "separate model":
        ref_model = want_model = _vision.tiny_model("qwen2_vl", processor, seed=1)
        options = dict(force_use_ref_model=True)      # TRL's opt-in to a separate model beside a PEFT policy
    args = DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_length=None, disable_tqdm=True,
                     precompute_ref_log_probs=mode == "precomputed", **options)
    trainer = DPOTrainer(policy, ref_model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=processor)
    batch = next(iter(trainer.get_eval_dataloader(trainer.train_dataset)))
    assert batch.images is not None and (mode == "precomputed") == ("ref_chosen_logps" in batch.row_values)
    trainer.model.eval()
    with torch.no_grad():
        want, own = pair_logps(want_model.eval(), batch), pair_logps(trainer.model, batch)
    got = reference_logps(trainer.reference, trainer.model, batch)
    assert rel_err(got[0], want.chosen) <= TOL and rel_err(got[1], want.rejected) <= TOL
    assert rel_err(got[0], own.chosen) > 1e-3      # the reference, not the policy


def test_the_precomputed_reference_is_keyed_by_the_images_content(tmp_path, fastdpo_cache):
    """Rows naming image files by path: a dataset's fingerprint holds the paths only, so an image rewritten in place
    must still compute new reference log-probs, not load the old ones."""
    processor = _vision.processor("qwen2_vl")
    rows = _vision.vision_rows(2, 1)
    for i, row in enumerate(rows):
        row["images"][0].save(tmp_path / f"{i}.png")
        row["images"] = [str(tmp_path / f"{i}.png")]

    def precomputed():
        args = DPOConfig(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, max_length=None,
                         disable_tqdm=True, precompute_ref_log_probs=True)
        data = datasets.Dataset.from_list(rows)
        trainer = DPOTrainer(qwen_policy(processor), args=args, train_dataset=data, processing_class=processor)
        return data._fingerprint, trainer.train_dataset["ref_chosen_logps"]

    fingerprint, first = precomputed()
    assert precomputed() == (fingerprint, first) and len(list((fastdpo_cache / "ref_logps").iterdir())) == 1
    _vision.images(1, seed=9)[0].save(tmp_path / "0.png")
    again, second = precomputed()
    assert again == fingerprint and second[0] != first[0]
    assert len(list((fastdpo_cache / "ref_logps").iterdir())) == 2
