"""Reference options: the two-adapter reference (from an adapter saved by `fastdpo train`), force_use_ref_model,
TR-DPO's reference sync, and the MoE router load-balancing loss, on tiny random models."""

import math

import datasets
import pytest
import torch
from transformers import TrainerCallback

from _reference import rel_err
from _shared import SMOLLM2_GGUF, config, lora, pairs, tiny_llama, write_tiny_run
from fastdpo import DPOTrainer, cli, dpo_loss
from fastdpo.data.packing import pack_pairs
from fastdpo.train.forward import packed_sequence_logps
from fastdpo.train.reference import reference_logps

needs_tokenizer = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")


def lora_weights(model, adapter):
    return {n: p.detach().clone() for n, p in model.named_parameters() if f".{adapter}." in n}


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    """A LoRA adapter trained and saved by `fastdpo train --use-peft` on a tiny Llama; (model_dir, data, adapter)."""
    root = tmp_path_factory.mktemp("saved-adapter")
    model_dir, data = write_tiny_run(root, pairs=8)
    cli.train(["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(root / "adapter"), "--use-peft",
               "--lora-r", "4", "--lora-dropout", "0", "--learning-rate", "3e-2", "--max-steps", "3",
               "--max-tokens-per-batch", "128", "--report-to", "none", "--save-strategy", "no",
               "--disable-tqdm", "true", "--use-cpu"])
    return model_dir, data, root / "adapter"


def base_model(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@needs_tokenizer
def test_two_adapter_reference(tmp_path, saved_adapter):
    """The saved adapter loaded twice: the reference pass switches to the frozen copy, whose log-probs are the
    saved adapter's; training moves only the trained copy, and the reference copy never gets requires_grad
    or optimiser state (it is loaded trainable here, the case the trainer must freeze)."""
    from peft import PeftModel

    model_dir, _, adapter = saved_adapter
    model = PeftModel.from_pretrained(base_model(model_dir), adapter, adapter_name="policy", is_trainable=True)
    model.load_adapter(adapter, adapter_name="reference", is_trainable=True)
    data = pairs(6, seed=1)
    trainer = DPOTrainer(model, args=config(tmp_path, model_adapter_name="policy", ref_adapter_name="reference",
                                            max_steps=3, learning_rate=1e-2, max_tokens_per_batch=60),
                         train_dataset=data, eval_dataset=data)
    assert trainer.ref_model is None
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".reference." in n)
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), rel=1e-6)   # both copies equal at start

    batch = pack_pairs(list(data))
    saved = PeftModel.from_pretrained(base_model(model_dir), adapter).eval()
    with torch.no_grad():
        want = packed_sequence_logps(saved, batch)
        with saved.disable_adapter():
            base = packed_sequence_logps(saved, batch)
    got = reference_logps(trainer.reference, model, batch)
    assert all(rel_err(g, w) <= 1e-6 for g, w in zip(got, want))
    assert all(rel_err(g, b) > 1e-3 for g, b in zip(got, base))        # the adapter, not the disabled base
    assert model.active_adapter == "policy"

    trained_before, reference_before = lora_weights(model, "policy"), lora_weights(model, "reference")
    reference_params = {id(p): p for n, p in model.named_parameters() if ".reference." in n}
    seen = []     # requires_grad of the reference weights at every forward, the reference passes included
    hook = model.register_forward_pre_hook(lambda *_: seen.append(any(p.requires_grad for p in reference_params.values())))
    trainer.train()
    hook.remove()
    assert len(seen) == 6 and not any(seen)
    trained_after, reference_after = lora_weights(model, "policy"), lora_weights(model, "reference")
    assert any(not torch.equal(trained_after[n], p) for n, p in trained_before.items())
    assert all(torch.equal(reference_after[n], p) for n, p in reference_before.items())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert reference_params and not any(p.requires_grad for p in reference_params.values())
    assert not optimised & reference_params.keys() and not {id(p) for p in trainer.optimizer.state} & reference_params.keys()
    assert all(p.requires_grad for n, p in model.named_parameters() if ".policy." in n)


@needs_tokenizer
def test_cli_trains_a_saved_adapter_against_its_frozen_copy(tmp_path, saved_adapter):
    model_dir, data, adapter = saved_adapter
    trainer, _ = cli.train([
        "--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "out"),
        "--adapter", str(adapter), "--model-adapter-name", "policy", "--ref-adapter-name", "reference",
        "--learning-rate", "1e-2", "--max-steps", "2", "--max-tokens-per-batch", "128", "--logging-steps", "1",
        "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true", "--use-cpu"])
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[0] == pytest.approx(math.log(2), abs=1e-6)      # the policy starts as its reference
    from safetensors.torch import load_file

    saved = load_file(adapter / "adapter_model.safetensors")
    reference = {n: p for n, p in trainer.model.named_parameters() if ".reference." in n}
    assert len(reference) == len(saved)
    for name, p in reference.items():
        key = name.removeprefix("base_model.model.").replace(".reference.", ".")   # peft's saved key layout
        assert torch.equal(p, saved["base_model.model." + key])
    with pytest.raises(ValueError, match="nn.Module attribute"):
        cli.train(["--model", str(model_dir), "--dataset", str(data), "--output-dir", str(tmp_path / "bad"),
                   "--adapter", str(adapter), "--model-adapter-name", "train", "--use-cpu"])


def test_force_use_ref_model(tmp_path):
    """A PEFT policy with an explicit reference model is refused unless force_use_ref_model, which then uses it."""
    from peft import LoraConfig

    data = pairs(4, seed=2)
    ref = tiny_llama(seed=31)
    with pytest.raises(ValueError, match="force_use_ref_model=True"):
        DPOTrainer(lora(tiny_llama(seed=30)), ref, args=config(tmp_path), train_dataset=data)
    with pytest.raises(ValueError, match="force_use_ref_model=True"):
        DPOTrainer(tiny_llama(seed=30), ref, args=config(tmp_path), train_dataset=data,
                   peft_config=LoraConfig(r=4, target_modules="all-linear"))
    model = lora(tiny_llama(seed=30))
    trainer = DPOTrainer(model, ref, args=config(tmp_path, force_use_ref_model=True), train_dataset=data)
    assert trainer.ref_model is ref
    batch = pack_pairs(list(data))
    with torch.no_grad():
        want = packed_sequence_logps(ref, batch)
        with model.disable_adapter():
            disabled = packed_sequence_logps(model, batch)
    got = reference_logps(trainer.reference, model, batch)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert all(rel_err(g, d) > 1e-3 for g, d in zip(got, disabled))


@pytest.mark.parametrize("options,error", [
    (dict(ref_adapter_name="reference"), "is not loaded in the PEFT model"),
    (dict(model_adapter_name="policy"), "is not loaded in the PEFT model"),
    (dict(ref_adapter_name="default"), "is the adapter being trained"),
])
def test_adapter_name_errors(tmp_path, options, error):
    with pytest.raises(ValueError, match=error):
        DPOTrainer(lora(tiny_llama(seed=32)), args=config(tmp_path, **options), train_dataset=pairs(2))


def test_adapter_options_need_a_peft_policy_and_no_second_reference(tmp_path):
    with pytest.raises(ValueError, match="not a peft.PeftModel"):
        DPOTrainer(tiny_llama(seed=33), args=config(tmp_path, ref_adapter_name="reference"), train_dataset=pairs(2))
    with pytest.raises(ValueError, match="not both"):
        DPOTrainer(lora(tiny_llama(seed=33)), tiny_llama(seed=34),
                   args=config(tmp_path, ref_adapter_name="reference", force_use_ref_model=True), train_dataset=pairs(2))
    with pytest.raises(ValueError, match="both 'x'"):
        config(tmp_path, ref_adapter_name="x", model_adapter_name="x")


# ------------------------------------------------------------------ TR-DPO
class Snapshots(TrainerCallback):
    """Policy and reference weights after each optimiser step (before the sync) and the reference after it."""

    def __init__(self, policy, ref):
        self.policy, self.ref, self.steps = policy, ref, {}

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.pending = ({n: p.detach().clone() for n, p in self.policy.named_parameters()},
                        {n: p.detach().clone() for n, p in self.ref.named_parameters()})

    def on_step_end(self, args, state, control, **kwargs):   # added after the sync callback: runs after it
        self.steps[state.global_step] = (*self.pending, {n: p.detach().clone() for n, p in self.ref.named_parameters()})


@pytest.mark.parametrize("alpha,separate_ref", [(0.3, True), (1.0, False)])
def test_sync_ref_model_mixes_every_n_steps(tmp_path, alpha, separate_ref):
    """After steps 2 and 4 (ref_model_sync_steps=2) ref = α·policy + (1−α)·ref from the weights just before the
    sync (to within fp32 rounding of the float64 formula); after steps 1, 3 and 5 the reference is unchanged."""
    model = tiny_llama(seed=35)
    args = config(tmp_path, sync_ref_model=True, ref_model_mixup_alpha=alpha, ref_model_sync_steps=2, max_steps=5,
                  learning_rate=1e-2, max_tokens_per_batch=40)
    trainer = DPOTrainer(model, tiny_llama(seed=36) if separate_ref else None, args=args, train_dataset=pairs(10))
    snapshots = Snapshots(model, trainer.ref_model)
    trainer.add_callback(snapshots)
    trainer.train()
    assert sorted(snapshots.steps) == [1, 2, 3, 4, 5]
    for step, (policy, ref_before, ref_after) in snapshots.steps.items():
        for name, after in ref_after.items():
            if step % 2:
                assert torch.equal(after, ref_before[name]), (step, name)
            else:
                want = alpha * policy[name].double() + (1 - alpha) * ref_before[name].double()
                torch.testing.assert_close(after.double(), want, rtol=2 ** -23, atol=1e-7)   # fp32 rounding
        if step % 2 == 0:
            assert any(not torch.equal(ref_after[n], ref_before[n]) for n in ref_after)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())


def test_sync_ref_model_rejections(tmp_path):
    with pytest.raises(NotImplementedError, match="sync_ref_model=True` while using a PEFT model"):
        DPOTrainer(lora(tiny_llama(seed=37)), args=config(tmp_path, sync_ref_model=True), train_dataset=pairs(2))
    with pytest.raises(ValueError, match="together with `precompute_ref_log_probs=True`"):
        config(tmp_path, sync_ref_model=True, precompute_ref_log_probs=True)
    with pytest.raises(ValueError, match="no reference model to synchronize"):
        config(tmp_path, sync_ref_model=True, loss_type="simpo")
    with pytest.raises(ValueError, match="ref_model_mixup_alpha must be in"):
        config(tmp_path, sync_ref_model=True, ref_model_mixup_alpha=0.0)
    with pytest.raises(ValueError, match="ref_model_sync_steps must be at least 1"):
        config(tmp_path, sync_ref_model=True, ref_model_sync_steps=0)
    with pytest.raises(ValueError, match="'model.layers.1.*missing in the reference"):
        DPOTrainer(tiny_llama(seed=38), tiny_llama(seed=38, num_hidden_layers=1),
                   args=config(tmp_path, sync_ref_model=True), train_dataset=pairs(2))


# ---------------------------------------------------------------- MoE aux
VOCAB, COEF = 97, 0.25


def tiny_moe(kind, seed):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=COEF, bos_token_id=1,
                  eos_token_id=2, pad_token_id=2)
    torch.manual_seed(seed)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(num_local_experts=4, intermediate_size=64, **common)).eval()
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(num_experts=4, moe_intermediate_size=64, shared_expert_intermediate_size=64,
                                              decoder_sparse_step=1, mlp_only_layers=[], **common)).eval()


def by_hand(model, ref, rows):
    """dpo_loss(...).mean() + COEF·aux, from one unpacked forward per sequence: log-probs from the logits, and
    transformers' load_balancing_loss_func over every sequence's router logits (all of the stream's tokens)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    sums, routers = {model: [], ref: []}, []
    with torch.no_grad():
        for row in rows:
            for completion in (row["chosen_input_ids"], row["rejected_input_ids"]):
                ids = torch.tensor([row["prompt_input_ids"] + completion])
                for m in (model, ref):
                    out = m(input_ids=ids, output_router_logits=m is model)
                    logp = torch.log_softmax(out.logits[0, :-1].double(), -1).gather(1, ids[0, 1:, None])[:, 0]
                    sums[m].append(logp[len(row["prompt_input_ids"]) - 1:].sum())
                    if m is model:
                        routers.append(out.router_logits)
    layers = tuple(torch.cat(per_layer) for per_layer in zip(*routers))
    aux = load_balancing_loss_func(layers, 4, 2)
    policy, reference = torch.stack(sums[model]).float(), torch.stack(sums[ref]).float()
    losses, _, _ = dpo_loss(policy[0::2], policy[1::2], reference[0::2], reference[1::2], beta=0.5)
    return losses.mean().item() + COEF * aux.item(), aux.item()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_aux_loss_added_and_logged(tmp_path, kind):
    data = pairs(4, seed=40, vocab=VOCAB)
    model, ref = tiny_moe(kind, seed=41), tiny_moe(kind, seed=42)
    want, aux = by_hand(model, ref, list(data))
    # the hand-computed aux loss routes every sequence whole (the shared-prefix case: test_prefix_sharing_train.py)
    trainer = DPOTrainer(model, ref, args=config(tmp_path, max_steps=1, prefix_sharing=False), train_dataset=data,
                         eval_dataset=data)
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == COEF
    metrics = trainer.evaluate()
    assert metrics["eval_loss"] == pytest.approx(want, rel=1e-5)
    assert metrics["eval_aux_loss"] == pytest.approx(aux, rel=1e-5)
    trainer.train()
    logs = trainer.state.log_history[-2]       # the step's log (the last entry is the run summary)
    assert logs["loss"] == pytest.approx(want, rel=1e-5) and logs["aux_loss"] == pytest.approx(aux, rel=1e-5)


def test_moe_aux_loss_under_gradient_accumulation(tmp_path):
    """Micro-batches of 2 and 1 pairs: Σ compute_loss = Σ DPO losses / 3 + coef · Σ (pairs_mb / 3) · aux_mb, where
    aux_mb is the micro-batch's own load-balancing loss (a mean over its tokens)."""
    g = torch.Generator().manual_seed(43)
    data = datasets.Dataset.from_list([{k: torch.randint(3, VOCAB, (n,), generator=g).tolist() for k, n in
                                        (("prompt_input_ids", 4), ("chosen_input_ids", 2), ("rejected_input_ids", 3))}
                                       for _ in range(3)])                       # 13 tokens a pair
    model, ref = tiny_moe("mixtral", seed=44), tiny_moe("mixtral", seed=45)
    trainer = DPOTrainer(model, ref, args=config(tmp_path, max_tokens_per_batch=26, gradient_accumulation_steps=2,
                                                 prefix_sharing=False,
                                                 router_aux_loss_coef=0.5), train_dataset=data)
    batches = [trainer._prepare_inputs(b) for b in trainer.get_train_dataloader()]
    assert sorted(len(b.row_index) for b in batches) == [1, 2]
    model.train()
    got = sum(trainer.compute_loss(model, b, num_items_in_batch=torch.tensor(3)) for b in batches)
    want = 0.0
    for b in batches:
        rows = [data[int(i)] for i in b.row_index]
        total, aux = by_hand(model, ref, rows)          # its DPO mean + COEF · aux
        dpo_mean = total - COEF * aux
        want += dpo_mean * len(rows) / 3 + 0.5 * aux * len(rows) / 3
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_dense_model_has_no_aux_loss(tmp_path):
    data = pairs(3, seed=46)
    trainer = DPOTrainer(tiny_llama(seed=47), args=config(tmp_path, max_steps=1), train_dataset=data)
    trainer.train()
    assert not trainer.aux_loss_enabled and "aux_loss" not in trainer.state.log_history[0]
    with pytest.raises(ValueError, match="returns no router logits"):
        DPOTrainer(tiny_llama(seed=47), args=config(tmp_path, router_aux_loss_coef=0.01), train_dataset=data)
    moe = tiny_moe("mixtral", seed=48)
    moe.config.output_router_logits = False                      # an MoE model not asked for its router logits
    assert not DPOTrainer(moe, args=config(tmp_path), train_dataset=pairs(2, vocab=VOCAB)).aux_loss_enabled
