"""Shared-prefix layout on every CPU attention path: per-completion log-probs and every gradient equal the unshared
layout's (eager attention, fp32, 1e-5) on SmolLM2's architecture, a Mistral window shorter than the prompts, Qwen2's
attention bias and Gemma-2 (soft-capping, alternating local layers); a layout that lets rejected see chosen fails the
same check; an implementation without a path is refused by name."""

from dataclasses import replace

import pytest
import torch
from transformers import (
    AttentionInterface,
    Gemma2Config,
    Gemma2ForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from _reference import rel_err
from _shared import tiny_llama
from fastdpo import linear_logps
from fastdpo.data.packing import pack_pairs
from fastdpo.models import attention, prefix_attention
from fastdpo.train.forward import packed_sequence_logps

# (prompt, chosen, rejected) lengths: prompts longer and shorter than the 3-token windows, one-token completions
LENGTHS = ((5, 3, 4), (9, 1, 6), (2, 7, 7), (1, 1, 1), (4, 2, 1))
SMALL = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, initializer_range=0.2)


def _seeded(cls, config):
    torch.manual_seed(3)
    model = cls(config)
    for name, p in model.named_parameters():
        if name.endswith("bias"):   # transformers initialises biases to 0: make Qwen2's matter
            torch.nn.init.normal_(p, std=0.5)
    return model.eval()


ARCHS = {
    "smollm2": lambda impl: tiny_llama(seed=1, attn_implementation=impl),
    "mistral_window": lambda impl: _seeded(MistralForCausalLM, MistralConfig(
        **SMALL, sliding_window=3, attn_implementation=impl)),
    "qwen2_bias": lambda impl: _seeded(Qwen2ForCausalLM, Qwen2Config(**SMALL, attn_implementation=impl)),
    "gemma2": lambda impl: _gemma2(impl),
}


def _gemma2(implementation):
    model = _seeded(Gemma2ForCausalLM, Gemma2Config(
        **{**SMALL, "num_hidden_layers": 4}, sliding_window=3, attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        query_pre_attn_scalar=8, attn_implementation="eager" if implementation == "packed_sdpa" else implementation))
    # transformers refuses any implementation named *sdpa* on Gemma-2 at load (its sdpa has no soft-capping);
    # packed_sdpa soft-caps, so it is set after loading
    model.config._attn_implementation = implementation
    return model


def rows(vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()   # noqa: E731
    return [{"prompt_input_ids": ids(p), "chosen_input_ids": ids(c), "rejected_input_ids": ids(r)}
            for p, c, r in LENGTHS]


def logps_and_grads(model, batch, grads=True):
    """Per-completion log-probs [2B] (chosen then rejected) and every parameter's gradient of a random weighting."""
    model.zero_grad()
    with torch.set_grad_enabled(grads):
        chosen, rejected = packed_sequence_logps(model, batch)
    out = torch.cat([chosen, rejected])
    if not grads:
        return out, {}
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(7))
    (out * upstream).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_parity(arch, implementation, batch=None, grads=True):
    reference = ARCHS[arch]("eager")
    data = rows(reference.config.vocab_size)
    want, want_grads = logps_and_grads(reference, pack_pairs(data), grads)
    got, got_grads = logps_and_grads(ARCHS[arch](implementation), batch or pack_pairs(data, prefix_sharing=True),
                                     grads)
    assert rel_err(got, want) <= 1e-5, f"log-probs {rel_err(got, want):.2e}"
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert rel_err(got_grads[name], grad) <= 1e-5, f"{name}: {rel_err(got_grads[name], grad):.2e}"


@pytest.mark.parametrize("implementation", ["packed_sdpa", "sdpa", "eager"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_shared_equals_unshared_forward_and_gradients(arch, implementation):
    if arch == "gemma2" and implementation == "sdpa":
        pytest.skip("transformers' sdpa has no soft-capping: Gemma-2 refuses sdpa itself")
    assert_parity(arch, implementation)


@pytest.mark.parametrize("arch", list(ARCHS))
def test_flex_attention_forward(arch):
    """flex_attention with the shared-prefix BlockMask (per layer type); its backward does not run on CPU."""
    assert_parity(arch, "flex_attention", grads=False)


def _leaky_layout(batch):
    """Each rejected segment's keys are the whole of prompt + chosen, then itself: rejected sees chosen."""
    seg = batch.segments
    cu_q, index, cu_k = seg.cu_seqlens_q.tolist(), [], [0]
    for i in range(0, len(cu_q) - 1, 2):
        start, branch, end = cu_q[i:i + 3]
        index += [*range(start, branch), *range(start, end)]
        cu_k += [cu_k[-1] + branch - start, cu_k[-1] + branch - start + end - start]
    leaky = replace(seg, kv_index=torch.tensor(index), cu_seqlens_k=torch.tensor(cu_k, dtype=torch.int32),
                    max_seqlen_k=max(b - a for a, b in zip(cu_k[:-1], cu_k[1:])))
    return replace(batch, segments=leaky)


def _leaky_mask(position_ids, window=None):
    """Causal within each pair: rejected sees its prompt and chosen."""
    pair = (position_ids == 0).cumsum(1)
    return lambda b, h, q, kv: (pair[b, q] == pair[b, kv]) & (kv <= q)


@pytest.mark.parametrize("implementation", ["packed_sdpa", "eager"])
def test_parity_check_fails_when_rejected_sees_chosen(implementation, monkeypatch):
    batch = pack_pairs(rows(49152), prefix_sharing=True)
    if implementation == "packed_sdpa":
        batch = _leaky_layout(batch)
    else:
        monkeypatch.setattr(prefix_attention, "prefix_mask_function", _leaky_mask)
    with pytest.raises(AssertionError, match="log-probs"):
        assert_parity("smollm2", implementation, batch)


def test_mask_function_reads_the_layout_from_positions():
    """P=2, C=2, R=1 then an unshared 2-token sequence: rejected (position 2) sees the prompt and itself."""
    pos = torch.tensor([[0, 1, 2, 3, 2, 0, 1]])
    mask = prefix_attention.prefix_mask_function(pos)
    q, kv = torch.arange(7)[:, None], torch.arange(7)[None, :]
    want = torch.tensor([[1, 0, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0, 0],
                         [1, 1, 0, 0, 1, 0, 0], [0, 0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask(0, 0, q, kv), want)
    band = prefix_attention.prefix_mask_function(pos, window=2)(0, 0, q, kv)
    assert band[4].tolist() == [False, True, False, False, True, False, False]   # positions 1 and 2 of 2


def test_packed_sdpa_builds_no_square_mask(monkeypatch):
    """Memory linear in T: no [T, T] mask, and no mask larger than one segment's queries × keys."""
    batch = pack_pairs(rows(49152), prefix_sharing=True)
    monkeypatch.setattr(attention, "sdpa_mask", lambda *a, **k: pytest.fail("a [T, T] mask was built"))
    sizes, sdpa = [], torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, **kwargs):
        sizes.append(0 if attn_mask is None else attn_mask.numel())
        return sdpa(q, k, v, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        packed_sequence_logps(tiny_llama(seed=1, attn_implementation="packed_sdpa"), batch)
    assert max(sizes) <= batch.segments.max_seqlen_q * batch.segments.max_seqlen_k < batch.input_ids.numel() ** 2


def test_unsupported_implementation_is_refused():
    AttentionInterface.register("plain_sdpa_copy", sdpa_attention_forward)
    model = tiny_llama(seed=1, attn_implementation="plain_sdpa_copy")
    with pytest.raises(ValueError, match="'plain_sdpa_copy' has no shared-prefix path.*--prefix-sharing false"):
        packed_sequence_logps(model, pack_pairs(rows(49152), prefix_sharing=True))
    packed_sequence_logps(model, pack_pairs(rows(49152)))   # the unshared layout still runs
    config = model.config
    config._attn_implementation = "flash_attention_3"
    assert "'flash_attention_3' has no shared-prefix path" in prefix_attention.unsupported_reason(config)
    config._attn_implementation, config.layer_types = "sdpa", ["full_attention", "chunked_attention"]
    assert "['chunked_attention'] have no shared-prefix mask" in prefix_attention.unsupported_reason(config)


def test_head_gradient_sums_a_row_read_twice():
    """The last prompt position predicts both first completion tokens: its hidden state gets both gradients."""
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(4, 16, generator=g, requires_grad=True)
    weight = torch.randn(40, 16, generator=g)
    index, labels = torch.tensor([1, 2, 1, 3]), torch.tensor([5, 6, 7, 8])
    upstream = torch.randn(4, generator=g)
    (linear_logps(hidden[index], weight, labels) * upstream).sum().backward()
    ref = hidden.detach().double().requires_grad_()
    (torch.log_softmax(ref[index] @ weight.double().T, -1).gather(1, labels[:, None])[:, 0] * upstream).sum().backward()
    assert rel_err(hidden.grad, ref.grad) <= 1e-6 and hidden.grad[1].abs().sum() > 0
