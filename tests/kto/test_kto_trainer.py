"""KTOTrainer on a tiny random Llama: the reference modes, gradient accumulation, evaluation, and the checks on labels,
class weights and options."""

import logging
import re

import datasets
import pytest
import torch

from _kto_rows import standard
from _reference import rel_err
from _shared import lora, smollm2_tokenizer, tiny_llama
from fastdpo import KTOConfig, KTOTrainer
from fastdpo.data import GroupBatchSampler

GROUP = 4


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                max_tokens_per_batch=1000, learning_rate=1e-3, seed=0, disable_tqdm=True,
                per_device_train_batch_size=GROUP, train_sampling_strategy="sequential")
    return KTOConfig(**{**base, **kw})


def trainer(tmp_path, model=None, ref_model=None, data=None, **kw):
    data = datasets.Dataset.from_list(data or standard())
    return KTOTrainer(model or tiny_llama(seed=1), ref_model, args=args(tmp_path, **kw), train_dataset=data,
                      eval_dataset=data, processing_class=smollm2_tokenizer())


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_precomputed_reference_equals_live_reference(tmp_path, loss_type, caplog):
    """Live (LoRA adapters disabled) and precomputed (the same, once, completions and KL completions): the same
    evaluation; the precomputed columns are in the data, the reference is released, and a second run loads them from
    the reference cache."""
    results = {}
    for precompute in (False, True):
        t = trainer(tmp_path, lora(tiny_llama(seed=1), seed=2), loss_type=loss_type,
                    precompute_ref_log_probs=precompute)
        if precompute:
            assert {"ref_logps", "ref_KL_logps"} & set(t.train_dataset.column_names) == (
                {"ref_logps", "ref_KL_logps"} if loss_type == "kto" else {"ref_logps"})
            with pytest.raises(ValueError, match="reference model was released"):
                t.reference.run(t.model, lambda m: None)
        results[precompute] = t.evaluate()
    for key in ("eval_loss", "eval_kl", "eval_rewards/chosen", "eval_rewards/margins", "eval_logps/rejected"):
        assert results[True][key] == pytest.approx(results[False][key], rel=1e-6, abs=1e-9), key
    assert results[True]["eval_rewards/margins"] != 0.0   # the adapters moved the policy off the reference
    with caplog.at_level(logging.INFO, logger="fastdpo.train.reference_cache"):
        again = trainer(tmp_path, lora(tiny_llama(seed=1), seed=2), loss_type=loss_type, precompute_ref_log_probs=True)
    assert "reference log-probs (train): loaded from" in caplog.text
    assert again.train_dataset["ref_logps"] == t.train_dataset["ref_logps"]


def test_accumulated_micro_batches_equal_one_without_kl(tmp_path):
    """apo_zero_unpaired (no KL term: rows are independent): 8 rows in one micro-batch or in two accumulated ones
    (uneven token counts), the same SGD update; the loss divides by the step's rows."""
    probe = trainer(tmp_path, loss_type="apo_zero_unpaired")
    lengths = probe.row_lengths(probe.train_dataset)
    halves = next(b for b in range(max(lengths), sum(lengths)) if len(GroupBatchSampler(lengths, 1, b, shuffle=False)) == 2)
    deltas, losses = [], []
    for budget, accumulation in ((sum(lengths), 1), (halves, 2)):
        model = tiny_llama(seed=3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        # the reference is the policy's initial weights: the loss's weights on each row's log-probs are exact
        t = trainer(tmp_path, model, tiny_llama(seed=3), loss_type="apo_zero_unpaired", max_steps=1, optim="sgd",
                    lr_scheduler_type="constant", max_grad_norm=0.0, gradient_accumulation_steps=accumulation,
                    max_tokens_per_batch=budget, beta=1.0, learning_rate=1e3)   # updates far above the weights' ulp
        assert len(t.get_train_dataloader()) == accumulation
        t.train()
        losses.append(t.state.log_history[0]["loss"])
        deltas.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()]))
    assert deltas[0].abs().sum() > 0 and rel_err(deltas[1], deltas[0]) <= 1e-5
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_eval_metrics_and_a_lora_step_that_saves(tmp_path):
    t = trainer(tmp_path, lora(tiny_llama(seed=5), seed=6), max_steps=2, eval_strategy="steps", eval_steps=2)
    t.train()
    logs = [h for h in t.state.log_history if "loss" in h]
    evals = [h for h in t.state.log_history if "eval_loss" in h]
    assert len(logs) == 2 and len(evals) == 1
    for key in ("kl", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected",
                "logits/chosen", "logits/rejected", "entropy", "num_tokens"):
        assert key in logs[0] and f"eval_{key}" in evals[0], key
    assert logs[0]["tokens_per_second"] > 0
    assert logs[1]["num_tokens"] > logs[0]["num_tokens"] > 0
    assert evals[0]["eval_rewards/margins"] == pytest.approx(
        evals[0]["eval_rewards/chosen"] - evals[0]["eval_rewards/rejected"])
    t.save_model()
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


@pytest.mark.parametrize("column, rows", [("ref_logps", [5]), ("ref_KL_logps", list(range(8)))])
def test_nonfinite_loss_stops_or_is_skipped_and_said(tmp_path, caplog, column, rows):
    """A NaN reference log-prob of row 5's completion (its loss alone) or KL completion (z₀, so every row's): the
    step stops with the error naming the rows, or with skip_nonfinite_losses is left out, counted and warned about
    as a step that trained nothing, the weights untouched."""
    for skip in (False, True):
        t = trainer(tmp_path, lora(tiny_llama(seed=1), seed=2), precompute_ref_log_probs=True, max_steps=1,
                    skip_nonfinite_losses=skip)
        t.train_dataset = t.train_dataset.map(lambda row, i: {column: float("nan") if i == 5 else row[column]},
                                              with_indices=True)
        before = {n: p.detach().clone() for n, p in t.model.named_parameters() if p.requires_grad}
        if not skip:
            with pytest.raises(FloatingPointError, match=re.escape(f"non-finite KTO loss at step 1, training row(s) "
                                                                   f"{rows} (losses [nan")):
                t.train()
            continue
        with caplog.at_level(logging.WARNING, logger="fastdpo.train.packed_trainer"):
            t.train()
        log = t.state.log_history[0]
        assert log["skipped_rows"] == 8 and log["loss"] != log["loss"] and t.tally.trained == 0
        assert "trained on nothing: all 8 row(s) had a non-finite loss and were skipped (skipped_rows" in caplog.text
        assert all(torch.equal(p, before[n]) for n, p in t.model.named_parameters() if p.requires_grad)


def test_one_label_class_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"only desirable rows \(8\).*Check the label column"):
        trainer(tmp_path, data=standard([True] * 8))


def test_unbalanced_weights_warn_as_trl(tmp_path, caplog):
    """5 desirable and 3 undesirable rows: TRL's Eq. 8 check recommends desirable_weight in [0.6, 0.8]."""
    with caplog.at_level(logging.WARNING, logger="fastdpo.kto.trainer"):
        trainer(tmp_path)
    assert "desirable_weight in [0.6, 0.8] or undesirable_weight in [1.25, 1.67]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="fastdpo.kto.trainer"):
        trainer(tmp_path, desirable_weight=0.7)
    assert "desirable_weight in" not in caplog.text


@pytest.mark.parametrize("options, message", [
    (dict(loss_type="sigmoid"), "loss_type must be one of"),
    (dict(per_device_train_batch_size=1), "must be at least 2"),
    (dict(train_sampling_strategy="group_by_length"), "train_sampling_strategy must be one of"),
    (dict(truncation_mode="keep_end"), "truncation_mode must be keep_start"),
    (dict(desirable_weight=-1.0), "desirable_weight must be >= 0"),
    (dict(beta=0.0), "beta must be > 0"),
])
def test_config_errors(tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        args(tmp_path, **options)
    args(tmp_path, loss_type="apo_zero_unpaired", per_device_train_batch_size=1)   # no KL term: groups of one


def test_a_kl_group_over_the_budget_is_named(tmp_path):
    t = trainer(tmp_path, max_tokens_per_batch=30)
    with pytest.raises(ValueError, match=r"smaller than KL group 1 \(rows 4-7: \d+ tokens\)"):
        t.get_train_dataloader()
