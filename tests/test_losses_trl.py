"""dpo_loss against TRL 1.16's own loss code: loss and gradients, fp32, on fresh random inputs.

TRL's real methods run on instances made with ``object.__new__`` and the attributes they read:
``DPOTrainer._compute_loss`` with a stub model whose forward returns a ``FusedCausalLMOutput`` of per-token
log-probs we control (and precomputed reference log-probs), and the experimental ``CPOTrainer`` /
``ORPOTrainer.get_batch_loss_metrics`` with a stub model returning logits we control. fastdpo gets the same
values reduced to per-sequence vectors (with ``fastdpo.modeling``'s LD-DPO and WPO helpers), and the
gradients are compared at the leaves both sides share: the per-token log-probs (or the logits) and the
reference log-probs.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("trl")
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer as TRLDPOTrainer  # noqa: E402
from trl.trainer.utils import FusedCausalLMOutput  # noqa: E402

from _reference import rel_err  # noqa: E402
from fastdpo import DPOConfig, dpo_loss  # noqa: E402
from fastdpo.losses import F_DIVERGENCE_LOSSES  # noqa: E402
from fastdpo.ops import sequence_logps  # noqa: E402
from fastdpo.train.forward import ld_pair_logps, wpo_weights  # noqa: E402

TRL_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")
TOL = 1e-6
TRL_WPO_FAILS = ("hinge", "sft")
ACCELERATOR = SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x)


def leaf(t):
    return t.detach().clone().requires_grad_(True)


# ------------------------------------------------------------------ DPOTrainer
class _FusedLM(torch.nn.Module):
    """Stands in for a model patched by TRL's add_fused_lm_head: its forward returns fixed outputs."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, **_kwargs):
        return self.outputs


def random_pairs(seed, b=6, t=14):
    """B pairs in TRL's padded layout ([chosen rows; rejected rows], prompt shared per pair, right padding),
    per-token log-probs and log Σp² (0 off the completions, as the fused head gives them, never 0 on them)
    and reference sums near the policy's; completion lengths from 1 to 7."""
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(1, 5, (b,), generator=g).repeat(2)
    completion = torch.randint(1, 8, (2 * b,), generator=g)
    positions = torch.arange(t)
    completion_mask = ((positions >= prompt[:, None]) & (positions < (prompt + completion)[:, None])).long()
    attention_mask = (positions < (prompt + completion)[:, None]).long()
    shift_mask = completion_mask[:, 1:].bool()
    # multiples of 2^-10: every sum is exact in fp32, so TRL's padded row sums and fastdpo's packed sums agree
    # bit for bit and the comparison isolates the loss math
    log_probs = -torch.randint(50, 3072, (2 * b, t - 1), generator=g) / 1024 * shift_mask
    log_sum_p2 = -torch.randint(10, 2048, (2 * b, t - 1), generator=g) / 1024 * shift_mask
    sums = log_probs.sum(1)
    ref = sums + torch.randn(2 * b, generator=g) * 1.5
    return SimpleNamespace(b=b, completion_mask=completion_mask, attention_mask=attention_mask, shift_mask=shift_mask,
                           log_probs=log_probs, log_sum_p2=log_sum_p2, ref_chosen=ref[:b], ref_rejected=ref[b:],
                           input_ids=torch.randint(3, 100, (2 * b, t), generator=g))


def trl_dpo(data, *, loss_type, loss_weights=None, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5, use_weighting=False, ld_alpha=None, discopop_tau=0.05):
    """TRL 1.16's DPOTrainer._compute_loss on ``data``: (loss, metrics, leaves {log_probs, ref_chosen,
    ref_rejected})."""
    leaves = {"log_probs": leaf(data.log_probs), "ref_chosen": leaf(data.ref_chosen),
              "ref_rejected": leaf(data.ref_rejected)}
    outputs = FusedCausalLMOutput(
        log_probs=leaves["log_probs"], entropy=torch.rand_like(data.log_probs), log_sum_sq_probs=data.log_sum_p2,
        mean_logits=torch.randn_like(data.log_probs), is_top1=torch.zeros_like(data.shift_mask))
    trainer = object.__new__(TRLDPOTrainer)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer.__dict__.update(
        model=_FusedLM(outputs).train(), accelerator=ACCELERATOR, aux_loss_enabled=False, precompute_ref_logps=True,
        beta=beta, loss_types=types, loss_weights=loss_weights or [1.0] * len(types), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing, use_weighting=use_weighting, args=SimpleNamespace(discopop_tau=discopop_tau),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
    )
    inputs = {"input_ids": data.input_ids, "attention_mask": data.attention_mask,
              "completion_mask": data.completion_mask, "ref_chosen_logps": leaves["ref_chosen"],
              "ref_rejected_logps": leaves["ref_rejected"]}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, trainer._metrics["train"], leaves


def packed(data, per_token):
    """A [2B, T-1] per-token tensor as fastdpo's packed [N] completion tokens (chosen_0, rejected_0, ...)
    and label_cu_seqlens."""
    order = torch.stack([torch.arange(data.b), torch.arange(data.b) + data.b], 1).reshape(-1)
    rows, cols = data.shift_mask[order].nonzero(as_tuple=True)
    lengths = data.shift_mask[order].sum(1)
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    return per_token[order][rows, cols], cu


def fastdpo_dpo(data, *, ld_alpha=None, use_weighting=False, **options):
    """dpo_loss on ``data`` reduced to per-sequence vectors: (mean loss, rewards, leaves as trl_dpo's)."""
    leaves = {"log_probs": leaf(data.log_probs), "ref_chosen": leaf(data.ref_chosen),
              "ref_rejected": leaf(data.ref_rejected)}
    token_logps, cu = packed(data, leaves["log_probs"])
    sums = sequence_logps(token_logps, cu)
    chosen, rejected = (sums[0::2], sums[1::2]) if ld_alpha is None else ld_pair_logps(token_logps, cu, ld_alpha)
    lengths = cu[1:] - cu[:-1]
    weights = wpo_weights(token_logps, packed(data, data.log_sum_p2)[0], cu) if use_weighting else None
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        chosen, rejected, leaves["ref_chosen"], leaves["ref_rejected"], chosen_lengths=lengths[0::2],
        rejected_lengths=lengths[1::2], chosen_nll=-sums[0::2], pair_weights=weights, **options)
    return losses.mean(), (chosen_rewards, rejected_rewards), leaves


def assert_dpo_parity(seed=0, **options):
    data = random_pairs(seed)
    trl_loss, metrics, trl_leaves = trl_dpo(data, **options)
    loss, (chosen_rewards, rejected_rewards), leaves = fastdpo_dpo(data, **options)
    assert rel_err(loss, trl_loss) <= TOL, (loss.item(), trl_loss.item())
    trl_loss.backward()
    loss.backward()
    mask = data.shift_mask      # TRL's per-token gradient off the completions multiplies zeros
    assert rel_err(leaves["log_probs"].grad[mask], trl_leaves["log_probs"].grad[mask]) <= TOL
    assert leaves["log_probs"].grad.abs().sum() > 0
    for name in ("ref_chosen", "ref_rejected"):    # None on both sides where the loss ignores the reference (sft)
        assert (leaves[name].grad is None) == (trl_leaves[name].grad is None), name
        assert leaves[name].grad is None or rel_err(leaves[name].grad, trl_leaves[name].grad) <= TOL, name
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][0], rel=TOL, abs=1e-7)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][0], rel=TOL, abs=1e-7)


@pytest.mark.parametrize("loss_type", TRL_DPO_LOSSES)
@pytest.mark.parametrize("use_weighting", [False, True])
def test_each_dpo_loss_matches_trl(loss_type, use_weighting):
    if use_weighting and loss_type.startswith("aot"):
        pytest.skip("TRL rejects WPO weighting with aot (tested in test_rejected_combinations)")
    if use_weighting and loss_type in TRL_WPO_FAILS:
        pytest.skip("TRL 1.16 fails here (tested in test_wpo_where_trl_fails)")
    label_smoothing = {"exo_pair": 1e-3, "robust": 0.1}.get(loss_type, 0.0)
    assert_dpo_parity(seed=TRL_DPO_LOSSES.index(loss_type), loss_type=loss_type, label_smoothing=label_smoothing,
                      use_weighting=use_weighting)


@pytest.mark.parametrize("f_divergence_type,coef", [("forward_kl", 0.5), ("js_divergence", 0.5),
                                                    ("alpha_divergence", 0.5), ("alpha_divergence", 1.0),
                                                    ("alpha_divergence", 1.7)])
@pytest.mark.parametrize("loss_type", sorted(F_DIVERGENCE_LOSSES))
def test_f_divergences_match_trl(loss_type, f_divergence_type, coef):
    label_smoothing = {"exo_pair": 0.05, "robust": 0.2}.get(loss_type, 0.0)
    assert_dpo_parity(seed=3, loss_type=loss_type, f_divergence_type=f_divergence_type, f_alpha_divergence_coef=coef,
                      label_smoothing=label_smoothing)


@pytest.mark.parametrize("loss_type,label_smoothing", [("robust", 0.0), ("robust", 0.3), ("exo_pair", 0.2),
                                                       ("exo_pair", 0.5), ("aot", 0.1), ("aot_unpaired", 0.25)])
def test_label_smoothing_matches_trl(loss_type, label_smoothing):
    assert_dpo_parity(seed=4, loss_type=loss_type, label_smoothing=label_smoothing)


@pytest.mark.parametrize("ld_alpha", [0.0, 0.4, 1.0])
@pytest.mark.parametrize("loss_type", [["sigmoid"], ["ipo"], ["sigmoid", "sft"], ["sigmoid_norm", "bco_pair"]])
def test_ld_alpha_matches_trl(loss_type, ld_alpha):
    assert_dpo_parity(seed=5, loss_type=loss_type, ld_alpha=ld_alpha)


@pytest.mark.parametrize("options", [
    dict(loss_type=["sigmoid", "bco_pair", "sft"], loss_weights=[0.8, 0.2, 1.0]),           # MPO
    dict(loss_type=["ipo", "sft"], loss_weights=[1.0, 0.3]),
    dict(loss_type=["ipo", "bco_pair"], loss_weights=[1.0, 0.3], use_weighting=True),
    dict(loss_type=["hinge", "apo_zero", "sigmoid_norm", "nca_pair"], loss_weights=[0.5, 1.5, -0.2, 1.0]),
    dict(loss_type=["robust", "exo_pair", "discopop"], label_smoothing=0.15, discopop_tau=0.3, beta=0.4),
    dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5], f_divergence_type="js_divergence", ld_alpha=0.3),
    dict(loss_type=["sigmoid", "sigmoid_norm"], loss_weights=[1.0, 0.5], f_divergence_type="alpha_divergence",
         f_alpha_divergence_coef=0.3, ld_alpha=0.3, use_weighting=True),
    dict(loss_type=["aot", "aot_unpaired", "sppo_hard", "apo_down"], loss_weights=[1.0, 2.0, 0.1, 1.0], beta=0.7),
])
def test_loss_lists_match_trl(options):
    assert_dpo_parity(seed=6, **options)


def test_rpo_alpha_is_trl_sft_term():
    """TRL 0.28 deprecated rpo_alpha for "sft" in loss_type with weight rpo_alpha, which TRL 1.16 computes."""
    data = random_pairs(7)
    trl_loss, _, _ = trl_dpo(data, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.7], ld_alpha=0.5)
    loss, _, _ = fastdpo_dpo(data, loss_type="sigmoid", rpo_alpha=0.7, ld_alpha=0.5)
    assert rel_err(loss, trl_loss) <= TOL


@pytest.mark.parametrize("loss_type", TRL_WPO_FAILS)
def test_wpo_where_trl_fails(loss_type):
    """TRL 1.16 applies WPO in place, ``per_sequence_loss *= chosen_weights * rejected_weights``: for hinge the
    backward then fails (relu saved its output), for sft the forward (its loss is an expanded scalar). fastdpo
    computes what that line means, each pair's loss times its weight (TRL <= 0.28's rpo_alpha with WPO too)."""
    data = random_pairs(12)
    with pytest.raises(RuntimeError):
        trl_dpo(data, loss_type=loss_type, use_weighting=True)[0].backward()
    token_logps, cu = packed(data, data.log_probs)
    sums, lengths = sequence_logps(token_logps, cu), cu[1:] - cu[:-1]
    weights = wpo_weights(token_logps, packed(data, data.log_sum_p2)[0], cu)
    args = (sums[0::2], sums[1::2], data.ref_chosen, data.ref_rejected)
    kwargs = dict(loss_type=loss_type, chosen_lengths=lengths[0::2], rejected_lengths=lengths[1::2], chosen_nll=-sums[0::2])
    weighted = dpo_loss(*args, pair_weights=weights, **kwargs)[0]
    assert weights.min() > 0 and not torch.allclose(weights, torch.ones_like(weights))
    assert torch.equal(weighted, dpo_loss(*args, **kwargs)[0] * weights)


# ---------------------------------------------------------- CPOTrainer, ORPOTrainer
def random_sequences(seed, b=5, t=12, v=13):
    """TRL's tokenised pair batch (labels -100 on prompt and padding) and [2B, T, V] logits."""
    g = torch.Generator().manual_seed(seed)
    batch = {}
    prompt = torch.randint(1, 5, (b,), generator=g)
    positions = torch.arange(t)
    for side in ("chosen", "rejected"):
        end = prompt + torch.randint(1, t - 4, (b,), generator=g)
        ids = torch.randint(1, v, (b, t), generator=g)
        attention = (positions < end[:, None]).long()
        batch[f"{side}_input_ids"] = ids * attention
        batch[f"{side}_attention_mask"] = attention
        batch[f"{side}_labels"] = ids.masked_fill((positions < prompt[:, None]) | (attention == 0), -100)
    return batch, torch.randn(2 * b, t, v, generator=g) * 2


def sequence_stats(batch, logits):
    """Per-row sums of label log-probs over the completions and over the whole sequences after their first
    token, and the token counts: what fastdpo's packed path computes, here from padded logits."""
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    labels = torch.cat([batch["chosen_labels"], batch["rejected_labels"]])[:, 1:]
    attention = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])[:, 1:].bool()
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    completion = labels != -100
    return ((logps * completion).sum(1), completion.sum(1), (logps * attention).sum(1), attention.sum(1))


def trl_reference_free(trainer_cls, batch, logits, **attributes):
    trainer = object.__new__(trainer_cls)
    trainer.__dict__.update(accelerator=ACCELERATOR, is_encoder_decoder=False, aux_loss_enabled=False,
                            pad_token_id=0, padding_value=0, alpha=0.0, **attributes)
    model = lambda *args, **kwargs: SimpleNamespace(logits=logits)                   # noqa: E731
    return trainer.get_batch_loss_metrics(model, batch, train_eval="train")


def fastdpo_reference_free(batch, logits, *, prompt_nll=False, **options):
    sums, lengths, full_sums, full_lengths = sequence_stats(batch, logits)
    b = lengths.numel() // 2
    nll_sums, nll_lengths = (full_sums, full_lengths) if prompt_nll else (sums, lengths)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        sums[:b], sums[b:], None, None, chosen_lengths=lengths[:b], rejected_lengths=lengths[b:],
        chosen_nll=-nll_sums[:b], nll_tokens=nll_lengths[:b].sum(), **options)
    return losses.mean(), chosen_rewards, rejected_rewards


def assert_logits_parity(trl_out, fastdpo_out, trl_logits, logits, *, rewards=True):
    (trl_loss, metrics), (loss, chosen_rewards, rejected_rewards) = trl_out, fastdpo_out
    assert rel_err(loss, trl_loss) <= TOL, (loss.item(), trl_loss.item())
    trl_loss.backward()
    loss.backward()
    assert rel_err(logits.grad, trl_logits.grad) <= TOL
    if rewards:
        assert chosen_rewards.mean().item() == pytest.approx(float(metrics["rewards/chosen"]), rel=TOL)
        assert rejected_rewards.mean().item() == pytest.approx(float(metrics["rewards/rejected"]), rel=TOL)


CPO_CASES = [("sigmoid", "cpo"), ("simpo", "simpo"), ("hinge", ["hinge", "sft"]), ("ipo", ["ipo", "sft"])]


@pytest.mark.parametrize("trl_loss_type,loss_type", CPO_CASES)
@pytest.mark.parametrize("cpo_alpha,label_smoothing,gamma", [(1.0, 0.0, 0.5), (0.0, 0.2, 1.3), (0.4, 0.1, 0.0)])
def test_cpo_and_simpo_match_trl(trl_loss_type, loss_type, cpo_alpha, label_smoothing, gamma):
    """CPOTrainer's sigmoid and simpo are fastdpo's cpo and simpo; its hinge and ipo are [hinge|ipo, sft] with
    weights [1, cpo_alpha], reference-free (TRL ignores label_smoothing for those two, as fastdpo does)."""
    batch, values = random_sequences(8)
    trl_logits, logits = leaf(values), leaf(values)
    beta = 0.3
    trl_out = trl_reference_free(CPOTrainer, batch, trl_logits, loss_type=trl_loss_type, beta=beta,
                                 label_smoothing=label_smoothing, cpo_alpha=cpo_alpha, simpo_gamma=gamma)
    options = dict(beta=beta, label_smoothing=label_smoothing)
    if isinstance(loss_type, list):
        options.update(loss_type=loss_type if cpo_alpha else loss_type[:1], loss_weights=[1.0, cpo_alpha][
            :2 if cpo_alpha else 1], reference_free=True)
    else:
        options.update(loss_type=loss_type, cpo_alpha=cpo_alpha, simpo_gamma=gamma)
    assert_logits_parity(trl_out, fastdpo_reference_free(batch, logits, **options), trl_logits, logits,
                         rewards=trl_loss_type != "ipo")       # CPOTrainer's ipo rewards use mean log-probs


@pytest.mark.parametrize("label_smoothing", [0.1, 0.5])
def test_cdpo_sigmoid_matches_trl_cpo_sigmoid(label_smoothing):
    """fastdpo's sigmoid with label smoothing is TRL's cDPO formula (CPOTrainer's sigmoid without its NLL term,
    reference-free); TRL 1.16's DPOTrainer sigmoid ignores label_smoothing."""
    batch, values = random_sequences(9)
    trl_logits, logits = leaf(values), leaf(values)
    trl_out = trl_reference_free(CPOTrainer, batch, trl_logits, loss_type="sigmoid", beta=0.2,
                                 label_smoothing=label_smoothing, cpo_alpha=0.0)
    ours = fastdpo_reference_free(batch, logits, loss_type="sigmoid", reference_free=True, beta=0.2,
                                  label_smoothing=label_smoothing)
    assert_logits_parity(trl_out, ours, trl_logits, logits)


@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_orpo_matches_trl(beta):
    batch, values = random_sequences(10)
    trl_logits, logits = leaf(values), leaf(values)
    trl_loss, metrics = trl_reference_free(ORPOTrainer, batch, trl_logits, beta=beta)
    ours = fastdpo_reference_free(batch, logits, prompt_nll=True, loss_type="orpo", beta=beta)
    assert_logits_parity((trl_loss, metrics), ours, trl_logits, logits)


# ------------------------------------------------------------------ rejections
REJECTED = [
    (dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0]), "one weight per loss type"),
    (dict(loss_type="robust", label_smoothing=0.5), r"robust loss needs label_smoothing in \[0, 0.5\)"),
    (dict(loss_type="exo_pair"), "exo_pair loss needs label_smoothing > 0"),
    (dict(loss_type="nca_pair", f_divergence_type="js_divergence"), "only supported for the loss types"),
    (dict(loss_type=["sigmoid", "apo_zero"], f_divergence_type="forward_kl"), "only supported for the loss types"),
    (dict(loss_type="sigmoid", f_divergence_type="chi2"), "unknown f_divergence_type"),
    (dict(loss_type="aot", use_weighting=True), "not supported with aot or aot_unpaired"),
    (dict(loss_type="aot_unpaired", use_weighting=True), "not supported with aot or aot_unpaired"),
    (dict(loss_type="discopop", discopop_tau=0.0), "discopop_tau must be positive"),
    (dict(loss_type="sigmoid", ld_alpha=1.5), r"ld_alpha must be in \[0, 1\]"),
    (dict(loss_type=["simpo", "sft"]), "cannot be combined with another loss type"),
    (dict(loss_type="orpo", rpo_alpha=1.0), "cannot be combined with rpo_alpha"),
    (dict(loss_type="cpo", use_weighting=True), "cannot be combined with use_weighting"),
    (dict(loss_type="simpo", ld_alpha=0.5), "cannot be combined with ld_alpha"),
    (dict(loss_type="kto_pair"), "unknown loss_type"),
]


@pytest.mark.parametrize("options,match", REJECTED)
def test_rejected_combinations(tmp_path, options, match):
    """What TRL 1.16 rejects (DPOConfig.__post_init__, DPOTrainer.__init__; robust only warns there, aot with
    WPO raises NotImplementedError), and fastdpo's own rules, raise ValueError from DPOConfig and dpo_loss."""
    with pytest.raises(ValueError, match=match):
        DPOConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, **options)
    if "ld_alpha" not in options:       # LD-DPO acts before the sums: dpo_loss never sees ld_alpha
        with pytest.raises(ValueError, match=match):
            fastdpo_dpo(random_pairs(11), **options)


def test_ld_alpha_range():
    with pytest.raises(ValueError, match=r"ld_alpha must be in \[0, 1\]"):
        ld_pair_logps(torch.tensor([-1.0, -2.0]), torch.tensor([0, 1, 2]), -0.1)


def test_trl_config_rejects_mismatched_loss_weights(tmp_path):
    from trl import DPOConfig as TRLDPOConfig

    with pytest.raises(ValueError, match="same length as `loss_type`"):
        TRLDPOConfig(output_dir=str(tmp_path), loss_type=["sigmoid", "ipo"], loss_weights=[1.0])
