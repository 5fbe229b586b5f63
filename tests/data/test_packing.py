"""Packed micro-batches: layout, token budget, and isolation of packed sequences in a real model."""

import pytest
import torch

import fastdpo
from _reference import rel_err
from _shared import tiny_llama
from fastdpo.data.packing import TokenBudgetBatchSampler, pack_pairs, pair_length
from fastdpo.train.forward import packed_sequence_logps

ROWS = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
    {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15, 16]},
]


def test_pack_pairs_layout():
    b = pack_pairs(ROWS)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 10, 11, 12, 13, 14, 11, 15, 16]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert b.cu_seqlens.tolist() == [0, 5, 9, 13, 16] and b.cu_seqlens.dtype == torch.int32
    # the last prompt token predicts the first completion token; the final token predicts nothing
    assert b.logit_index.tolist() == [2, 3, 7, 9, 10, 11, 13, 14]
    assert b.targets.tolist() == [8, 9, 10, 12, 13, 14, 15, 16]
    assert all(b.input_ids[0, i + 1] == t for i, t in zip(b.logit_index.tolist(), b.targets.tolist()))
    assert b.label_cu_seqlens.tolist() == [0, 2, 3, 6, 8]
    assert b.row_values == {} and b.row_index is None
    with_ref = pack_pairs([dict(r, ref_chosen_logps=-1.5, ref_rejected_logps=-2.5) for r in ROWS])
    assert with_ref.row_values["ref_rejected_logps"].tolist() == [-2.5, -2.5]


def test_pack_pairs_shared_prefix_layout():
    """[prompt][chosen][rejected]: rejected positions continue from the prompt, the last prompt position predicts
    both first completion tokens, rejected's keys are its prompt and itself."""
    b = pack_pairs(ROWS, prefix_sharing=True)
    assert b.input_ids.tolist() == [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 1, 2]]
    assert b.cu_seqlens.tolist() == [0, 5, 6, 10, 12] and b.num_rows == 2
    assert b.logit_index.tolist() == [2, 3, 2, 6, 7, 8, 6, 10]
    assert b.targets.tolist() == [8, 9, 10, 12, 13, 14, 15, 16] and b.label_cu_seqlens.tolist() == [0, 2, 3, 6, 8]
    seg = b.segments
    assert seg.cu_seqlens_q is b.cu_seqlens and seg.cu_seqlens_k.tolist() == [0, 5, 9, 13, 16]
    assert seg.kv_index.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 5, 6, 7, 8, 9, 6, 10, 11]
    assert (seg.max_seqlen_q, seg.max_seqlen_k) == (5, 5)
    assert seg.cu_seqlens_k.dtype == torch.int32 and b.to("cpu").segments.kv_index.dtype == torch.long
    assert pair_length(ROWS[0], prefix_sharing=True) == 6 and pack_pairs(ROWS).segments is None
    with pytest.raises(ValueError, match="pair 7: empty prompt and rejected token list"):
        pack_pairs([{"prompt_input_ids": [], "chosen_input_ids": [1], "rejected_input_ids": [], "row_index": 7}])


def test_token_budget_sampler():
    lengths = [9, 4, 7, 3, 10, 1, 6]
    sampler = TokenBudgetBatchSampler(lengths, 10, shuffle=True, seed=3)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(7))            # every pair once, none split
    assert all(sum(lengths[i] for i in b) <= 10 for b in batches)
    sampler.set_epoch(1)
    assert sorted(map(tuple, sampler)) == sorted(map(tuple, batches)) and len(sampler) == len(batches)
    assert list(TokenBudgetBatchSampler(lengths, 10, shuffle=False)) == [[0], [1], [2, 3], [4], [5, 6]]
    with pytest.raises(ValueError, match="smaller than 2 pair\\(s\\); the longest, pair 4, needs 10 tokens"):
        TokenBudgetBatchSampler(lengths, 8)
    assert pair_length(ROWS[0]) == 9


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_equals_alone_on_smollm2_architecture(attn):
    """Per-sequence log-probs from one packed micro-batch equal each sequence run alone (fp32, 1e-5)."""
    model = tiny_llama(seed=1)
    model.set_attn_implementation(attn)
    g = torch.Generator().manual_seed(0)
    rows = [{k: torch.randint(3, 49152, (n,), generator=g).tolist() for k, n in
             zip(("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"), lens)}
            for lens in [(6, 3, 5), (1, 1, 2), (12, 7, 1), (4, 9, 9)]]
    chosen, rejected = packed_sequence_logps(model, pack_pairs(rows))
    alone = []
    for row in rows:
        for key in ("chosen_input_ids", "rejected_input_ids"):
            ids = torch.tensor([row["prompt_input_ids"] + row[key]])
            labels = torch.tensor([[-100] * len(row["prompt_input_ids"]) + row[key]])
            with torch.no_grad():
                alone.append(fastdpo.get_batch_logps(model(ids).logits, labels)[0])
    packed = torch.stack([chosen, rejected], 1).reshape(-1)
    assert rel_err(packed.detach(), torch.stack(alone)) <= 1e-5
