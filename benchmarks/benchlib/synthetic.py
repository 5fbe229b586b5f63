"""What a training-step benchmark needs where nothing can be carried or downloaded (the GPU machine): a randomly
initialised model built from a config, a tokenizer that needs no files, and preference pairs shaped like HH-RLHF.

Speed and memory depend on the shapes, not on the weights or the words: a random model of Llama-3.2-1B's shape
costs what the real one does, and pairs of random letters of HH's token lengths pack and pad like HH.
"""

from __future__ import annotations

import random
import string

#: LlamaConfig arguments; ``llama-3.2-1b`` is meta-llama/Llama-3.2-1B's shape (its RoPE scaling left out: it changes
#: no cost), ``tiny`` the dry run's.
MODELS = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=4096),
}

#: Token lengths of HH-RLHF harmless (test split, all 2312 rows, SmolLM2's tokenizer, prompt extracted as fastdpo
#: does) as lognormals: (mean, std) of log(length). Medians there: prompt 98, chosen 27, rejected 35 tokens; p99 542,
#: 192, 249.
HH_LOG_LENGTHS = {"prompt": (4.41, 0.98), "chosen": (3.29, 0.92), "rejected": (3.49, 0.97)}


def byte_tokenizer():
    """One token per byte (byte-level BPE without merges), pad ``<pad>`` id 0, eos ``</s>`` id 1, no files needed.
    It adds no special token of its own (ByT5's would end every prompt with ``</s>``, which TRL then cuts off the
    prompt): the trainers append eos to the completions, and a text of k ASCII letters is k tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def random_causal_lm(name: str, device: str, dtype, attn_implementation: str):
    """A Llama of ``MODELS[name]``'s shape with random weights, built on ``device`` in ``dtype`` (seeded)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import fastdpo.models  # noqa: F401  registers fastdpo's attention (packed_sdpa) with transformers

    tokenizer = byte_tokenizer()
    config = LlamaConfig(**MODELS[name], bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, use_cache=False)
    config._attn_implementation = attn_implementation
    torch.manual_seed(0)
    with torch.device(device):   # initialised where it runs: a 1.2B-parameter init on the CPU takes minutes
        return LlamaForCausalLM(config).to(dtype)


def hh_like_pairs(count: int, max_length: int, seed: int = 0) -> list[dict[str, str]]:
    """``count`` rows {"prompt", "chosen", "rejected"} of random lowercase letters whose lengths in
    ``byte_tokenizer`` tokens follow ``HH_LOG_LENGTHS``, cut so that neither trainer truncates (prompt at most
    max_length / 2 - 1, prompt + completion + eos at most max_length): both do the same work."""
    rng = random.Random(seed)

    def length(part: str, most: int) -> int:
        mean, std = HH_LOG_LENGTHS[part]
        return max(1, min(most, round(rng.lognormvariate(mean, std))))

    def text(k: int) -> str:
        return "".join(rng.choices(string.ascii_lowercase, k=k))

    rows = []
    for _ in range(count):
        prompt = length("prompt", max_length // 2 - 1)
        rows.append({"prompt": text(prompt), "chosen": text(length("chosen", max_length - prompt - 1)),
                     "rejected": text(length("rejected", max_length - prompt - 1))})
    return rows
