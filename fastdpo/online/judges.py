"""Ranking the two sampled completions of online DPO: an LLM judge or a reward model.

- ``LLMJudge``: an instruct model is asked which of two responses is better and answers ``0`` or ``1``
  (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback", OAIF), with the prompt of TRL's
  pairwise judges (``DEFAULT_PAIRWISE_SYSTEM_PROMPT`` of ``trl/trainer/judges.py``, TRL 0.11-0.2x).
- ``RewardModelScorer``: a sequence-classification reward model scores each prompt + completion, as TRL 1.16's
  ``OnlineDPOTrainer._calculate_rewards_from_functions``; ``rank_by_scores`` applies ``missing_eos_penalty``
  and picks the winner as its ``training_step``.
"""

from __future__ import annotations

import re
from typing import Protocol, runtime_checkable

import torch

# TRL's DEFAULT_PAIRWISE_SYSTEM_PROMPT, verbatim; the braces are doubled for str.format.
PAIRWISE_PROMPT = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{{
    "instruction": """{prompt}""",
}}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{{
    {{
        "model_identifier": "0",
        "output": """{response0}"""
    }},
    {{
        "model_identifier": "1",
        "output": """{response1}"""
    }}
}}

## Task

Evaluate the models on the basis of the quality and relevance of their results, and select the model that generated the best result. Reply with the identifier of the best model. Our evaluation will only take into account the first character of your answer, so make sure it contains only one of the identifiers and nothing else (no quotation marks, no spaces, no new lines, ...).
'''

# A 0 or 1 not inside a longer number ("10", "0.5" and "2021" hold no verdict).
_VERDICT = re.compile(r"(?<!\d)(?<!\d\.)([01])(?!\d|\.\d)")


def parse_verdict(answer: str) -> int:
    """The judge's choice in its answer: the first standalone ``0`` or ``1`` ("1", " 0\\n", "Response 1",
    "model_identifier: 0", "**1**"), else -1. Digits inside longer numbers do not count, so "10", "0.7" or
    "2" are no verdict (-1).

    Args:
        answer: the judge's decoded answer.

    Returns:
        0, 1, or -1 (unparseable).
    """
    match = _VERDICT.search(answer)
    return int(match.group(1)) if match else -1


def render_prompt(prompt) -> str:
    """A prompt as plain text for a judge: a string as is; a message list as ``"Role: content"`` paragraphs
    (TRL's ``SIMPLE_CHAT_TEMPLATE``, which its online DPO trainer used to show conversations to judges)."""
    if isinstance(prompt, str):
        return prompt
    return "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in prompt)


@runtime_checkable
class PairwiseJudge(Protocol):
    """Anything that picks the better of two completions per prompt (TRL's ``BasePairwiseJudge`` interface)."""

    def judge(self, prompts: list, completion_pairs: list[tuple[str, str]]) -> list[int]:
        """For each prompt (a string or a message list) and its two completions (strings), 0 or 1 for the
        better one, or -1 when there is no verdict."""


class LLMJudge:
    """An instruct model as pairwise judge (OAIF, Guo et al. 2024): TRL's pairwise prompt as one user turn
    through the judge's chat template, a few greedy tokens, ``parse_verdict``.

    Position bias: with ``shuffle_order`` (default, as TRL's judges) each pair is shown in a random order
    (seeded ``torch.Generator``) and the verdict mapped back, which cancels a preference for one position in
    expectation at no extra cost; asking in both orders would double the judge's work.

    Args:
        model: a causal LM (eval mode is set here; it stays on its device, inputs follow it).
        tokenizer: its tokenizer, with a chat template.
        max_new_tokens: answer tokens to generate (the verdict is expected first).
        shuffle_order: randomise the order of each pair.
        seed: seed of the order shuffles.
        batch_size: judge prompts per ``generate`` call.

    Attributes:
        last_answers: the decoded answers of the last ``judge`` call (in the order shown), for inspection.

    Raises:
        ValueError: a tokenizer without a chat template, or ``max_new_tokens`` < 1.
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 4, shuffle_order: bool = True, seed: int = 0,
                 batch_size: int = 8):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("the judge's tokenizer has no chat template; LLMJudge needs an instruct model")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_new_tokens = max_new_tokens
        self.shuffle_order = shuffle_order
        self.batch_size = batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.last_answers: list[str] = []

    def judge(self, prompts: list, completion_pairs: list[tuple[str, str]]) -> list[int]:
        """0 or 1 for the better completion of each pair, -1 where the answer holds no verdict.

        Raises:
            ValueError: ``prompts`` and ``completion_pairs`` of different lengths.
        """
        if len(prompts) != len(completion_pairs):
            raise ValueError(f"{len(prompts)} prompts but {len(completion_pairs)} completion pairs")
        swapped = (torch.rand(len(prompts), generator=self.generator) < 0.5).tolist() if self.shuffle_order \
            else [False] * len(prompts)
        texts = [self._chat(PAIRWISE_PROMPT.format(prompt=render_prompt(p), response0=pair[s], response1=pair[1 - s]))
                 for p, pair, s in zip(prompts, completion_pairs, map(int, swapped))]
        self.last_answers = [a for i in range(0, len(texts), self.batch_size)
                             for a in self._answer(texts[i:i + self.batch_size])]
        verdicts = [parse_verdict(a) for a in self.last_answers]
        return [v if v < 0 or not s else 1 - v for v, s in zip(verdicts, swapped)]

    def _chat(self, content: str) -> str:
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                  add_generation_prompt=True)

    @torch.no_grad()
    def _answer(self, texts: list[str]) -> list[str]:
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="left",
                                add_special_tokens=False).to(next(self.model.parameters()).device)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens, pad_token_id=pad,
                                  use_cache=True)
        return self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class RewardModelScorer:
    """A reward model (``AutoModelForSequenceClassification`` with one label) scoring prompt + completion, as
    TRL 1.16 ``OnlineDPOTrainer._calculate_rewards_from_functions``: standard prompts are concatenated with the
    completion text; conversational ones get the completion as an assistant message, rendered with the reward
    tokenizer's chat template. Texts are right-padded, tokenised without special tokens; the score is logit 0.

    Args:
        model: the reward model (eval mode is set here); its config's ``pad_token_id`` is set to the tokenizer's.
        tokenizer: its tokenizer (the eos token pads when it has no pad token).

    Raises:
        ValueError: a model with more than one label.
    """

    def __init__(self, model, tokenizer):
        if model.config.num_labels != 1:
            raise ValueError(f"the reward model must have one output (num_labels=1), got {model.config.num_labels}")
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
        self.model = model.eval()
        self.tokenizer = tokenizer

    @torch.no_grad()
    def score(self, prompts: list, completions: list[str]) -> torch.Tensor:
        """[N] float32 scores of N prompt/completion pairs (prompts strings or message lists).

        Raises:
            ValueError: conversational prompts and a reward tokenizer without a chat template.
        """
        if prompts and isinstance(prompts[0], list):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError("conversational prompts need a reward tokenizer with a chat template")
            texts = [self.tokenizer.apply_chat_template(p + [{"role": "assistant", "content": c}], tokenize=False)
                     for p, c in zip(prompts, completions)]
        else:
            texts = [p + c for p, c in zip(prompts, completions)]
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, padding_side="right",
                                add_special_tokens=False).to(next(self.model.parameters()).device)
        return self.model(**inputs).logits[:, 0].float()


def rank_by_scores(scores: torch.Tensor, contain_eos: torch.Tensor,
                   missing_eos_penalty: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """TRL 1.16 ``OnlineDPOTrainer.training_step``'s ranking: completions without EOS lose
    ``missing_eos_penalty`` from their score, then of completions i and B + i the first wins ties.

    Args:
        scores: [2B] float, the scores of the first samples of B prompts, then of their second samples.
        contain_eos: [2B] bool, whether each completion ended with an EOS token.
        missing_eos_penalty: subtracted where ``contain_eos`` is False; None for no penalty.

    Returns:
        (penalised scores [2B] float, first_wins [B] bool).
    """
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~contain_eos).to(scores.dtype)
    first, second = scores.split(scores.numel() // 2)
    return scores, first >= second
