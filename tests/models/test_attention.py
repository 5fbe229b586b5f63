"""``packed_sdpa``: per-sequence attention of a packed stream equals transformers' masked attention
(forward and every gradient), builds no [T, T] mask, and leaves padded/cached generation to ``sdpa``."""

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM

from _reference import rel_err
from _shared import tiny_llama
from fastdpo.data.packing import pack_pairs
from fastdpo.models import attention
from fastdpo.train.forward import packed_sequence_logps


def batch(seed=0, vocab=49152, lengths=((5, 3, 4), (9, 1, 6), (2, 7, 7), (1, 1, 1))):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()
    return pack_pairs([{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
                       for p, c, r in lengths])


def logps_and_grads(model, packed):
    model.zero_grad()
    chosen, rejected = packed_sequence_logps(model, packed)
    (chosen.sum() - 0.7 * rejected.sum()).backward()
    return torch.cat([chosen, rejected]).detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(model_a, model_b, packed):
    (out_a, grads_a), (out_b, grads_b) = logps_and_grads(model_a, packed), logps_and_grads(model_b, packed)
    assert rel_err(out_a, out_b) <= 1e-5
    for name, grad in grads_b.items():
        assert rel_err(grads_a[name], grad) <= 1e-5, name


@pytest.mark.parametrize("reference", ["eager", "sdpa"])
def test_equals_masked_attention_forward_and_gradients(reference):
    packed = batch()
    assert_same(tiny_llama(seed=1, attn_implementation="packed_sdpa").train(),
                tiny_llama(seed=1, attn_implementation=reference).train(), packed)


def test_sliding_window_within_each_sequence():
    """Mistral with a 4-token window, sequences up to 16 tokens: the band applies inside each sequence."""
    models = []
    for implementation in ("packed_sdpa", "eager"):
        torch.manual_seed(3)
        config = MistralConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=4,
                               attn_implementation=implementation)
        models.append(MistralForCausalLM(config).train())
    assert_same(*models, batch(seed=2, vocab=512))


def test_no_square_mask_is_built(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a [T, T] mask was built for a packed stream")

    monkeypatch.setattr(attention, "sdpa_mask", refuse)
    model = tiny_llama(seed=1, attn_implementation="packed_sdpa")
    with torch.no_grad():
        packed_sequence_logps(model, batch())


def test_generation_with_padding_and_cache_is_sdpa():
    prompts = torch.tensor([[2, 2, 11, 12, 13], [21, 22, 23, 24, 25]])
    mask = (prompts != 2).long()
    outs = []
    for implementation in ("packed_sdpa", "sdpa"):
        model = tiny_llama(seed=5, attn_implementation=implementation)
        outs.append(model.generate(input_ids=prompts, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                   pad_token_id=2, eos_token_id=None))
    assert torch.equal(outs[0], outs[1])


def test_sequence_starts():
    assert attention.sequence_starts(torch.tensor([0, 1, 2, 0, 1, 0])) == [0, 3, 5, 6]
    assert attention.sequence_starts(torch.tensor([4, 5, 0, 1])) == [0, 2, 4]


def test_train_default_on_cpu_loads(tmp_path):
    from fastdpo.models import ModelSource, default_attn_implementation, load_causal_lm

    tiny_llama(seed=1).save_pretrained(tmp_path)
    implementation = default_attn_implementation("cpu")
    model = load_causal_lm(ModelSource(str(tmp_path), None), attn_implementation=implementation)
    assert implementation == "packed_sdpa" and model.config._attn_implementation == "packed_sdpa"


def test_attention_sinks_are_refused_not_ignored():
    q = torch.randn(1, 4, 6, 8)
    module = tiny_llama(seed=1, attn_implementation="packed_sdpa").model.layers[0].self_attn
    with pytest.raises(ValueError, match="packed_sdpa has no path for s_aux"):
        attention.packed_sdpa_attention(module, q, q, q, None, s_aux=torch.zeros(4))
