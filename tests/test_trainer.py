"""DPOTrainer on a tiny random Llama with SmolLM2's vocabulary: accumulation, reference modes,
LoRA/QLoRA steps, metrics and saving."""

import math

import datasets
import pytest
import torch

from fastdpo import DPOConfig, DPOTrainer
from fastdpo.modeling import packed_sequence_logps
from fastdpo.packing import pack_pairs
from _reference import rel_err
from _shared import tiny_llama

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def pairs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, 49152, (k,), generator=g).tolist()
    return datasets.Dataset.from_list([
        {"prompt_input_ids": rand(int(torch.randint(2, 9, (1,), generator=g))),
         "chosen_input_ids": rand(int(torch.randint(1, 6, (1,), generator=g))),
         "rejected_input_ids": rand(int(torch.randint(1, 6, (1,), generator=g)))}
        for _ in range(n)
    ])


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                max_tokens_per_batch=1000, learning_rate=1e-3, seed=0, disable_tqdm=True, beta=0.5)
    base.update(kw)
    return DPOConfig(**base)


def lora(model, seed=0):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in peft_model.named_parameters():      # non-zero B so policy != reference from step 0
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model


def test_gradient_accumulation_equals_one_big_micro_batch(tmp_path):
    """One micro-batch of 4 pairs == 4 micro-batches of 1 pair (fp32): same loss, same update."""
    g = torch.Generator().manual_seed(9)
    data = datasets.Dataset.from_list([{k: torch.randint(3, 49152, (n,), generator=g).tolist() for k, n in
                                        (("prompt_input_ids", 5), ("chosen_input_ids", 3 + i), ("rejected_input_ids", 4))}
                                       for i in range(4)])
    results = []
    for budget, accumulation in ((1000, 1), (20, 4)):       # pairs take 17-20 tokens: one per 20-token batch
        model, ref = tiny_llama(seed=2), tiny_llama(seed=3)
        args = config(tmp_path, max_tokens_per_batch=budget, gradient_accumulation_steps=accumulation, max_steps=1,
                      optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = DPOTrainer(model, ref, args=args, train_dataset=data)
        assert len(trainer.get_train_dataloader()) == accumulation
        trainer.train()
        delta = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])
        results.append((trainer.state.log_history[0]["loss"], delta))
    (loss_a, delta_a), (loss_b, delta_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    assert delta_a.abs().sum() > 0 and rel_err(delta_b, delta_a) <= 1e-5


def test_precomputed_reference_equals_live_reference(tmp_path):
    data = pairs(6, seed=1)
    losses = {}
    for precompute in (False, True):
        model = lora(tiny_llama(seed=4), seed=5)
        trainer = DPOTrainer(model, args=config(tmp_path, precompute_ref_log_probs=precompute, max_tokens_per_batch=60),
                             train_dataset=data, eval_dataset=data)
        if precompute:
            assert trainer.ref_model is None and "ref_chosen_logps" in trainer.train_dataset.column_names
        losses[precompute] = trainer.evaluate()["eval_loss"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    assert losses[True] != pytest.approx(math.log(2), rel=1e-3)     # the adapter moved the policy off the reference


def test_separate_reference_model_and_reference_free(tmp_path):
    data = pairs(5, seed=2)
    model = tiny_llama(seed=6)
    same = DPOTrainer(model, tiny_llama(seed=6), args=config(tmp_path), train_dataset=data, eval_dataset=data)
    assert same.evaluate()["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)   # policy == reference
    free = DPOTrainer(model, args=config(tmp_path, reference_free=True), train_dataset=data, eval_dataset=data)
    batch = pack_pairs(list(data))
    with torch.no_grad():
        c, r, _ = packed_sequence_logps(model, batch)
    want = torch.nn.functional.softplus(-0.5 * (c - r)).mean().item()
    assert free.evaluate()["eval_loss"] == pytest.approx(want, rel=1e-5)


def test_lora_training_logs_trl_metrics_and_saves(tmp_path):
    data = pairs(8, seed=3)
    model = lora(tiny_llama(seed=7))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    args = config(tmp_path, max_tokens_per_batch=80, num_train_epochs=2, eval_strategy="epoch")
    trainer = DPOTrainer(model, args=args, train_dataset=data, eval_dataset=pairs(3, seed=4))
    trainer.train()
    train_logs = [h for h in trainer.state.log_history if "loss" in h]
    eval_logs = [h for h in trainer.state.log_history if "eval_loss" in h]
    assert train_logs and len(eval_logs) == 2
    for h in train_logs:
        assert all(math.isfinite(h[k]) for k in METRICS + ("loss", "tokens_per_second", "packing_efficiency"))
        assert h["packing_efficiency"] == 1.0 and 0 <= h["rewards/accuracies"] <= 1
        assert h["rewards/margins"] == pytest.approx(h["rewards/chosen"] - h["rewards/rejected"], abs=1e-6)
    assert all(f"eval_{k}" in eval_logs[-1] for k in METRICS)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
    assert all(torch.equal(p, base_before[n]) for n, p in model.named_parameters() if n in base_before)

    trainer.save_model(str(tmp_path / "adapter"))
    from peft import PeftModel

    reloaded = PeftModel.from_pretrained(tiny_llama(seed=7), str(tmp_path / "adapter")).eval()
    batch = pack_pairs(list(data))
    model.eval()
    with torch.no_grad():
        want = packed_sequence_logps(model, batch)[:2]
        got = packed_sequence_logps(reloaded, batch)[:2]
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(got, want))


def test_qlora_step_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    tiny_llama(seed=8).save_pretrained(tmp_path / "tiny")
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "tiny", dtype=torch.float32,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_compute_dtype=torch.float32))
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    trainer = DPOTrainer(model, args=config(tmp_path, max_steps=2, max_tokens_per_batch=60), train_dataset=pairs(4))
    trainer.train()
    assert all(math.isfinite(h["loss"]) for h in trainer.state.log_history if "loss" in h)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if n in lora_before)
