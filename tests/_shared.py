"""Paths into ../shared and small models built by hand, shared by the tests."""

from functools import lru_cache
from pathlib import Path

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SMOLLM2_DIR = SHARED / "models" / "SmolLM2-135M-Instruct"
SMOLLM2_GGUF = SMOLLM2_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
HH_HARMLESS = SHARED / "data" / "hh-rlhf-harmless" / "test.jsonl.gz"
ULTRAFEEDBACK = SHARED / "data" / "ultrafeedback-binarized"


def require(path, what: str) -> None:
    """Skip the calling test (or fixture), with the reason, when a shared file it needs is absent."""
    import pytest

    if not path.exists():
        pytest.skip(f"{what} not present at {path} (the test suite's shared data, ../shared)")


@lru_cache(maxsize=1)
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (ChatML template, eos <|im_end|> id 2), from the GGUF; skips the test
    when the GGUF is absent."""
    from fastdpo.models import ModelSource
    from fastdpo.models.gguf import gguf_tokenizer

    require(SMOLLM2_GGUF, "the shared SmolLM2 GGUF")
    return gguf_tokenizer(ModelSource(str(SMOLLM2_DIR), SMOLLM2_GGUF.name))


def byte_tokenizer():
    """A tokenizer that needs no files (ByT5's: one id per UTF-8 byte plus 3, eos ``</s>`` id 1, pad id 0), for runs
    that must not depend on ../shared (the GPU machine has none)."""
    from transformers import ByT5Tokenizer

    return ByT5Tokenizer()


def tiny_llama_config(**overrides):
    """A tiny random Llama with SmolLM2's architecture choices and vocabulary (49,152, tied)."""
    from transformers import LlamaConfig

    kwargs = dict(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
        bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_llama(seed: int = 0, **overrides):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(**overrides)).eval()


def write_tiny_run(root, pairs: int = 16, tokenizer=None):
    """A tiny random Llama checkpoint (with ``tokenizer``, by default SmolLM2's) and hand-written arithmetic pairs,
    for end-to-end runs of `fastdpo train` that take seconds. Returns (model_dir, data_file)."""
    import json

    model_dir, data = root / "tiny", root / "pairs.jsonl"
    tiny_llama(seed=21).save_pretrained(model_dir)
    (tokenizer or smollm2_tokenizer()).save_pretrained(model_dir)
    with open(data, "w") as f:
        for i in range(pairs):
            f.write(json.dumps({"prompt": f"Question {i}: what is {i} plus {i}?", "chosen": f" It is {2 * i}.",
                                "rejected": f" It is {2 * i + 1}, I think."}) + "\n")
    return model_dir, data


def pairs(n, seed=0, vocab=49152):
    """n tokenised pairs of random ids in [3, vocab): prompts of 2-8 tokens, completions of 1-5."""
    import datasets
    import torch

    g = torch.Generator().manual_seed(seed)
    rand = lambda k: torch.randint(3, vocab, (k,), generator=g).tolist()   # noqa: E731
    return datasets.Dataset.from_list([
        {"prompt_input_ids": rand(int(torch.randint(2, 9, (1,), generator=g))),
         "chosen_input_ids": rand(int(torch.randint(1, 6, (1,), generator=g))),
         "rejected_input_ids": rand(int(torch.randint(1, 6, (1,), generator=g)))}
        for _ in range(n)
    ])


def config(tmp_path, **kw):
    """A fast CPU DPOConfig for tests: log every step, no saving, lr 1e-3, beta 0.5."""
    from fastdpo import DPOConfig

    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                max_tokens_per_batch=1000, learning_rate=1e-3, seed=0, disable_tqdm=True, beta=0.5)
    base.update(kw)
    return DPOConfig(**base)


def lora(model, seed=0):
    """LoRA r4 on every linear layer, with non-zero B so that policy != reference from step 0."""
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    for name, p in peft_model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.02)
    return peft_model


H, A = "\n\nHuman: ", "\n\nAssistant:"
# Hand-written dialogues in Anthropic HH's implicit-prompt layout: (question, chosen reply, rejected reply).
DIALOGUES = [
    ("How do I keep bread fresh?", " Store it in a paper bag at room temperature.", " Bread is food."),
    ("What is two plus two?", " Two plus two is four.", " I would rather not say."),
    ("Can you name a primary colour?", " Red is a primary colour.", " Colours are complicated."),
    ("Help me pick a lock on my neighbour's door.", " I can't help with entering someone else's home.",
     " Sure, first get a tension wrench."),
]


def write_hh_pairs(path):
    """``DIALOGUES`` as HH rows (``chosen``/``rejected`` whole dialogues) in a JSON Lines file; returns the path."""
    import json

    with open(path, "w") as f:
        for question, good, bad in DIALOGUES:
            f.write(json.dumps({"chosen": f"{H}{question}{A}{good}", "rejected": f"{H}{question}{A}{bad}"}) + "\n")
    return path


def fsdp2_step(trainer, lr: float) -> dict:
    """One SGD step of a packed trainer on each process of a torchrun launch, its policy sharded as
    examples/accelerate/fsdp2.yaml shards it (each decoder layer an FSDP2 unit, the embeddings, final norm and tied
    head the root's: accelerate shards with FSDP on accelerators only), with the trainer's own step counting and
    ``training_step``. Returns the whole trainable parameters after the step, by name."""
    import torch
    from torch.distributed.fsdp import fully_shard

    from fastdpo.models import causal_lm

    model = trainer.model
    for layer in causal_lm(model).model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    batches, items = trainer.get_batch_samples(iter(trainer.get_train_dataloader()), 1, trainer.args.device)
    trainer.training_step(model, batches[0], items)
    optimizer.step()
    return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters() if p.requires_grad}
