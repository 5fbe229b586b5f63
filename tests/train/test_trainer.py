"""DPOTrainer on a tiny random Llama with SmolLM2's vocabulary: accumulation, reference modes,
LoRA/QLoRA steps, metrics and saving; every loss type, and its per-token inputs (WPO, LD-DPO, ORPO's
prompt NLL) against hand computations."""

import math

import datasets
import pytest
import torch

from _reference import rel_err
from _shared import config, lora, pairs, tiny_llama
from fastdpo import LOSS_TYPES, DPOTrainer, dpo_loss
from fastdpo.data.packing import pack_pairs
from fastdpo.train.forward import packed_sequence_logps, pair_logps

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


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
        c, r = packed_sequence_logps(model, batch)
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
        want = packed_sequence_logps(model, batch)
        got = packed_sequence_logps(reloaded, batch)
    assert all(rel_err(a, b) <= 1e-6 for a, b in zip(got, want))


def test_qlora_step_on_cpu(tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

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


# ------------------------------------------------------------------ loss types
def loss_options(loss_type):
    """Options a loss type needs to be valid (TRL's rules)."""
    return {"loss_type": loss_type, "label_smoothing": {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)}


NLL_CONFIGS = {"sft", "cpo", "simpo", "orpo"}


@pytest.mark.parametrize("options", [loss_options(t) for t in LOSS_TYPES] + [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0], use_weighting=True, ld_alpha=0.5),
    dict(loss_type=["ipo", "hinge"], rpo_alpha=0.5, f_divergence_type="js_divergence"),
], ids=lambda o: "+".join(o["loss_type"]) if isinstance(o["loss_type"], list) else o["loss_type"])
def test_every_loss_type_trains_a_step(tmp_path, options):
    """Each loss type and option reaches the loss: the trainer's loss equals dpo_loss called with the options
    themselves (a reference other than the policy, so that margins, and with them label smoothing, matter)."""
    model, data = tiny_llama(seed=11), pairs(4, seed=12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = DPOTrainer(model, tiny_llama(seed=13), args=config(tmp_path, max_steps=1, max_tokens_per_batch=200,
                                                                 **options),
                         train_dataset=data, eval_dataset=data)
    types = set(trainer.args.loss_type)
    assert (trainer.ref_model is None) == bool(types & {"cpo", "simpo", "orpo"})
    batch, ld_alpha = pack_pairs(list(data)), options.get("ld_alpha")
    with torch.no_grad():
        policy = pair_logps(model, batch, ld_alpha=ld_alpha, wpo=options.get("use_weighting", False),
                            prompt_nll="orpo" in types)
        ref = pair_logps(trainer.ref_model, batch, ld_alpha=ld_alpha) if trainer.ref_model is not None else None
    losses, _, _ = dpo_loss(policy.chosen, policy.rejected, *((ref.chosen, ref.rejected) if ref else (None, None)),
                            beta=0.5, chosen_lengths=policy.chosen_lengths, rejected_lengths=policy.rejected_lengths,
                            chosen_nll=policy.chosen_nll, nll_tokens=policy.nll_tokens.sum(),
                            pair_weights=policy.wpo_weights,
                            **{k: v for k, v in options.items() if k not in ("use_weighting", "ld_alpha")})
    assert trainer.evaluate()["eval_loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    trainer.train()
    logs = trainer.state.log_history[0]
    want = set(METRICS) | {"loss"} | ({"nll_loss"} if types & NLL_CONFIGS or "rpo_alpha" in options else set()) | (
        {"log_odds_ratio", "log_odds_chosen"} if "orpo" in types else set())
    assert want <= set(logs) and all(math.isfinite(logs[k]) for k in want), logs
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())


def completion_logps(model, rows):
    """Per completion (chosen_0, rejected_0, ...): log p of its tokens, log Σp² at them, and log p of the
    prompt's tokens after the first; from the model's ordinary logits, one sequence at a time, in float64."""
    out = []
    with torch.no_grad():
        for row in rows:
            prompt = row["prompt_input_ids"]
            for completion in (row["chosen_input_ids"], row["rejected_input_ids"]):
                ids = torch.tensor([prompt + completion])
                logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
                token = logp.gather(1, ids[0, 1:, None])[:, 0]
                n = len(prompt) - 1
                out.append((token[n:], torch.logsumexp(2 * logp, -1)[n:], token[:n]))
    return out


def ld_sums(per_completion, ld_alpha):
    """LD-DPO by hand: per pair, tokens past the shorter completion's length weigh ld_alpha."""
    sums = []
    for chosen, rejected in zip(per_completion[0::2], per_completion[1::2]):
        shared = min(len(chosen[0]), len(rejected[0]))
        sums += [c[0][:shared].sum() + ld_alpha * c[0][shared:].sum() for c in (chosen, rejected)]
    return torch.stack(sums)


@pytest.mark.parametrize("ld_alpha,use_weighting", [(None, True), (0.3, False), (0.0, True)])
def test_use_weighting_and_ld_alpha_by_hand(tmp_path, ld_alpha, use_weighting):
    """WPO weights each pair by w_c·w_r, w = exp(mean over the completion of log p − log Σp²); LD-DPO weighs
    the policy's and the reference's log-probs past the shorter completion by ld_alpha."""
    data = pairs(5, seed=13)
    model, ref = tiny_llama(seed=14), tiny_llama(seed=15)
    trainer = DPOTrainer(model, ref, args=config(tmp_path, ld_alpha=ld_alpha, use_weighting=use_weighting),
                         train_dataset=data, eval_dataset=data)
    policy, reference = completion_logps(model, list(data)), completion_logps(ref, list(data))
    pi, pi_ref = (ld_sums(x, 1.0 if ld_alpha is None else ld_alpha) for x in (policy, reference))
    margins = (pi[0::2] - pi_ref[0::2]) - (pi[1::2] - pi_ref[1::2])
    plain = torch.nn.functional.softplus(-0.5 * margins)
    weights = torch.stack([torch.exp((t - s).mean()) for t, s, _ in policy])
    want = (plain * weights[0::2] * weights[1::2] if use_weighting else plain).mean().item()
    got = trainer.evaluate()["eval_loss"]
    assert got == pytest.approx(want, rel=1e-5)
    pi, pi_ref = ld_sums(policy, 1.0), ld_sums(reference, 1.0)
    unchanged = torch.nn.functional.softplus(-0.5 * ((pi[0::2] - pi_ref[0::2]) - (pi[1::2] - pi_ref[1::2])))
    assert got != pytest.approx(unchanged.mean().item(), rel=1e-3)     # the option changes the loss


def test_orpo_and_nll_metric_by_hand(tmp_path):
    """ORPO: NLL over the chosen prompt (from its second token) and completion, minus β log σ(log odds) of
    the mean completion log-probs; no reference model; nll_loss and the log-odds metrics logged."""
    data = pairs(5, seed=16)
    model = tiny_llama(seed=17)
    trainer = DPOTrainer(model, args=config(tmp_path, loss_type="orpo", beta=0.25, precompute_ref_log_probs=True),
                         train_dataset=data, eval_dataset=data)
    assert trainer.ref_model is None and "ref_chosen_logps" not in trainer.train_dataset.column_names
    per = completion_logps(model, list(data))
    chosen = per[0::2]
    nll = -torch.cat([torch.cat([p, t]) for t, _, p in chosen]).mean()
    mean = torch.stack([t.mean() for t, _, _ in per])
    odds = lambda a: a - torch.log1p(-torch.exp(a))                        # noqa: E731
    log_odds = odds(mean[0::2]) - odds(mean[1::2])
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx((nll - 0.25 * torch.nn.functional.logsigmoid(log_odds).mean()).item(),
                                                 rel=1e-5)
    assert metrics["eval_nll_loss"] == pytest.approx(nll.item(), rel=1e-5)
    assert metrics["eval_log_odds_chosen"] == pytest.approx(log_odds.mean().item(), rel=1e-5, abs=1e-7)
    assert metrics["eval_logps/chosen"] == pytest.approx(mean[0::2].mean().item(), rel=1e-5)


@pytest.mark.parametrize("options", [dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5]),
                                     dict(loss_type="orpo")])
def test_nll_term_under_gradient_accumulation(tmp_path, options):
    """The NLL term is the mean over all chosen NLL tokens of the effective batch: one micro-batch of 4 pairs
    and 4 micro-batches of 1 pair (of different lengths) give the same loss and the same update."""
    g = torch.Generator().manual_seed(18)
    data = datasets.Dataset.from_list([{k: torch.randint(3, 49152, (n,), generator=g).tolist() for k, n in
                                        (("prompt_input_ids", 5 + i), ("chosen_input_ids", 1 + 2 * i),
                                         ("rejected_input_ids", 5))} for i in range(4)])
    results = []
    for budget, accumulation in ((1000, 1), (20, 4)):      # pairs take 11-20 tokens (the prompt once): one a batch
        model, ref = tiny_llama(seed=19), tiny_llama(seed=20)
        args = config(tmp_path, max_tokens_per_batch=budget, gradient_accumulation_steps=accumulation, max_steps=1,
                      optim="sgd", learning_rate=1.0, lr_scheduler_type="constant", max_grad_norm=0.0, **options)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = DPOTrainer(model, ref, args=args, train_dataset=data)
        assert len(trainer.get_train_dataloader()) == accumulation
        trainer.train()
        delta = torch.cat([(p.detach() - before[n]).reshape(-1) for n, p in model.named_parameters()])
        results.append((trainer.state.log_history[0], delta))
    (logs_a, delta_a), (logs_b, delta_b) = results
    assert logs_a["loss"] == pytest.approx(logs_b["loss"], rel=1e-5)
    assert logs_a["nll_loss"] == pytest.approx(logs_b["nll_loss"], rel=1e-5)
    assert delta_a.abs().sum() > 0 and rel_err(delta_b, delta_a) <= 1e-5


def test_precomputed_reference_with_ld_alpha(tmp_path):
    """Precomputed reference log-probs are LD-weighted like live ones and cached per ld_alpha."""
    data = pairs(6, seed=21)
    losses = {}
    for precompute, ld_alpha in ((False, 0.2), (True, 0.2), (True, None)):
        model = lora(tiny_llama(seed=22), seed=23)
        trainer = DPOTrainer(model, args=config(tmp_path, precompute_ref_log_probs=precompute, ld_alpha=ld_alpha),
                             train_dataset=data, eval_dataset=data)
        losses[precompute, ld_alpha] = trainer.evaluate()["eval_loss"]
    assert losses[True, 0.2] == pytest.approx(losses[False, 0.2], rel=1e-6)
    assert losses[True, None] != pytest.approx(losses[True, 0.2], rel=1e-4)


def test_cli_parses_loss_lists_and_every_loss_type():
    from fastdpo.cli import parse_command

    _, args, _ = parse_command(["--dataset", "x.jsonl", "--output-dir", "out", "--use-cpu", "--loss-type", "sigmoid",
                                "sft", "--loss-weights", "1.0", "0.5", "--ld-alpha", "0.5", "--use-weighting"])
    assert args.loss_type == ["sigmoid", "sft"] and args.loss_weights == [1.0, 0.5]
    assert args.ld_alpha == 0.5 and args.use_weighting
    for loss_type in LOSS_TYPES:
        _, args, _ = parse_command(["--dataset", "x.jsonl", "--output-dir", "out", "--use-cpu", "--loss_type",
                                    loss_type, "--label_smoothing", "0.1"])
        assert args.loss_type == [loss_type]
