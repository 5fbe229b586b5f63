"""fastdpo's KTOTrainer against TRL 1.16's KTOTrainer on the same tiny model and rows: the tokenised rows and the KL
pairing, then one batch's loss and every gradient, and one logged training step (every metric TRL logs), fp32 to
1e-5, for both loss types, a live or a precomputed reference, full fine-tuning or LoRA, and both packing layouts."""

import datasets
import pytest
import torch

from _kto_rows import conversational, paired, standard
from _reference import rel_err
from _shared import smollm2_tokenizer, tiny_llama
from fastdpo import KTOConfig, KTOTrainer
from fastdpo.data.unpaired import KL_COLUMN

trl = pytest.importorskip("trl")

GROUP = 4   # rows per KL group: TRL's per_device_train_batch_size
LORA = dict(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)


def common(tmp_path, name, **kw):
    """The options both trainers take, ``kw`` over them."""
    return {**dict(output_dir=str(tmp_path / name), report_to=[], use_cpu=True, bf16=False, logging_steps=1,
                   save_strategy="no", disable_tqdm=True, seed=0, per_device_train_batch_size=GROUP,
                   per_device_eval_batch_size=GROUP, max_steps=1, learning_rate=1e-3), **kw}


def sharp_reference():
    """A reference whose next-token distributions are sharper than the policy's (its logits 10x): the KL term's
    mismatched completions are then likelier under the policy, z0 > 0, and the clamp does not hide the term."""
    model = tiny_llama(seed=2)
    model.model.norm.weight.data *= 10
    return model


def perturb_lora(model):
    """Non-zero LoRA B (the same on both sides), so that the policy differs from its adapter-disabled reference."""
    g = torch.Generator().manual_seed(7)
    for name, p in sorted(model.named_parameters()):
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.05


def trl_trainer(tmp_path, rows, *, peft=False, **kw):
    from peft import LoraConfig

    args = trl.KTOConfig(**common(tmp_path, "trl", gradient_checkpointing=False, **kw))
    trainer = trl.KTOTrainer(tiny_llama(seed=1), ref_model=None if peft else sharp_reference(), args=args,
                             train_dataset=datasets.Dataset.from_list(rows), processing_class=smollm2_tokenizer(),
                             peft_config=LoraConfig(**LORA) if peft else None)
    if peft:
        perturb_lora(trainer.model)
    return trainer


def fastdpo_trainer(tmp_path, rows, *, lora_of=None, **kw):
    """fastdpo's trainer; ``lora_of``: a TRL trainer whose LoRA policy to copy (its adapters, initialised and
    perturbed there)."""
    from peft import LoraConfig, get_peft_model

    model = tiny_llama(seed=1)
    if lora_of is not None:
        model = get_peft_model(model, LoraConfig(**LORA))
        model.load_state_dict(lora_of.model.state_dict())
    kw.pop("peft", None)
    args = KTOConfig(**common(tmp_path, "fastdpo", train_sampling_strategy="sequential", **kw))
    return KTOTrainer(model, ref_model=None if lora_of is not None else sharp_reference(), args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=smollm2_tokenizer())


def one_group_budget(trainer):
    """A token budget that holds exactly one KL group per micro-batch (TRL's batches)."""
    lengths = trainer.row_lengths(trainer.train_dataset)
    groups = [sum(lengths[i:i + GROUP]) for i in range(0, len(lengths), GROUP)]
    assert sum(sorted(groups)[:2]) > max(groups)
    return max(groups)


def loss_and_grads(trainer, batch):
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad()
    return loss.detach(), grads


def first_step_log(trainer):
    trainer.train()
    return next(h for h in trainer.state.log_history if "loss" in h)


def test_tokenised_rows_and_kl_pairing_equal_trl(tmp_path):
    """Paired rows unpaired as TRL does (chosen then rejected), tokenised, and every row's KL completion the previous
    row's within TRL's batches of 3 (the last batch partial): the same ids, labels and pairing."""
    rows = paired()
    theirs = trl_trainer(tmp_path, rows, per_device_train_batch_size=3).train_dataset
    ours = fastdpo_trainer(tmp_path, rows, per_device_train_batch_size=3).train_dataset
    assert len(ours) == len(theirs) == 10
    assert ours["label"] == theirs["label"] == [True] * 5 + [False] * 5
    assert ours["prompt_input_ids"] == theirs["prompt_ids"]
    assert ours["completion_input_ids"] == theirs["completion_ids"]
    assert ours[KL_COLUMN] == theirs["KL_completion_ids"]
    # the rotation is real: row 0 takes row 2's completion, row 9 (a batch of its own) its own
    assert ours[KL_COLUMN][0] == ours["completion_input_ids"][2] != ours["completion_input_ids"][0]
    assert ours[KL_COLUMN][9] == ours["completion_input_ids"][9]


CASES = {
    "kto": dict(loss_type="kto"),
    "kto-precomputed": dict(loss_type="kto", precompute_ref_log_probs=True),
    "apo": dict(loss_type="apo_zero_unpaired"),
    "apo-precomputed": dict(loss_type="apo_zero_unpaired", precompute_ref_log_probs=True),
    "kto-lora": dict(loss_type="kto", peft=True),
    "kto-conversational-truncated": dict(loss_type="kto", conversational=True, max_length=40),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_equal_trl(tmp_path, case):
    options = dict(CASES[case])
    rows = conversational() if options.pop("conversational", False) else standard()
    options.update(beta=0.3, desirable_weight=0.8, undesirable_weight=1.3)
    theirs = trl_trainer(tmp_path, rows, **options)
    ours = fastdpo_trainer(tmp_path, rows, lora_of=theirs if options.get("peft") else None, **options)
    ours.args.max_tokens_per_batch = one_group_budget(ours)

    trl_batch = theirs._prepare_inputs(next(iter(theirs.get_train_dataloader())))
    batch = next(iter(ours.get_train_dataloader()))
    assert batch.row_index.tolist() == list(range(GROUP))
    want_loss, want_grads = loss_and_grads(theirs, trl_batch)
    got_loss, got_grads = loss_and_grads(ours, batch)
    assert rel_err(got_loss, want_loss) <= 1e-5, (got_loss, want_loss)
    assert set(got_grads) == set(want_grads) and len(want_grads) >= 9
    errors = {n: rel_err(got_grads[n], g) for n, g in want_grads.items()}
    assert max(errors.values()) <= 1e-5, errors
    if case.startswith("kto") and not options.get("peft"):
        assert theirs._metrics["train"]["kl"][-1] > 0   # the KL term is in play, not clamped away
    if case == "kto":   # the comparison can fail: each row's own completion as its KL completion changes the loss
        unrotated = [{**ours.train_dataset[i], KL_COLUMN: ours.train_dataset[i]["completion_input_ids"]}
                     for i in range(GROUP)]
        assert rel_err(loss_and_grads(ours, ours.data_collator(unrotated))[0], want_loss) > 1e-4

    theirs._metrics["train"].clear()
    theirs._total_train_tokens = 0
    ours.metrics.pop("train")
    want, got = first_step_log(theirs), first_step_log(ours)
    metrics = [k for k in want if k not in ("learning_rate", "epoch", "step")]
    assert {"kl", "rewards/margins", "logps/chosen", "logits/rejected", "entropy", "num_tokens", "grad_norm"} <= set(metrics)
    # kl is a mean and a reward β times a difference of log-prob sums: their error is relative to those sums' size
    logps = max(abs(want["logps/chosen"]), abs(want["logps/rejected"]))
    scale = {k: options["beta"] * logps if "rewards" in k else logps if k == "kl" else abs(want[k]) for k in metrics}
    errors = {k: abs(got[k] - want[k]) / max(scale[k], 1e-30) for k in metrics}
    assert max(errors.values()) <= 1e-5, {k: (got[k], want[k]) for k in metrics}


def test_shared_prefix_equals_unshared(tmp_path):
    """[prompt][completion][KL completion] with the KL completion a branch, or the prompt twice: the same loss, KL and
    gradients (the branch sees the prompt, never the completion)."""
    results = []
    for sharing in (True, False):
        trainer = fastdpo_trainer(tmp_path, standard(), prefix_sharing=sharing)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        assert (batch.segments is not None) == sharing
        results.append((*loss_and_grads(trainer, batch), trainer.metrics.pop("train")))
    (loss, grads, logs), (loss2, grads2, logs2) = results
    assert rel_err(loss, loss2) <= 1e-6 and logs["kl"] == pytest.approx(logs2["kl"], rel=1e-5) and logs["kl"] > 0
    assert all(rel_err(grads[n], g) <= 1e-5 for n, g in grads2.items())
