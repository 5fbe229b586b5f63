"""One rank of tests/test_fsdp.py (run by torchrun on CPU, gloo): FSDP2-shard a tiny Llama, take the
fused packed log-probs of this rank's micro-batch, backward, and compare the loss and every gradient
with one unsharded process computing the ranks' mean loss. Rank 0 writes the result as JSON."""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # tests/, for _shared

from _shared import tiny_llama  # noqa: E402
from fastdpo.data.packing import pack_pairs  # noqa: E402
from fastdpo.train.forward import pair_logps  # noqa: E402


def micro_batch(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(3, 49152, (n,), generator=g).tolist()
    return pack_pairs([{"prompt_input_ids": ids(4 + i), "chosen_input_ids": ids(3 + 2 * i),
                        "rejected_input_ids": ids(5 - i)} for i in range(3)])


def loss_of(model, batch) -> torch.Tensor:
    pair = pair_logps(model, batch)
    return (pair.chosen - 0.5 * pair.rejected).sum()


def main(out: str, tied: bool, shard_head: bool) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    reference = tiny_llama(seed=3, tie_word_embeddings=tied).train()
    model = tiny_llama(seed=3, tie_word_embeddings=tied).train()
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    if shard_head:
        fully_shard(model.lm_head, mesh=mesh)
    fully_shard(model, mesh=mesh)

    loss = loss_of(model, micro_batch(rank))
    head_type = type(model.lm_head.weight).__name__
    loss.backward()
    grads = {n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad for n, p in model.named_parameters()}
    losses = [torch.zeros(1) for _ in range(world)]
    dist.all_gather(losses, loss.detach().reshape(1))

    mean_loss = sum(loss_of(reference, micro_batch(r)) for r in range(world)) / world
    mean_loss.backward()
    if rank == 0:
        errors = {n: ((grads[n] - p.grad).norm() / p.grad.norm()).item() for n, p in reference.named_parameters()}
        with open(out, "w") as f:
            json.dump({"loss": torch.cat(losses).mean().item(), "reference_loss": mean_loss.item(),
                       "grad_rel_err": errors, "head_after_forward": head_type}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], tied=sys.argv[2] == "tied", shard_head=sys.argv[3] == "shard-head")
