"""Unpaired rows (fastdpo.data.unpaired): formats, TRL's unpairing order, truncation, the KL rotation, the packed
layout, whole-group micro-batches, and the errors for bad labels and one-class data."""

import datasets
import pytest
import torch

from _kto_rows import BAD, GOOD, QUESTIONS, conversational, paired, standard
from _shared import DIALOGUES, A, H, smollm2_tokenizer
from fastdpo.data import GroupBatchSampler, UnpairedGrouping, pack, tokenize_unpaired, unpair_preference_rows
from fastdpo.data.packing import IGNORE_INDEX
from fastdpo.data.unpaired import KL_COLUMN


def rows(data, **kw):
    return tokenize_unpaired(datasets.Dataset.from_list(data), smollm2_tokenizer(), **kw)


def test_unpairing_keeps_trl_order_per_map_batch():
    """TRL's unpair_preference_dataset: per datasets.map batch (1000 pairs), its chosen rows then its rejected ones."""
    pairs = datasets.Dataset.from_list([{"prompt": f"q{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(1001)])
    out = unpair_preference_rows(pairs)
    assert out.column_names == ["prompt", "completion", "label"] and len(out) == 2002
    assert out[999]["completion"] == "c999" and out[1000]["completion"] == "r0" and out[1999]["completion"] == "r999"
    assert out[2000]["completion"] == "c1000" and out[2001] == {"prompt": "q1000", "completion": "r1000", "label": False}


def test_implicit_prompts_paired_and_unpaired():
    """HH dialogues (paired: split where the replies diverge; unpaired: before the last assistant turn) and a
    conversation given whole as the completion: the same prompt and completion as the explicit rows."""
    tok = smollm2_tokenizer()
    question, good, bad = DIALOGUES[0]
    hh_pair, _ = rows([{"chosen": f"{H}{question}{A}{good}", "rejected": f"{H}{question}{A}{bad}"}])
    hh_rows, _ = rows([{"completion": f"{H}{question}{A}{good}", "label": True},
                       {"completion": f"{H}{question}{A}{bad}", "label": False}])
    explicit, _ = rows([{"prompt": f"{H}{question}{A}", "completion": c, "label": lab}
                        for c, lab in ((good, True), (bad, False))])
    assert hh_pair[:] == hh_rows[:] == explicit[:]
    assert tok.decode(explicit[0]["completion_input_ids"]) == good + tok.eos_token
    whole = [{"completion": row["prompt"] + row["completion"], "label": row["label"]} for row in conversational()]
    assert rows(whole)[0][:] == rows(conversational())[0][:]


def test_truncation_and_the_kl_rotation():
    """Rows whose prompt fills max_length are dropped; completions and KL completions (the previous row's in each group
    of 3, from its untruncated completion) keep their first max_length - len(prompt) tokens."""
    full, _ = rows(standard(), kl_group_size=3)
    limit = 7
    cut, report = rows(standard(), max_length=limit, kl_group_size=3)
    dropped = [i for i, r in enumerate(full) if len(r["prompt_input_ids"]) >= limit]
    kept = [i for i in range(8) if i not in dropped]
    assert report == {"rows": 8, "kept": len(kept), "prompt_too_long": len(dropped),
                      "desirable": sum(standard()[i]["label"] for i in kept),
                      "undesirable": sum(not standard()[i]["label"] for i in kept)}
    assert dropped and len(kept) >= 5
    completions = [full[i]["completion_input_ids"] for i in kept]
    for j, row in enumerate(cut):
        budget = limit - len(row["prompt_input_ids"])
        source = j - 1 if j % 3 else min(j + 2, len(kept) - 1)
        assert row["completion_input_ids"] == completions[j][:budget]
        assert row[KL_COLUMN] == completions[source][:budget]
    assert any(len(r["completion_input_ids"]) < len(c) for r, c in zip(cut, completions))


def test_packed_layouts():
    """[prompt + completion][KL completion] as a branch off the prompt (positions running on from it), or the prompt
    repeated; only completions are scored; labels and precomputed columns ride along as row values."""
    row = {"prompt_input_ids": [5, 6, 7], "completion_input_ids": [8, 9], KL_COLUMN: [10], "label": False,
           "ref_logps": -3.0, "ref_KL_logps": -1.5}
    shared = pack([row], UnpairedGrouping(prefix_sharing=True))
    assert shared.input_ids.tolist() == [[5, 6, 7, 8, 9, 10]] and shared.position_ids.tolist() == [[0, 1, 2, 3, 4, 3]]
    assert shared.targets.tolist() == [8, 9, 10] and shared.logit_index.tolist() == [2, 3, 2]
    assert shared.row_values == {"label": torch.tensor([0.0]), "ref_logps": torch.tensor([-3.0]),
                                 "ref_KL_logps": torch.tensor([-1.5])}
    unshared = pack([row], UnpairedGrouping(prefix_sharing=False))
    assert unshared.input_ids.tolist() == [[5, 6, 7, 8, 9, 5, 6, 7, 10]] and unshared.segments is None
    assert unshared.targets.tolist() == [8, 9, 10] and unshared.logit_index.tolist() == [2, 3, 7]   # not the prompt
    alone = pack([row], UnpairedGrouping(kl=False))
    assert alone.group_size == 1 and alone.input_ids.tolist() == [[5, 6, 7, 8, 9]] and "ref_KL_logps" not in \
        alone.row_values
    segments = UnpairedGrouping(kl=False).segments(row, 0)
    assert segments[0].labels == [IGNORE_INDEX] * 3 + [8, 9]
    with pytest.raises(ValueError, match="row 4: empty KL completion"):
        pack([{**row, KL_COLUMN: [], "row_index": 4}], UnpairedGrouping())


def test_micro_batches_hold_whole_kl_groups():
    lengths = [3, 4, 5, 3, 2, 6, 4, 1, 2, 2]
    sampler = GroupBatchSampler(lengths, 3, 12, shuffle=False)
    assert list(sampler) == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    shuffled = GroupBatchSampler(lengths, 3, 12, seed=3)
    shuffled.set_epoch(1)
    batches = list(shuffled)
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert all(set(g) <= set(b) or not set(g) & set(b) for g in shuffled.groups for b in batches)   # whole groups
    with pytest.raises(ValueError, match=r"KL group 1 \(rows 3-5: 14 tokens\)"):
        GroupBatchSampler([3, 4, 5, 3, 5, 6], 3, 13)


@pytest.mark.parametrize("data, message", [
    ([{"prompt": "a", "completion": "b"}], "need a boolean 'label' column"),
    ([{"prompt": "a", "completion": "b", "label": 1}, {"prompt": "c", "completion": "d", "label": 0}],
     "row 0: label must be true or false .* got int 1"),
    ([{"prompt": "a", "completion": "b", "label": True}, {"prompt": "c", "completion": "d", "label": None}],
     "row 1: label must be true or false .* got NoneType"),
    ([{"prompt": "a", "completion": "b", "label": "yes"}], "row 0: label must be true or false .* got str 'yes'"),
    ([{"prompt": "a", "answer": "b", "label": True}], "need a 'completion' column"),
    ([{"completion": "no dialogue here", "label": True}], "row 0: no 'prompt' column, and the completion has no "
                                                          "assistant turn"),
    ([{"prompt": "a", "completion": "", "label": True}], "row 0: the completion is empty"),
])
def test_bad_rows_name_the_problem(data, message):
    with pytest.raises(ValueError, match=message):
        rows(data)


def test_paired_rows_with_other_columns_are_unpaired_first():
    out, report = rows(paired(3), kl_group_size=2)
    assert report["rows"] == 6 and report["desirable"] == report["undesirable"] == 3
    tok = smollm2_tokenizer()
    assert [tok.decode(r["completion_input_ids"]) for r in out] == [c + tok.eos_token for c in GOOD[:3] + BAD[:3]]
    assert tok.decode(out[3]["prompt_input_ids"]) == QUESTIONS[0]
