"""The packed-training base is the extension point: a toy listwise trainer (a prompt and three completions, the last
two branching off the prompt: a third grouping beside pairs and sequences) declares only its grouping, counts, metrics
and loss, and trains; its loss equals a float64 computation from each whole sequence's logits (linear in each
completion's log-prob, so a layout that let one completion see another would fail it)."""

from dataclasses import dataclass
from typing import NamedTuple

import datasets
import pytest
import torch

from _shared import tiny_llama
from fastdpo.data import Grouping, Segment
from fastdpo.data.packing import IGNORE_INDEX
from fastdpo.ops import sequence_logps
from fastdpo.train import Mean, Metrics, PackedConfig, PackedTrainer, label_logps


class Triple(Grouping):
    size = 3

    def segments(self, row, index):
        prompt, (best, *others) = row["prompt_input_ids"], row["completions"]
        return [Segment(prompt + best, [IGNORE_INDEX] * len(prompt) + best),
                *(Segment(c, c, prefix=len(prompt)) for c in others)]


class Rows(NamedTuple):
    rows: torch.Tensor


@dataclass
class ListwiseMetrics(Metrics):
    loss: Mean | None = None


class ListwiseTrainer(PackedTrainer):
    """A toy loss: the first of three completions should be likelier than the mean of the other two."""

    tokenized_columns, grouping, Counts = ("prompt_input_ids", "completions"), Triple(), Rows

    def count(self, batch):
        return Rows(batch.num_rows)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        sums = sequence_logps(label_logps(model, inputs).logps, inputs.label_cu_seqlens).view(-1, 3)
        losses = sums[:, 1:].mean(1) - sums[:, 0]
        self.metrics.add("train" if model.training else "eval", inputs, ListwiseMetrics(loss=Mean.of(losses)))
        return losses.mean() if num_items_in_batch is None else \
            losses.sum() / num_items_in_batch * self.accelerator.num_processes


def by_hand(model, row):
    sums = []
    for completion in row["completions"]:
        ids = torch.tensor([row["prompt_input_ids"] + completion])
        with torch.no_grad():
            logps = model(input_ids=ids).logits[0, :-1].double().log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
        sums.append(logps[len(row["prompt_input_ids"]) - 1:].sum())
    return (sums[1] + sums[2]) / 2 - sums[0]


def test_a_toy_trainer_needs_only_the_base(tmp_path):
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 49152, (n,), generator=g).tolist()   # noqa: E731
    data = datasets.Dataset.from_list([{"prompt_input_ids": ids(3 + i), "completions": [ids(1 + (i + j) % 4)
                                                                                        for j in range(3)]}
                                       for i in range(5)])
    model = tiny_llama(seed=1, attn_implementation="packed_sdpa")
    args = PackedConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_tokens_per_batch=40, max_steps=2,
                        logging_steps=1, save_strategy="no", learning_rate=1e-3, disable_tqdm=True)
    trainer = ListwiseTrainer(model, args, train_dataset=data, eval_dataset=data)
    batch = next(iter(trainer.get_eval_dataloader()))
    assert batch.group_size == 3 and batch.num_rows == len(batch.row_index) > 1 and batch.segments is not None
    want = torch.stack([by_hand(model, row) for row in data]).mean()
    assert trainer.evaluate()["eval_loss"] == pytest.approx(want.item(), rel=1e-5)
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
