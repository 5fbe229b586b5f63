"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback"; TRL 1.16's
``trl.experimental.online_dpo``): each step samples two completions per prompt from the current policy, ranks
them with a reward model or an LLM judge, and takes the DPO loss on the ranked pair through fastdpo's packed,
fused log-probs.

Data flow: prompts -> ``generate`` (two samples per prompt) -> ranking -> tokenised pair rows -> ``pack``
(``SampledPairs``) -> ``PreferenceTrainer.compute_loss`` (policy and reference log-probs, the loss) -> metrics.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from transformers import GenerationConfig

from ..data import PackedBatch, pack, tokenize_prompts
from ..losses import LossSpec
from ..train import PreferenceTrainer
from ..train.metrics import Mean, metric
from ..train.trainer import PreferenceMetrics
from .config import OnlineDPOConfig
from .judges import LLMJudge, PairwiseJudge, RewardModelScorer, rank_by_scores


@dataclass
class OnlineMetrics(PreferenceMetrics):
    """TRL 1.16's online DPO metrics (``OnlineDPOTrainer``'s docstring): the DPO ones, means over the ranked pairs
    (``objective/*``), over the sampled completions (``val/contain_eos_token``), over the prompts
    (``judge/unparseable``), and ``beta``."""

    objective_kl: Mean | None = metric("objective/kl")
    objective_entropy: Mean | None = metric("objective/entropy")
    objective_non_score_reward: Mean | None = metric("objective/non_score_reward")
    objective_scores: Mean | None = metric("objective/scores")
    objective_scores_margin: Mean | None = metric("objective/scores_margin")
    objective_rlhf_reward: Mean | None = metric("objective/rlhf_reward")
    val_contain_eos_token: Mean | None = metric("val/contain_eos_token")
    judge_unparseable: Mean | None = metric("judge/unparseable")
    beta: Mean | None = None


@dataclass(frozen=True)
class SampledPairs(PackedBatch):
    """A packed micro-batch of ranked sampled pairs, with what the online metrics count.

    Attributes:
        contain_eos: [2] float32 (completions holding an EOS token, completions sampled).
        unparseable: [2] float32 (prompts the judge gave no verdict for, prompts).
        scores: [B, 2] float32 reward-model scores (chosen, rejected; EOS penalty applied), or None (a judge).
    """

    contain_eos: torch.Tensor | None = None
    unparseable: torch.Tensor | None = None
    scores: torch.Tensor | None = None


class SampledCounts(NamedTuple):
    """What an online DPO step counts over all processes: ``StepPairs``' pairs and NLL tokens, its prompts, and those
    the judge gave no verdict for."""

    pairs: torch.Tensor
    nll_tokens: torch.Tensor
    prompts: torch.Tensor
    unparseable: torch.Tensor


class OnlineDPOTrainer(PreferenceTrainer):
    """Online DPO on ``transformers.Trainer`` with packed pairs and fused log-probs.

    Each micro-batch of ``per_device_train_batch_size`` prompts is turned into pairs at the start of its optimiser
    step (``get_batch_samples``): the policy (unwrapped, PEFT adapters active, eval mode, KV cache on) samples two
    completions per prompt (``temperature``, pure sampling: top-k and top-p off, as TRL's defaults), each cut
    after its first EOS token (kept, as TRL's ``truncate_right``); the ranker picks the chosen one; the ranked
    pairs are packed as in offline training. The loss is then ``PreferenceTrainer``'s (``dpo_loss`` with ``args``' loss
    options and this epoch's β, the mean over the ranked pairs of the effective batch), with the same reference
    options: ``ref_model``, the PEFT policy with its adapters disabled (or a reference adapter), or a frozen copy.

    Ranking (give one):

    - a reward model (``reward_model`` or ``args.reward_model_path``): scores as TRL 1.16
      (``fastdpo.online.judges.RewardModelScorer``), ``missing_eos_penalty`` subtracted from completions without EOS,
      the first sample wins ties (``fastdpo.online.judges.rank_by_scores``);
    - a pairwise judge (``judge``, any ``fastdpo.online.judges.PairwiseJudge``, or ``args.judge``, an instruct model
      loaded into ``fastdpo.online.judges.LLMJudge``). A pair the judge gives no verdict for (-1: an unparseable answer)
      is left out of the loss and of every per-pair metric, and counted in ``judge/unparseable``; TRL's judge
      trainer counted it as a win for the second completion, which trains on noise.

    Logged with TRL 1.16's names (``OnlineDPOTrainer.training_step``), means over the pairs of each logging window
    (per completion where TRL averages over completions): ``objective/kl`` (Σ_t log π − log π_ref over a
    completion), ``objective/entropy`` (−Σ_t log π), ``objective/non_score_reward`` (−β·kl), ``rewards/*`` and
    ``logps/*`` as DPOTrainer, ``beta``, ``val/contain_eos_token`` (over all sampled completions); with a reward
    model ``objective/scores``, ``objective/scores_margin`` (chosen − rejected) and ``objective/rlhf_reward``
    (score − β·kl), all with the EOS penalty applied; with a judge ``judge/unparseable`` (fraction of prompts).
    Unlike TRL's padded sums, the sums cover exactly the completion tokens (TRL's KL and entropy also add the
    log-probs at pad positions after the EOS).

    Args:
        model, ref_model, peft_config: as ``DPOTrainer``.
        args: an ``OnlineDPOConfig``.
        train_dataset: rows with a ``prompt`` column (a string, or a message list rendered with the tokenizer's
            chat template and generation prompt), tokenised by ``fastdpo.data.tokenize_prompts``.
        processing_class: the policy's tokenizer (required; decodes completions for the ranker).
        reward_model: an ``AutoModelForSequenceClassification`` with one label, and ``reward_processing_class``
            its tokenizer (default: loaded from the model's ``name_or_path``).
        judge: a ``PairwiseJudge``.

    Raises:
        ValueError: no train dataset or tokenizer, an eval dataset (evaluation is not implemented online), no
            ranker or two (a reward model and a judge, or an object and a config path for the same role), a
            tokenizer without an EOS token, and the errors of ``tokenize_prompts`` and ``DPOTrainer``.
    """

    tokenized_columns = ("prompt_input_ids",)
    Counts = SampledCounts

    def __init__(self, model, ref_model=None, args: OnlineDPOConfig | None = None, train_dataset=None,
                 processing_class=None, reward_model=None, reward_processing_class=None,
                 judge: PairwiseJudge | None = None, peft_config=None, **kwargs):
        args = args or OnlineDPOConfig(output_dir="fastdpo-online-output")
        if train_dataset is None or processing_class is None:
            raise ValueError("OnlineDPOTrainer needs a train_dataset of prompts and the tokenizer as processing_class")
        if kwargs.get("eval_dataset") is not None:
            raise ValueError("evaluation is not implemented for online DPO; evaluate sampled completions separately")
        if processing_class.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token_id: completions could never end")
        if reward_model is not None and args.reward_model_path is not None:
            raise ValueError("give the reward model as an object or as args.reward_model_path, not both")
        if judge is not None and args.judge is not None:
            raise ValueError("give the judge as an object or as args.judge, not both")
        has_reward = reward_model is not None or args.reward_model_path is not None
        if has_reward == (judge is not None or args.judge is not None):
            raise ValueError("online DPO ranks completions with either a reward model or a judge: give exactly one")
        super().__init__(model, ref_model, args=args, peft_config=peft_config, data_collator=_collate_prompts,
                         train_dataset=train_dataset, processing_class=processing_class, **kwargs)
        self._epoch_specs: dict[float, LossSpec] = {}
        self.scorer = self.judge = None
        if has_reward:
            self.scorer = _reward_scorer(reward_model, reward_processing_class, args.reward_model_path, args.device)
        else:
            self.judge = judge if judge is not None else _llm_judge(args)
        generation = self.accelerator.unwrap_model(self.model).generation_config
        declared = generation.eos_token_id if generation is not None else None
        declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
        # Every eos id the model declares (e.g. an end-of-turn token) ends a completion, as TRL.
        self.eos_token_ids = list(dict.fromkeys([processing_class.eos_token_id, *declared]))
        pad = processing_class.pad_token_id
        self.generation_config = GenerationConfig(
            do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0, max_new_tokens=args.max_new_tokens,
            eos_token_id=self.eos_token_ids, pad_token_id=pad if pad is not None else self.eos_token_ids[0],
            use_cache=True,
        )

    # ------------------------------------------------------------------ data
    def tokenize(self, dataset, tokenizer, args: OnlineDPOConfig):
        return tokenize_prompts(dataset, tokenizer, max_prompt_length=args.prompt_limit,
                                truncation_mode=args.truncation_mode, num_proc=args.dataset_num_proc), None

    def batch_sampler(self, dataset, *, shuffle: bool, seed: int, batch_size: int):
        # per_device_train_batch_size prompts: their pairs exist only once sampled, in get_batch_samples
        return self.row_batches(dataset, shuffle=shuffle, seed=seed, batch_size=batch_size)

    @property
    def beta(self) -> float:
        """This epoch's β: ``args.beta[epoch]``, the last value beyond the list (TRL's ``OnlineDPOTrainer.beta``,
        with the epoch's integer part: ``state.epoch`` counts fractions of epochs)."""
        return self.args.beta[min(int(self.state.epoch or 0), len(self.args.beta) - 1)]

    def step_loss_spec(self) -> LossSpec:
        beta = self.beta
        if beta not in self._epoch_specs:
            self._epoch_specs[beta] = replace(self.loss_spec, beta=beta)
        return self._epoch_specs[beta]

    def count(self, batch: SampledPairs) -> SampledCounts:
        unparseable, prompts = batch.unparseable.tolist()
        return SampledCounts(*super().count(batch), int(prompts), int(unparseable))

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Sample, rank and pack each prompt micro-batch of the step, then count pairs as ``PreferenceTrainer``."""
        batches = [self.generate_pairs(prompts) for prompts in itertools.islice(epoch_iterator, num_batches)]
        return super().get_batch_samples(iter(batches), len(batches), device)

    # ------------------------------------------------------------ generation
    def generate_pairs(self, prompts: dict) -> SampledPairs:
        """One prompt micro-batch -> one packed micro-batch of ranked pairs.

        Args:
            prompts: ``{"prompt": [B] raw prompts, "prompt_input_ids": [B] token id lists}``.

        Returns:
            the ranked pairs (B' <= B; none when the judge gave no verdict at all) with their counts.
        """
        prompt_ids = prompts["prompt_input_ids"]
        completions, contain_eos = self.sample_completions(prompt_ids)
        texts = self.processing_class.batch_decode(completions, skip_special_tokens=True)
        b = len(prompt_ids)
        if self.scorer is not None:
            scores = self.scorer.score(list(prompts["prompt"]) * 2, texts).cpu()
            scores, first_wins = rank_by_scores(scores, contain_eos, self.args.missing_eos_penalty)
            verdicts = (~first_wins).long().tolist()
        else:
            verdicts = self.judge.judge(list(prompts["prompt"]), list(zip(texts[:b], texts[b:])))
        rows, ranked = [], []
        for i, verdict in enumerate(verdicts):
            if verdict in (0, 1):
                chosen, rejected = (i, b + i) if verdict == 0 else (b + i, i)
                rows.append({"prompt_input_ids": list(prompt_ids[i]), "chosen_input_ids": completions[chosen],
                             "rejected_input_ids": completions[rejected]})
                ranked.append((chosen, rejected))
        packed = pack(rows, self.grouping)
        return SampledPairs(
            **{f.name: getattr(packed, f.name) for f in fields(PackedBatch)},
            contain_eos=torch.tensor([float(contain_eos.sum()), 2.0 * b]),
            unparseable=torch.tensor([float(sum(v not in (0, 1) for v in verdicts)), float(b)]),
            scores=scores[torch.tensor(ranked, dtype=torch.long).reshape(-1, 2)] if self.scorer is not None else None,
        )

    @torch.no_grad()
    def sample_completions(self, prompt_ids: list[list[int]]) -> tuple[list[list[int]], torch.Tensor]:
        """Two sampled completions per prompt from the current policy.

        Args:
            prompt_ids: B token id lists.

        Returns:
            (2B completions: the first samples of the B prompts, then their second samples, as TRL; each cut
            after its first EOS token, which it keeps; [2B] bool, whether it holds an EOS token).
        """
        policy = self.accelerator.unwrap_model(self.model)
        pad = self.generation_config.pad_token_id
        width = max(len(ids) for ids in prompt_ids)
        input_ids = torch.tensor([[pad] * (width - len(ids)) + list(ids) for ids in prompt_ids])
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompt_ids])
        device = next(policy.parameters()).device
        was_training = policy.training
        # FSDP all-gathers in every forward, so its processes sample in step until the last one is done
        # (transformers turns this on only for models it shards itself)
        synced = isinstance(policy, (FSDPModule, FullyShardedDataParallel)) and self.args.world_size > 1
        # eval mode: no dropout while sampling, and gradient checkpointing (train mode only) would turn the cache off
        policy.eval()
        try:
            out = policy.generate(input_ids=input_ids.repeat(2, 1).to(device),
                                  attention_mask=attention_mask.repeat(2, 1).to(device),
                                  generation_config=self.generation_config, synced_gpus=synced)
        finally:
            policy.train(was_training)
        completions, contain_eos = [], []
        eos = set(self.eos_token_ids)
        for row in out[:, width:].tolist():
            end = next((t + 1 for t, token in enumerate(row) if token in eos), None)
            completions.append(row[:end] if end is not None else row)
            contain_eos.append(end is not None)
        return completions, torch.tensor(contain_eos)

    # ------------------------------------------------------------------ loss
    def loss_metrics(self, batch: SampledPairs, policy, ref, *args, **kwargs) -> OnlineMetrics:
        """The DPO metrics and TRL's online ones (see the class docstring) of the ranked pairs in the loss: all of
        the micro-batch's, or none where it was left out of the loss."""
        chosen, rejected = policy.chosen.detach(), policy.rejected.detach()
        # per pair: means over pairs are means over completions
        kl, entropy = (chosen - ref[0] + rejected - ref[1]) / 2, -(chosen + rejected) / 2
        beta, scored = self.beta, self.scorer is not None
        scores = batch.scores[:len(kl)] if scored else None
        return OnlineMetrics(
            **vars(super().loss_metrics(batch, policy, ref, *args, **kwargs)), objective_kl=Mean.of(kl),
            objective_entropy=Mean.of(entropy), objective_non_score_reward=Mean.of(-beta * kl),
            objective_scores=Mean.of(scores.mean(1)) if scored else None,
            objective_scores_margin=Mean.of(scores[:, 0] - scores[:, 1]) if scored else None,
            objective_rlhf_reward=Mean.of(scores.mean(1) - beta * kl) if scored else None,
            val_contain_eos_token=Mean(*batch.contain_eos),
            judge_unparseable=Mean(*batch.unparseable) if self.judge is not None else None,
            beta=Mean(batch.contain_eos.new_tensor(beta), batch.contain_eos.new_tensor(1.0)),
        )

    def nothing_trained(self) -> str:
        if self.step_counts.pairs or not self.step_counts.unparseable:
            return super().nothing_trained()
        return (f"the judge gave no verdict for any of the {int(self.step_counts.prompts)} prompt(s) "
                "(judge/unparseable), so no pair was ranked.\nWhat to do: judge with an instruct model that answers "
                "TRL's pairwise prompt with 0 or 1 (small or base models rarely do), give it more "
                "--judge-max-new-tokens, or rank with --reward-model")


def _collate_prompts(rows: list[dict]) -> dict:
    return {"prompt": [row["prompt"] for row in rows], "prompt_input_ids": [row["prompt_input_ids"] for row in rows]}


def _reward_scorer(model, tokenizer, path: str | None, device) -> RewardModelScorer:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if model is None:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, use_safetensors=True)
    if tokenizer is None:
        tokenizer = AutoTokenizer.from_pretrained(path or model.config.name_or_path)
    return RewardModelScorer(model.requires_grad_(False).to(device), tokenizer)


def _llm_judge(args: OnlineDPOConfig) -> LLMJudge:
    from ..models import load_causal_lm, load_tokenizer, resolve_model

    source = resolve_model(args.judge)
    model = load_causal_lm(source).requires_grad_(False).to(args.device)
    return LLMJudge(model, load_tokenizer(source), max_new_tokens=args.judge_max_new_tokens, seed=args.seed)
