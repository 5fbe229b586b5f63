"""Training with the shared-prefix layout: every loss input (LD-DPO, WPO, ORPO's prompt NLL) and the training trace
under each reference mode equal the unshared layout's; the MoE aux loss routes each prompt token once; online DPO's
sampled pairs share their prompt; an attention without a shared-prefix path falls back, saying so; and real
`fastdpo train` runs on HH and UltraFeedback with the shared SmolLM2."""

import logging

import pytest
import torch
from peft import LoraConfig
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from _reference import rel_err
from _shared import HH_HARMLESS, SMOLLM2_GGUF, ULTRAFEEDBACK, config, lora, pairs, require, smollm2_tokenizer, tiny_llama
from fastdpo import DPOTrainer, OnlineDPOConfig, OnlineDPOTrainer, cli
from fastdpo.data.packing import pack_pairs
from fastdpo.train.forward import packed_sequence_logps, pair_logps

needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")


@pytest.mark.parametrize("options", [{}, {"ld_alpha": 0.4}, {"wpo": True}, {"prompt_nll": True}],
                         ids=["plain", "ld_dpo", "wpo", "orpo_prompt_nll"])
def test_pair_logps_and_lora_gradients_equal_unshared(options):
    model = lora(tiny_llama(seed=2, attn_implementation="packed_sdpa"))
    rows = list(pairs(7, seed=3))
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(4))
    results = []
    for shared in (False, True):
        model.zero_grad()
        out = pair_logps(model, pack_pairs(rows, prefix_sharing=shared), **options)
        ((weights[0] * out.chosen + weights[1] * out.rejected + weights[2] * out.chosen_nll).sum()).backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (want, want_grads), (got, got_grads) = results
    for field in ("chosen", "rejected", "chosen_nll") + (("wpo_weights",) if options.get("wpo") else ()):
        assert rel_err(getattr(got, field).detach(), getattr(want, field).detach()) <= 1e-5, field
    for field in ("chosen_lengths", "rejected_lengths", "nll_tokens"):
        assert torch.equal(getattr(got, field), getattr(want, field)), field
    assert want_grads and all(rel_err(got_grads[n], g) <= 1e-5 for n, g in want_grads.items())


def _two_adapters(model):
    peft_model = lora(model)
    peft_model.add_adapter("reference", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B.reference" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model


REFERENCE_MODES = {
    "adapter_disabled": (lambda: (lora(tiny_llama(seed=5)), None), {}),
    "reference_adapter": (lambda: (_two_adapters(tiny_llama(seed=5)), None),
                          {"model_adapter_name": "default", "ref_adapter_name": "reference"}),
    "precomputed": (lambda: (lora(tiny_llama(seed=5)), None), {"precompute_ref_log_probs": True}),
    "ref_model": (lambda: (tiny_llama(seed=5), tiny_llama(seed=6)), {}),
}


@pytest.mark.parametrize("mode", list(REFERENCE_MODES))
def test_training_trace_equals_unshared(tmp_path, mode):
    """Three steps on the same pairs, each reference mode: the same logged trace in both layouts."""
    build, options = REFERENCE_MODES[mode]
    data = pairs(8, seed=7)
    traces = []
    for shared in (False, True):
        model, ref = build()
        trainer = DPOTrainer(model, ref, args=config(tmp_path / str(shared), prefix_sharing=shared, max_steps=3,
                                                     **options), train_dataset=data)
        assert trainer.prefix_sharing is shared
        trainer.train()
        traces.append(torch.tensor([[h[k] for k in ("loss", "rewards/margins", "logps/chosen", "logps/rejected")]
                                    for h in trainer.state.log_history if "loss" in h]))
    assert traces[0].shape == (3, 4) and rel_err(traces[1], traces[0]) <= 1e-5


def test_moe_aux_loss_routes_each_prompt_token_once(tmp_path):
    """The aux loss of a shared-prefix stream is transformers' load_balancing_loss_func over the router logits of
    every prompt and chosen token (from prompt + chosen) and every rejected token (from prompt + rejected)."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(8)
    model = MixtralForCausalLM(MixtralConfig(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=4, num_experts_per_tok=2, intermediate_size=64, output_router_logits=True,
        router_aux_loss_coef=0.25, attn_implementation="packed_sdpa")).eval()
    rows = list(pairs(3, seed=9, vocab=97))
    with torch.no_grad():
        got = pair_logps(model, pack_pairs(rows, prefix_sharing=True)).aux_loss
        routers = []
        for row in rows:
            p = len(row["prompt_input_ids"])
            chosen = model(input_ids=torch.tensor([row["prompt_input_ids"] + row["chosen_input_ids"]]))
            rejected = model(input_ids=torch.tensor([row["prompt_input_ids"] + row["rejected_input_ids"]]))
            routers += [chosen.router_logits, tuple(layer[p:] for layer in rejected.router_logits)]
    want = load_balancing_loss_func(tuple(torch.cat(layer) for layer in zip(*routers)), 4, 2)
    assert rel_err(got, want) <= 1e-5


def test_online_sampled_pairs_share_their_prompt(tmp_path):
    """Online DPO packs its ranked samples with the shared prefix; the loss equals the unshared layout's."""
    import datasets

    losses = []
    for shared in (False, True):
        policy = tiny_llama(seed=10, attn_implementation="packed_sdpa")
        args = OnlineDPOConfig(output_dir=str(tmp_path / str(shared)), report_to=[], use_cpu=True, save_strategy="no",
                               per_device_train_batch_size=2, max_new_tokens=4, prefix_sharing=shared)
        trainer = OnlineDPOTrainer(policy, tiny_llama(seed=11), args=args, processing_class=smollm2_tokenizer(),
                                   train_dataset=datasets.Dataset.from_list([{"prompt": f"Q{i}: {i} + {i}?"}
                                                                             for i in range(2)]),
                                   judge=type("Second", (), {"judge": lambda self, p, c: [1] * len(p)})())
        g = torch.Generator().manual_seed(12)
        samples = [torch.randint(3, 49152, (n,), generator=g).tolist() + [2] for n in (3, 1, 5, 2)]
        trainer.sample_completions = lambda prompt_ids, samples=samples: (samples, torch.ones(4, dtype=torch.bool))
        rows = [trainer.train_dataset[i] for i in range(2)]
        batch = trainer.generate_pairs({"prompt": [r["prompt"] for r in rows],
                                        "prompt_input_ids": [r["prompt_input_ids"] for r in rows]})
        assert (batch.segments is not None) is shared
        losses.append(trainer.compute_loss(policy, batch, num_items_in_batch=2).detach())
    assert rel_err(losses[1], losses[0]) <= 1e-5


def test_attention_without_a_shared_path_falls_back(tmp_path, caplog):
    AttentionInterface.register("plain_sdpa_copy", sdpa_attention_forward)
    with caplog.at_level(logging.INFO, logger="fastdpo"):
        trainer = DPOTrainer(tiny_llama(seed=13, attn_implementation="plain_sdpa_copy"), tiny_llama(seed=14),
                             args=config(tmp_path, max_steps=1), train_dataset=pairs(2))
        shared = DPOTrainer(tiny_llama(seed=13, attn_implementation="packed_sdpa"), tiny_llama(seed=14),
                            args=config(tmp_path, max_steps=1), train_dataset=pairs(2))
    assert not trainer.prefix_sharing and shared.prefix_sharing
    assert "packing: unshared [prompt+chosen][prompt+rejected] layout, attention plain_sdpa_copy (attention " \
           "implementation 'plain_sdpa_copy' has no shared-prefix path" in caplog.text
    assert "packing: shared prefix [prompt][chosen][rejected] layout, attention packed_sdpa" in caplog.text
    trainer.train()


@needs_smollm2
@pytest.mark.parametrize("dataset", ["hh", "ultrafeedback"])
def test_real_run_with_prefix_sharing(tmp_path, smollm2_cache, monkeypatch, caplog, dataset):
    """SmolLM2-135M-Instruct (the shared GGUF) + LoRA, the shared-prefix layout by default, a few steps on real
    pairs: the log names the layout, the loss falls, the saved adapter reloads to the same log-probs."""
    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    path = HH_HARMLESS if dataset == "hh" else ULTRAFEEDBACK / "train.conversational.jsonl"
    require(path, f"the shared {dataset} data")
    with caplog.at_level(logging.INFO, logger="fastdpo"):
        trainer, _ = cli.train([
            "--model", str(SMOLLM2_GGUF), "--dataset", str(path), "--max-samples", "4", "--output-dir",
            str(tmp_path / "out"), "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true",
            "--use-peft", "--learning-rate", "2e-3", "--beta", "0.5", "--max-length", "48", "--max-prompt-length",
            "32", "--max-tokens-per-batch", "512", "--num-train-epochs", "3", "--logging-steps", "1",
            "--lora-dropout", "0"])
    assert trainer.prefix_sharing
    assert "packing: shared prefix [prompt][chosen][rejected] layout, attention packed_sdpa" in caplog.text
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.05

    from peft import PeftModel

    from fastdpo.models import load_causal_lm, resolve_model

    reloaded = PeftModel.from_pretrained(load_causal_lm(resolve_model(str(SMOLLM2_GGUF)),
                                                        attn_implementation="packed_sdpa"), str(tmp_path / "out"))
    rows = list(trainer.train_dataset.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]))
    batch = pack_pairs(rows, prefix_sharing=True)
    with torch.no_grad():
        want = packed_sequence_logps(trainer.model.eval(), batch)
        got = packed_sequence_logps(reloaded.eval(), batch)
    assert all(rel_err(g, w) <= 1e-5 for g, w in zip(got, want))
