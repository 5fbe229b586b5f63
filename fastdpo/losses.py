"""Preference losses on per-sequence log-probabilities: plain PyTorch on [B] vectors.

One interface for every loss: ``dpo_loss`` takes the summed label log-probabilities of the policy
and the reference for the chosen and rejected completions (and, for the losses that need them,
completion token counts, the chosen completions' NLL and per-pair weights) and returns
``(losses, chosen_rewards, rejected_rewards)``, each [B]. It covers every loss of TRL 1.16's
``DPOTrainer._compute_loss`` (trl/trainer/dpo_trainer.py), with its ``f_divergence_type`` and WPO
weighting, TRL <= 0.28's ``rpo_alpha``, and the reference-free losses of TRL 1.16's experimental
``CPOTrainer`` (CPO, SimPO) and ``ORPOTrainer``. Per-token work (LD-DPO's split, WPO's weights,
ORPO's prompt NLL) happens where the per-sequence sums are formed, in ``fastdpo.train.forward``.

``kto_loss`` and ``kto_kl`` are TRL 1.16 ``KTOTrainer``'s unpaired losses on [R] vectors of rows (``fastdpo.KTOTrainer``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# TRL 1.16 (DPOTrainer.__init__): the f-DPO reparameterisation leaves a β·log Z(x) term that only
# cancels in the chosen − rejected score difference, so only these losses generalise
F_DIVERGENCE_LOSSES = frozenset({"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"})
# CPOTrainer / ORPOTrainer losses: no reference model; each stands alone in loss_type
REFERENCE_FREE_LOSSES = frozenset({"cpo", "simpo", "orpo"})
# log-probs averaged over the completion's tokens (the other losses use sums)
LENGTH_NORMALISED_LOSSES = frozenset({"simpo", "orpo"})


@dataclass
class _Pairs:
    """What the per-pair losses read: [B] tensors in the policy's dtype, ``nll`` a 0-d tensor."""

    beta: float
    label_smoothing: float
    discopop_tau: float
    simpo_gamma: float
    cpo_alpha: float
    chosen: torch.Tensor                  # policy log-probs, summed over the completion
    rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_logratios: torch.Tensor        # policy − reference
    rejected_logratios: torch.Tensor
    chosen_scores: torch.Tensor           # f'(π/π_ref) in log space (f-DPO); the log-ratios for reverse KL
    rejected_scores: torch.Tensor
    chosen_lengths: torch.Tensor | None   # completion token counts, ≥ 1 (clamped as TRL)
    rejected_lengths: torch.Tensor | None
    nll: torch.Tensor | None              # mean NLL over the batch's chosen NLL tokens

    @property
    def delta(self) -> torch.Tensor:
        return self.chosen_scores - self.rejected_scores


def _cdpo(logits: torch.Tensor, eps: float) -> torch.Tensor:
    """``−(1 − ε) log σ(x) − ε log σ(−x)``: the logistic loss with labels flipped with probability ε
    (conservative DPO, Mitchell 2023, "A note on DPO with noisy preferences"); ε = 0 is plain −log σ(x)."""
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def _sigmoid(p: _Pairs) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, Eq. 7), with cDPO label smoothing ε: ``cDPO_ε(β Δ)``, Δ = s_c − s_r.

    TRL 1.16's ``sigmoid`` is the ε = 0 case (it ignores ``label_smoothing`` for this loss); ε > 0
    is TRL <= 0.28's ``sigmoid`` and the ``sigmoid`` of TRL 1.16's CPOTrainer."""
    return _cdpo(p.beta * p.delta, p.label_smoothing)


def _hinge(p: _Pairs) -> torch.Tensor:
    """SLiC's hinge loss (Zhao et al. 2023, "SLiC-HF"): ``relu(1 − β Δ)``."""
    return torch.relu(1 - p.beta * p.delta)


def _per_token(scores: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return scores / lengths.clamp(min=1.0)


def _ipo(p: _Pairs) -> torch.Tensor:
    """IPO (Azar et al. 2023, "A General Theoretical Paradigm...", Eq. 17), scores per completion token as
    TRL 1.16 (confirmed with the authors): ``(s_c/n_c − s_r/n_r − 1/(2β))²``."""
    ipo_delta = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return (ipo_delta - 1 / (2 * p.beta)) ** 2


def _exo_pair(p: _Pairs) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, "Towards Efficient Exact Optimization...", Eq. 16), KL(q ‖ p) for K = 2 with
    ``q = σ(±β Δ)`` and label-smoothed targets ``p = (1 − ε, ε)``:
    ``σ(βΔ)(log σ(βΔ) − log(1 − ε)) + σ(−βΔ)(log σ(−βΔ) − log ε)``; needs 0 < ε."""
    logits = p.beta * p.delta
    eps = p.label_smoothing
    return (torch.sigmoid(logits) * (F.logsigmoid(logits) - math.log1p(-eps))
            + torch.sigmoid(-logits) * (F.logsigmoid(-logits) - math.log(eps)))


def _nca_pair(p: _Pairs) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment..."), r = β(π − π_ref):
    ``−log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r)``."""
    chosen_rewards = p.beta * p.chosen_logratios
    rejected_rewards = p.beta * p.rejected_logratios
    return -F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards) - 0.5 * F.logsigmoid(-rejected_rewards)


def _robust(p: _Pairs) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label flips of
    probability ε ∈ [0, 0.5): ``(−(1 − ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε)``."""
    eps = p.label_smoothing
    clean = -(1 - eps) * F.logsigmoid(p.beta * p.delta)
    flipped = -eps * F.logsigmoid(-p.beta * p.delta)
    return (clean - flipped) / (1 - 2 * eps)


def _bco_pair(p: _Pairs) -> torch.Tensor:
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization..."): ``−log σ(r_c) − log σ(−r_r)``,
    r = β(π − π_ref). As TRL 1.16, no reward shift δ: TRL <= 0.2x subtracted a running mean of the
    rewards (``RunningMoments``) kept across steps; 1.16 keeps no state."""
    return -F.logsigmoid(p.beta * p.chosen_logratios) - F.logsigmoid(-p.beta * p.rejected_logratios)


def _sppo_hard(p: _Pairs) -> torch.Tensor:
    """SPPO with hard probabilities (Wu et al. 2024, "Self-Play Preference Optimization", Eq. 4.7, P = 1 for
    the winner, 0 for the loser): ``(ρ_c − 1/(2β))² + (ρ_r + 1/(2β))²``, ρ = π − π_ref."""
    return (p.chosen_logratios - 0.5 / p.beta) ** 2 + (p.rejected_logratios + 0.5 / p.beta) ** 2


def _aot(p: _Pairs) -> torch.Tensor:
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment... Optimal Transport"): the
    batch's policy margins π_c − π_r and reference margins sorted separately, then
    ``cDPO_ε(β (sort(π_c − π_r) − sort(ref_c − ref_r)))``; entry i is not pair i."""
    logratios, _ = torch.sort(p.chosen - p.rejected, dim=0)
    ref_logratios, _ = torch.sort(p.ref_chosen - p.ref_rejected, dim=0)
    return _cdpo(p.beta * (logratios - ref_logratios), p.label_smoothing)


def _aot_unpaired(p: _Pairs) -> torch.Tensor:
    """AOT, unpaired (Melnyk et al. 2024): ``cDPO_ε(β (sort(ρ_c) − sort(ρ_r)))`` over the batch,
    ρ = π − π_ref."""
    chosen_sorted, _ = torch.sort(p.chosen_logratios, dim=0)
    rejected_sorted, _ = torch.sort(p.rejected_logratios, dim=0)
    return _cdpo(p.beta * (chosen_sorted - rejected_sorted), p.label_smoothing)


def _apo_zero(p: _Pairs) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7), raises chosen and
    lowers rejected likelihood: ``1 − σ(β ρ_c) + σ(β ρ_r)``."""
    return (1 - torch.sigmoid(p.beta * p.chosen_logratios)) + torch.sigmoid(p.beta * p.rejected_logratios)


def _apo_down(p: _Pairs) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, Eq. 8), lowers both, rejected more:
    ``σ(β ρ_c) + 1 − σ(β (ρ_c − ρ_r))``."""
    return torch.sigmoid(p.beta * p.chosen_logratios) + (
        1 - torch.sigmoid(p.beta * (p.chosen_logratios - p.rejected_logratios)))


def _discopop(p: _Pairs) -> torch.Tensor:
    """DiscoPOP's log-ratio modulated loss (Chris Lu et al. 2024, "Discovering Preference Optimization
    Algorithms...", Eq. 5), z = β Δ, m = σ(z/τ): ``−log σ(z) (1 − m) + exp(−z) m``."""
    logits = p.delta * p.beta
    modulation = torch.sigmoid(logits / p.discopop_tau)
    return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation


def _sft(p: _Pairs) -> torch.Tensor:
    """Behaviour cloning on the chosen completions (MPO's ``sft`` term; RPO's NLL, Pang et al. 2024,
    "Iterative Reasoning Preference Optimization", v3): the mean NLL over all chosen NLL tokens of the
    batch, the same for every pair (TRL expands its scalar the same way)."""
    return p.nll.expand(p.chosen.shape)


def _sigmoid_norm(p: _Pairs) -> torch.Tensor:
    """Length-normalised DPO (Tülu 3's ``dpo_norm``, Lambert et al. 2024; SimPO's LN-DPO), scores per
    completion token: ``−log σ(β (s_c/n_c − s_r/n_r))``."""
    delta = _per_token(p.chosen_scores, p.chosen_lengths) - _per_token(p.rejected_scores, p.rejected_lengths)
    return -F.logsigmoid(p.beta * delta)


def _with_bc(p: _Pairs, losses: torch.Tensor) -> torch.Tensor:
    """CPO's behaviour-cloning term ``+ cpo_alpha · NLL`` (CPOTrainer skips it when cpo_alpha is 0)."""
    return losses + p.cpo_alpha * p.nll if p.cpo_alpha != 0 else losses


def _cpo(p: _Pairs) -> torch.Tensor:
    """CPO (Xu et al. 2024, "Contrastive Preference Optimization", Eq. 3 plus its NLL term), reference-free:
    ``cDPO_ε(β (π_c − π_r)) + cpo_alpha · NLL`` (TRL 1.16 CPOTrainer, loss_type="sigmoid")."""
    return _with_bc(p, _cdpo(p.beta * (p.chosen - p.rejected), p.label_smoothing))


def _simpo(p: _Pairs) -> torch.Tensor:
    """SimPO (Meng et al. 2024, "SimPO: Simple Preference Optimization..."), on mean per-token
    log-probs a = π/n with target margin γ: ``cDPO_ε(β (a_c − a_r − γ/β)) + cpo_alpha · NLL``
    (TRL 1.16 CPOTrainer, loss_type="simpo"; cpo_alpha = 0 is the paper's SimPO, > 0 CPO-SimPO)."""
    logits = (_per_token(p.chosen, p.chosen_lengths) - _per_token(p.rejected, p.rejected_lengths)) - (
        p.simpo_gamma / p.beta)
    return _with_bc(p, _cdpo(p.beta * logits, p.label_smoothing))


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − eˣ) for x < 0, branching at −ln 2 against cancellation (Mächler 2012)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_log_odds(chosen_mean_logps: torch.Tensor, rejected_mean_logps: torch.Tensor) -> torch.Tensor:
    """ORPO's log odds ratio (Hong et al. 2024, "ORPO: Monolithic Preference Optimization...", Eq. 4):
    ``log(odds_c / odds_r)``, odds = P/(1 − P), P = exp(mean per-token log-prob); [B] float32 in, [B] out
    (< 0 inputs). TRL 1.16 ``ORPOTrainer.odds_ratio_loss``, which computes it in float32 as here."""
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    return (chosen - rejected) - (_log1mexp(chosen) - _log1mexp(rejected))


def _orpo(p: _Pairs) -> torch.Tensor:
    """ORPO (Hong et al. 2024, Eqs. 4 and 7), reference-free, λ = β: ``NLL − β log σ(log odds(a_c, a_r))`` with
    a = π/n and the NLL over the chosen prompt and completion (TRL 1.16 ORPOTrainer)."""
    log_odds = orpo_log_odds(_per_token(p.chosen, p.chosen_lengths), _per_token(p.rejected, p.rejected_lengths))
    return p.nll - p.beta * F.logsigmoid(log_odds)


_LOSSES = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "exo_pair": _exo_pair, "nca_pair": _nca_pair,
    "robust": _robust, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot, "aot_unpaired": _aot_unpaired,
    "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop, "sft": _sft, "sigmoid_norm": _sigmoid_norm,
    "cpo": _cpo, "simpo": _simpo, "orpo": _orpo,
}
LOSS_TYPES = tuple(_LOSSES)
# losses that divide by completion token counts
_NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm"}) | LENGTH_NORMALISED_LOSSES


def check_ld_alpha(ld_alpha: float | None) -> None:
    """Raises ValueError unless ``ld_alpha`` (LD-DPO's α) is None or in [0, 1] (TRL documents the range)."""
    if ld_alpha is not None and not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1] (1 = plain sums, 0 = drop tokens beyond the shorter "
                         f"completion), got {ld_alpha}")


@dataclass(frozen=True)
class LossSpec:
    """A loss configuration validated once, and what it needs from the forward.

    The fields are ``dpo_loss``'s options under ``DPOConfig``'s names (``LossSpec.from_config`` reads them from
    any config that has them); ``use_weighting`` is WPO weighting and ``ld_alpha`` LD-DPO's α, both applied
    where the per-sequence sums are formed (``fastdpo.train.forward``). ``rpo_alpha`` adds the term
    ``("sft", rpo_alpha)``, as TRL 0.28 documented it.

    Raises:
        ValueError: checked against TRL 1.16's rules (DPOConfig.__post_init__, DPOTrainer.__init__) and
            fastdpo's own: an empty or unknown loss type (TRL raises at loss time); ``loss_weights`` not one
            per loss type (TRL's DPOConfig); ``beta <= 0``; ``label_smoothing`` outside [0, 0.5]; ``robust``
            with ``label_smoothing`` = 0.5 (it divides by 1 − 2ε; TRL only warns); ``exo_pair`` with
            ``label_smoothing`` = 0 (TRL); an unknown ``f_divergence_type`` or a non-default one with a loss
            outside ``F_DIVERGENCE_LOSSES`` (TRL); WPO weighting with ``aot``/``aot_unpaired``, whose sorting
            misaligns per-pair weights (TRL raises NotImplementedError); ``discopop_tau <= 0``; ``ld_alpha``
            outside [0, 1]; cpo/simpo/orpo combined with another loss, ``rpo_alpha``, an f-divergence, WPO
            weighting or LD-DPO (their TRL trainers have none of these).
    """

    loss_type: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    reference_free: bool = False
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    rpo_alpha: float | None = None
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    use_weighting: bool = False
    ld_alpha: float | None = None

    def __post_init__(self):
        types = (self.loss_type,) if isinstance(self.loss_type, str) else tuple(self.loss_type)
        object.__setattr__(self, "loss_type", types)
        if self.loss_weights is not None:
            object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        self._check()

    @classmethod
    def from_config(cls, config, **overrides) -> LossSpec:
        """The spec of a ``DPOConfig`` (or any object with these attribute names), ``overrides`` replacing fields."""
        return cls(**{**{f.name: getattr(config, f.name) for f in fields(cls)}, **overrides})

    def _check(self) -> None:
        types, eps = self.loss_type, self.label_smoothing
        unknown = [t for t in types if t not in _LOSSES]
        if not types or unknown:
            raise ValueError(f"unknown loss_type {unknown or list(types)!r}; supported: {', '.join(LOSS_TYPES)}")
        if self.loss_weights is not None and len(self.loss_weights) != len(types):
            raise ValueError(f"loss_weights must have one weight per loss type: got {len(self.loss_weights)} weights "
                             f"for {len(types)} loss types {list(types)}")
        if not self.beta > 0:
            raise ValueError(f"beta must be positive, got {self.beta}")
        if not 0.0 <= eps <= 0.5:
            raise ValueError(f"label_smoothing must be in [0, 0.5], got {eps}")
        if "robust" in types and eps >= 0.5:
            raise ValueError(f"the robust loss needs label_smoothing in [0, 0.5): it divides by 1 - 2 * "
                             f"label_smoothing; got {eps}")
        if "exo_pair" in types and eps == 0.0:
            raise ValueError("the exo_pair loss needs label_smoothing > 0 (its target distribution is "
                             "(1 - label_smoothing, label_smoothing)); the EXO paper recommends 1e-3")
        f_div = self.f_divergence_type
        if f_div not in F_DIVERGENCE_TYPES:
            raise ValueError(f"unknown f_divergence_type {f_div!r}; supported: {', '.join(F_DIVERGENCE_TYPES)}")
        if f_div != "reverse_kl" and not set(types) <= F_DIVERGENCE_LOSSES:
            raise ValueError(f"f_divergence_type={f_div!r} is only supported for the loss types "
                             f"{sorted(F_DIVERGENCE_LOSSES)}, got {list(types)}; use f_divergence_type='reverse_kl'")
        if self.use_weighting and {"aot", "aot_unpaired"} & set(types):
            raise ValueError("WPO weighting (use_weighting) is not supported with aot or aot_unpaired: they sort the "
                             "batch, which misaligns per-pair weights")
        if not self.discopop_tau > 0:
            raise ValueError(f"discopop_tau must be positive, got {self.discopop_tau}")
        check_ld_alpha(self.ld_alpha)
        if REFERENCE_FREE_LOSSES & set(types):
            extras = [name for name, on in (
                ("another loss type", len(types) > 1), ("rpo_alpha", self.rpo_alpha is not None),
                ("f_divergence_type", f_div != "reverse_kl"), ("use_weighting", self.use_weighting),
                ("ld_alpha", self.ld_alpha is not None)) if on]
            if extras:
                raise ValueError(f"loss_type {list(types)} (CPOTrainer/ORPOTrainer's reference-free losses) cannot be "
                                 f"combined with {', '.join(extras)}")

    @property
    def terms(self) -> list[tuple[str, float]]:
        """The ``(loss type, weight)`` terms, ``("sft", rpo_alpha)`` last with ``rpo_alpha``."""
        weights = self.loss_weights or (1.0,) * len(self.loss_type)
        terms = list(zip(self.loss_type, weights))
        return terms + [("sft", float(self.rpo_alpha))] if self.rpo_alpha is not None else terms

    @property
    def needs_reference(self) -> bool:
        """False with ``reference_free`` or a reference-free loss (cpo, simpo, orpo)."""
        return not (self.reference_free or REFERENCE_FREE_LOSSES & set(self.loss_type))

    @property
    def uses_nll(self) -> bool:
        """A behaviour-cloning (NLL on chosen) term: sft/rpo_alpha, orpo, or cpo/simpo with cpo_alpha != 0."""
        types = {t for t, _ in self.terms}
        return bool({"sft", "orpo"} & types) or (bool({"cpo", "simpo"} & types) and self.cpo_alpha != 0)

    @property
    def prompt_nll(self) -> bool:
        """ORPO: the NLL covers the chosen prompt too (from its second token)."""
        return self.loss_type == ("orpo",)

    @property
    def length_normalised(self) -> bool:
        """simpo and orpo: rewards and logged log-probs are per completion token."""
        return bool(LENGTH_NORMALISED_LOSSES & set(self.loss_type))

    @property
    def needs_lengths(self) -> bool:
        return bool(_NEEDS_LENGTHS & set(self.loss_type))


def _f_scores(logratios: torch.Tensor, f_divergence_type: str, alpha: float) -> torch.Tensor:
    """f'(u) at u = π/π_ref, from log u (f-DPO, Wang et al. 2023, "Beyond Reverse KL...", Table 1), as TRL
    1.16: reverse KL log u; forward KL 1 − 1/u; Jensen-Shannon log 2 + log σ(log u); α-divergence
    (u^(α−1) − 1)/(α − 1), exponent clamped (80 in fp32/bf16, 11 in fp16) and reverse KL at α = 1."""
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-logratios)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if f_divergence_type == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        t = (alpha - 1.0) * logratios
        clamp_max = 11.0 if t.dtype == torch.float16 else 80.0     # exp stays finite once cast back
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) * (1.0 / (alpha - 1.0))
    return logratios


def _check_vector(name: str, value, shape: torch.Size) -> None:
    if not isinstance(value, torch.Tensor) or value.shape != shape:
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)}, got "
                         f"{tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__}")


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    loss_type: str | Sequence[str] = "sigmoid",
    loss_weights: Sequence[float] | None = None,
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    reference_free: bool = False,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    rpo_alpha: float | None = None,
    simpo_gamma: float = 0.5,
    cpo_alpha: float = 1.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | float | None = None,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-pair preference losses and implicit rewards, equal to TRL's.

    With scores ``s = f'(π/π_ref)`` in log space (``f_divergence_type``; ``s = π − π_ref`` for reverse KL),
    ``Δ = s_c − s_r``, ``ρ = π − π_ref`` and per-sequence summed log-probs ``π``, the loss of pair i is
    ``Σ_k w_k · loss_k(i)`` over ``loss_type`` (weights ``loss_weights``, default 1), times ``pair_weights[i]``
    when given, so that ``losses.mean()`` is TRL 1.16's ``Σ_k w_k · per_sequence_loss_k.mean()``. Each loss's
    formula and paper are in the docstring of its function here (``_sigmoid``, ``_ipo``, ...):

    - TRL 1.16 ``DPOTrainer._compute_loss``: sigmoid (DPO; with cDPO label smoothing, see below), hinge, ipo,
      exo_pair, nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired (these two sort over the batch, so
      their entry i is not pair i's), apo_zero, apo_down, discopop (``discopop_tau``), sft (the batch's mean
      NLL on the chosen completions, the same in every entry), sigmoid_norm (ipo and sigmoid_norm divide the
      scores by completion token counts).
    - ``rpo_alpha`` (RPO, TRL <= 0.28): adds ``rpo_alpha · NLL`` to every pair (TRL 0.28's formula
      ``losses + rpo_alpha * nll_loss``, with nll_loss the mean NLL over the batch's chosen completion tokens;
      TRL 1.16 dropped it for ``"sft"`` in loss_type with weight rpo_alpha, which is what this is).
    - Reference-free (TRL 1.16 ``trl.experimental``): ``cpo`` (CPOTrainer ``sigmoid``) and ``simpo``
      (CPOTrainer ``simpo``, ``simpo_gamma``), both ``+ cpo_alpha · NLL`` (``CPOTrainer.cpo_loss`` and
      ``get_batch_loss_metrics``); ``orpo`` (``ORPOTrainer.odds_ratio_loss``, λ = ``beta``). CPOTrainer's
      ``hinge``/``ipo`` are ``loss_type=[hinge|ipo, "sft"]``, ``loss_weights=[1, cpo_alpha]``,
      ``reference_free=True`` here (same loss; CPOTrainer's ipo rewards use mean log-probs).

    ``label_smoothing`` ε: the flip probability of robust, exo_pair's target, and cDPO smoothing of sigmoid,
    aot, aot_unpaired, cpo and simpo (TRL 1.16's DPO sigmoid ignores it; fastdpo keeps TRL <= 0.28's cDPO).

    Rewards (detached): ``β ρ`` (TRL 1.16, whatever the loss; ρ = π with ``reference_free``), for cpo
    ``β π``, for simpo and orpo ``β π/n`` (CPOTrainer/ORPOTrainer).

    Args:
        policy_chosen_logps, policy_rejected_logps: [B] float, summed log-probabilities (nats) of each
            completion under the policy (LD-DPO-weighted ones with ``ld_alpha``: see ``fastdpo.train.forward``).
        ref_chosen_logps, ref_rejected_logps: [B] float, the same under the reference; ignored (and may be
            None) with ``reference_free`` or a reference-free loss.
        loss_type: one of ``LOSS_TYPES`` or a list of them; cpo/simpo/orpo stand alone.
        loss_weights: one float per loss type (default 1.0 each).
        beta: β > 0 (IPO's τ; ORPO's λ).
        label_smoothing: ε in [0, 0.5] (robust: [0, 0.5); exo_pair: > 0).
        reference_free: take the reference log-probs as 0 (TRL <= 0.28's ``reference_free``).
        f_divergence_type, f_alpha_divergence_coef: f-DPO's divergence and α (TRL 1.16's names and defaults).
        discopop_tau: DiscoPOP's τ > 0. rpo_alpha: RPO's NLL weight, or None.
        simpo_gamma: SimPO's target margin γ. cpo_alpha: the NLL weight of cpo and simpo.
        chosen_lengths, rejected_lengths: [B] completion token counts (int or float); needed by ipo,
            sigmoid_norm, simpo, orpo and, for the default ``nll_tokens``, the NLL terms.
        chosen_nll: [B] summed NLL (nats) of each chosen sequence's NLL tokens, required by the NLL terms: the
            completion's for sft, rpo, cpo and simpo (``-policy_chosen_logps`` when those are plain sums; never
            averaged or LD-DPO-weighted log-probs), the prompt's (from its second token) and the completion's
            for orpo.
        nll_tokens: the token count the NLL mean divides ``chosen_nll.sum()`` by: default
            ``chosen_lengths.sum()``; required for orpo. Under gradient accumulation pass this micro-batch's
            share of the effective batch's count (see ``fastdpo.DPOTrainer``).
        pair_weights: [B] per-pair loss weights, used detached: WPO's ``w_c · w_r`` (Zhou et al. 2024,
            "WPO: Enhancing RLHF with Weighted Preference Optimization", Eq. 2; ``fastdpo.train.forward.wpo_weights``).

    Returns:
        (losses, chosen_rewards, rejected_rewards), each [B] in the policy log-probs' dtype (orpo: float32).

    Raises:
        ValueError: the configuration errors of ``LossSpec``; input vectors of another shape than
            ``policy_chosen_logps`` [B]; missing reference log-probs, lengths, ``chosen_nll`` or ``nll_tokens``
            where the loss needs them.
    """
    spec = LossSpec(loss_type=loss_type, loss_weights=loss_weights, beta=beta, label_smoothing=label_smoothing,
                    reference_free=reference_free, f_divergence_type=f_divergence_type,
                    f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, rpo_alpha=rpo_alpha,
                    simpo_gamma=simpo_gamma, cpo_alpha=cpo_alpha, use_weighting=pair_weights is not None)
    return preference_loss(spec, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps,
                           chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, chosen_nll=chosen_nll,
                           nll_tokens=nll_tokens, pair_weights=pair_weights)


def preference_loss(
    spec: LossSpec,
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    chosen_nll: torch.Tensor | None = None,
    nll_tokens: torch.Tensor | float | None = None,
    pair_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dpo_loss`` with its options as a prevalidated ``LossSpec`` (what the trainers call on every micro-batch).

    Raises:
        ValueError: as ``dpo_loss``, less the configuration errors (raised when the spec was made); also
            ``pair_weights`` given or missing against ``spec.use_weighting``.
    """
    types = set(spec.loss_type)
    if (pair_weights is not None) != spec.use_weighting:
        raise ValueError(f"use_weighting={spec.use_weighting} but pair_weights "
                         f"{'were' if pair_weights is not None else 'were not'} given")
    shape = policy_chosen_logps.shape
    if len(shape) != 1:
        raise ValueError(f"policy_chosen_logps must be a [B] vector, got shape {tuple(shape)}")
    dtype = policy_chosen_logps.dtype
    _check_vector("policy_rejected_logps", policy_rejected_logps, shape)
    if not spec.needs_reference:
        ref_chosen_logps = ref_rejected_logps = torch.zeros_like(policy_chosen_logps)
    for name, value in (("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)):
        _check_vector(name, value, shape)
    ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.to(dtype), ref_rejected_logps.to(dtype)

    if (spec.needs_lengths or (spec.uses_nll and nll_tokens is None)) and (
            chosen_lengths is None or rejected_lengths is None):
        raise ValueError(f"loss_type {sorted(types)} needs chosen_lengths and rejected_lengths (completion token "
                         f"counts)")
    if chosen_lengths is not None:
        _check_vector("chosen_lengths", chosen_lengths, shape)
        _check_vector("rejected_lengths", rejected_lengths, shape)
        chosen_lengths, rejected_lengths = chosen_lengths.to(dtype), rejected_lengths.to(dtype)
    nll = None
    if spec.uses_nll:
        if chosen_nll is None:
            raise ValueError(f"loss_type {sorted(t for t, _ in spec.terms)} has an NLL term and needs chosen_nll, the "
                             "summed NLL of each chosen completion: pass chosen_nll=-policy_chosen_logps when those "
                             "are summed (not averaged) log-probs")
        if "orpo" in types and nll_tokens is None:
            raise ValueError("orpo needs nll_tokens, the count of chosen prompt and completion tokens chosen_nll sums")
        _check_vector("chosen_nll", chosen_nll, shape)
        nll = chosen_nll.sum() / (chosen_lengths.sum() if nll_tokens is None else nll_tokens)

    chosen_logratios = policy_chosen_logps - ref_chosen_logps
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    f_div, f_alpha = spec.f_divergence_type, spec.f_alpha_divergence_coef
    pairs = _Pairs(
        beta=spec.beta, label_smoothing=spec.label_smoothing, discopop_tau=spec.discopop_tau,
        simpo_gamma=spec.simpo_gamma, cpo_alpha=spec.cpo_alpha, chosen=policy_chosen_logps,
        rejected=policy_rejected_logps, ref_chosen=ref_chosen_logps, ref_rejected=ref_rejected_logps,
        chosen_logratios=chosen_logratios, rejected_logratios=rejected_logratios,
        chosen_scores=_f_scores(chosen_logratios, f_div, f_alpha),
        rejected_scores=_f_scores(rejected_logratios, f_div, f_alpha),
        chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths, nll=nll,
    )
    losses = sum(_LOSSES[t](pairs) * w for t, w in spec.terms)
    if pair_weights is not None:
        _check_vector("pair_weights", pair_weights, shape)
        losses = losses * pair_weights.detach().to(losses.dtype)

    chosen_rewards = spec.beta * chosen_logratios.detach()
    rejected_rewards = spec.beta * rejected_logratios.detach()
    if spec.length_normalised:
        chosen_rewards = _per_token(chosen_rewards, chosen_lengths)
        rejected_rewards = _per_token(rejected_rewards, rejected_lengths)
    return losses, chosen_rewards, rejected_rewards


# ----------------------------------------------------------------------------------------------------------- KTO
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_kl(kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """KTO's reference point z₀ (Ethayarajh et al. 2024, "KTO: Model Alignment as Prospect Theoretic Optimization",
    Eq. 7; TRL 1.16 ``KTOTrainer._compute_loss``): the mean of ``log π(y'|x) − log π_ref(y'|x)`` over rows whose
    completion y' is another row's (mismatched), without gradient, clamped at 0.

    Args:
        kl_logps, ref_kl_logps: [R] float, summed log-probs of the mismatched completions under the policy and the
            reference.
        reduce: sums a [2] tensor (the differences' sum, the row count) over processes, so that every process gets
            the mean over all their rows; None on one process. TRL averages the processes' means instead: the same
            when every process holds as many rows, which its fixed per-device batches always do but the last.

    Returns:
        0-d float32, ≥ 0, no grad.
    """
    with torch.no_grad():
        totals = torch.stack([(kl_logps.float() - ref_kl_logps.float()).sum(),
                              torch.tensor(float(kl_logps.numel()), device=kl_logps.device)])
        if reduce is not None:
            totals = reduce(totals)
        return (totals[0] / totals[1]).clamp_min(0)


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, labels: torch.Tensor, kl: torch.Tensor | float = 0.0, *,
             loss_type: str = "kto", beta: float = 0.1, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row KTO losses and implicit rewards, equal to TRL 1.16 ``KTOTrainer._compute_loss``'s.

    With ``ρ = log π(y|x) − log π_ref(y|x)`` per row and the reference point ``z₀ = kl`` (``kto_kl``):

    - ``kto`` (KTO, Eq. 7): ``1 − σ(β(ρ − z₀))`` for a desirable completion, ``1 − σ(β(z₀ − ρ))`` for an
      undesirable one;
    - ``apo_zero_unpaired`` (D'Oosterlinck et al. 2024, "Anchored Preference Optimization", Eq. 7, unpaired):
      ``1 − σ(βρ)`` desirable, ``σ(βρ)`` undesirable; no reference point (``kl`` is ignored).

    Each is weighted by ``desirable_weight`` or ``undesirable_weight``, so that ``losses.mean()`` is TRL's loss.

    Args:
        logps, ref_logps: [R] float, summed log-probs (nats) of each row's completion under the policy and the
            reference (the latter used detached).
        labels: [R] bool, True where the completion is desirable.
        kl: z₀, a float or 0-d tensor (detached).

    Returns:
        (losses [R] in ``logps``' dtype, rewards [R] ``β ρ`` detached).

    Raises:
        ValueError: an unknown ``loss_type``; inputs of another shape than ``logps`` [R]; non-boolean labels.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {KTO_LOSS_TYPES}, got {loss_type!r}")
    if logps.dim() != 1:
        raise ValueError(f"logps must be a [R] vector, got shape {tuple(logps.shape)}")
    _check_vector("ref_logps", ref_logps, logps.shape)
    _check_vector("labels", labels, logps.shape)
    if labels.dtype != torch.bool:
        raise ValueError(f"labels must be a bool tensor (True: desirable), got {labels.dtype}")
    logratios = logps - ref_logps.detach().to(logps.dtype)
    if loss_type == "kto":
        kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
        desirable, undesirable = 1 - torch.sigmoid(beta * (logratios - kl)), 1 - torch.sigmoid(beta * (kl - logratios))
    else:
        desirable, undesirable = 1 - torch.sigmoid(beta * logratios), torch.sigmoid(beta * logratios)
    losses = torch.where(labels, desirable_weight * desirable, undesirable_weight * undesirable)
    return losses, beta * logratios.detach()
