"""fastdpo inside existing trainers: TRL 1.x's DPOTrainer patched, and TRL <= 0.9's legacy loop."""

import datasets
import pytest
import torch

import fastdpo
from _reference import rel_err, trl_legacy_get_batch_logps
from _shared import smollm2_tokenizer, tiny_llama

trl = pytest.importorskip("trl")
from fastdpo.integrations import trl as fastdpo_trl  # noqa: E402

# Hand-written pairs in TRL's standard format.
PAIRS = [
    ("What colour is the sky?", "Blue, on a clear day.", "Green."),
    ("Name a fruit.", "An apple.", "A chair."),
    ("How many legs does a spider have?", "Eight.", "Six, like all insects."),
    ("Is water wet?", "It makes things wet.", "No idea."),
    ("Say hello in French.", "Bonjour.", "Hola."),
    ("What is 3 times 3?", "Nine.", "Six."),
    ("Which is larger, a cat or a whale?", "A whale.", "A cat."),
    ("Spell 'dog' backwards.", "god", "dgo"),
    ("What do bees make?", "Honey.", "Milk."),
    ("Where does the sun rise?", "In the east.", "In the north."),
]
TRACE_KEYS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected")


def run_trl(tmp_path, *, patched, peft):
    model = tiny_llama(seed=11)
    peft_config = None
    if peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    args = trl.DPOConfig(output_dir=str(tmp_path / f"trl-{patched}-{peft}"), report_to=[], use_cpu=True, bf16=False,
                         per_device_train_batch_size=2, max_steps=5, logging_steps=1, learning_rate=5e-3,
                         max_length=48, save_strategy="no", disable_tqdm=True, seed=0, beta=0.5)
    data = datasets.Dataset.from_list([{"prompt": p, "chosen": " " + c, "rejected": " " + r} for p, c, r in PAIRS])
    trainer = trl.DPOTrainer(model=model, ref_model=None if peft else tiny_llama(seed=11), args=args,
                             train_dataset=data, processing_class=smollm2_tokenizer(), peft_config=peft_config)
    if patched:
        fastdpo_trl.patch_dpo_trainer(trainer)
    trainer.train()
    return [{k: h[k] for k in TRACE_KEYS} for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("peft", [False, True])
def test_patched_trl_dpo_trainer_matches_stock(tmp_path, monkeypatch, peft):
    calls = []
    original = fastdpo_trl.linear_logps_with_stats
    monkeypatch.setattr(fastdpo_trl, "linear_logps_with_stats", lambda *a, **k: calls.append(1) or original(*a, **k))
    stock = run_trl(tmp_path, patched=False, peft=peft)
    assert not calls
    patched = run_trl(tmp_path, patched=True, peft=peft)
    assert calls, "the patched trainer never reached fastdpo.linear_logps_with_stats"
    assert len(stock) == len(patched) == 5
    assert stock[-1]["loss"] != stock[0]["loss"]          # the trace moves: the comparison means something
    for a, b in zip(stock, patched):
        # A reward is beta * (policy - reference), a small difference of two log-probs of order 100: its
        # error is bounded relative to those terms, not to the difference itself.
        reward_abs = 1e-6 * max(abs(a["logps/chosen"]), abs(a["logps/rejected"]))
        for key in TRACE_KEYS:
            tol = {"abs": reward_abs} if key.startswith("rewards/") else {"rel": 1e-4}
            assert b[key] == pytest.approx(a[key], **tol), (key, a[key], b[key])


def test_unsupported_trl_version_is_refused(monkeypatch):
    monkeypatch.setattr(fastdpo_trl.importlib.metadata, "version", lambda name: "0.9.6")
    with pytest.raises(RuntimeError, match=r"supports trl<2,>=1.16|supports trl>=1.16,<2"):
        fastdpo_trl.patch_dpo_trainer(object())


def test_model_without_fused_head_is_refused():
    class FakeTrainer:
        model, ref_model = tiny_llama(), None

    with pytest.raises(RuntimeError, match="has no TRL fused LM head"):
        fastdpo_trl.patch_dpo_trainer(FakeTrainer())


def legacy_concatenated_forward(model, batch, get_batch_logps):
    """TRL <= 0.9's ``concatenated_forward`` pattern: pad chosen and rejected to one length,
    concatenate them on the batch axis, run the model once, take per-sequence log-probs."""
    length = max(batch["chosen_input_ids"].shape[1], batch["rejected_input_ids"].shape[1])

    def pad(t, value):
        return torch.nn.functional.pad(t, (0, length - t.shape[1]), value=value)

    input_ids = torch.cat([pad(batch["chosen_input_ids"], 0), pad(batch["rejected_input_ids"], 0)])
    attention_mask = torch.cat([pad(batch["chosen_attention_mask"], 0), pad(batch["rejected_attention_mask"], 0)])
    labels = torch.cat([pad(batch["chosen_labels"], -100), pad(batch["rejected_labels"], -100)])
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.to(torch.float32)
    logps = get_batch_logps(logits, labels, average_log_prob=False, label_pad_token_id=-100,
                            is_encoder_decoder=False)
    n = batch["chosen_input_ids"].shape[0]
    return logps[:n], logps[n:]


def test_legacy_loop_with_fastdpo_get_batch_logps_swapped_in():
    g = torch.Generator().manual_seed(12)
    batch = {}
    for side, lengths in (("chosen", (9, 6, 11)), ("rejected", (7, 10, 5))):
        width = max(lengths)
        ids = torch.randint(3, 49152, (3, width), generator=g)
        mask = (torch.arange(width)[None] < torch.tensor(lengths)[:, None]).long()
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100                       # a 3-token prompt
        batch.update({f"{side}_input_ids": ids * mask, f"{side}_attention_mask": mask, f"{side}_labels": labels})
    results = []
    for fn in (trl_legacy_get_batch_logps, fastdpo.get_batch_logps):
        model = tiny_llama(seed=13)
        chosen, rejected = legacy_concatenated_forward(model, batch, fn)
        (chosen.sum() - 2 * rejected.sum()).backward()
        results.append((chosen.detach(), rejected.detach(), [p.grad for p in model.parameters()]))
    (c0, r0, g0), (c1, r1, g1) = results
    assert rel_err(c1, c0) <= 1e-6 and rel_err(r1, r0) <= 1e-6
    assert all(rel_err(b, a) <= 1e-5 for a, b in zip(g0, g1))
