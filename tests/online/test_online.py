"""Online DPO: prompts -> sampled completions -> ranking (reward model or judge) -> packed DPO loss; the judge's
parse, missing_eos_penalty, β per epoch, the loss against hand-computed float64 log-probs, and `fastdpo
train-online` end to end. Tiny random Llamas with SmolLM2's tokenizer; the real SmolLM2 as the judge."""

import json
import math
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch

from _reference import rel_err
from _shared import SMOLLM2_GGUF, smollm2_tokenizer, tiny_llama, tiny_llama_config
from fastdpo import OnlineDPOConfig, OnlineDPOTrainer, cli, dpo_loss
from fastdpo.data import tokenize_prompts
from fastdpo.online.judges import PairwiseJudge, RewardModelScorer, parse_verdict, rank_by_scores, render_prompt

CWD = Path(__file__).resolve().parents[2]   # the repository root, where a user runs the commands
ONLINE_METRICS = ("objective/kl", "objective/entropy", "objective/non_score_reward", "rewards/chosen",
                  "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen", "logps/rejected",
                  "val/contain_eos_token", "beta")
SCORE_METRICS = ("objective/rlhf_reward", "objective/scores", "objective/scores_margin")
needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")


def prompts(n):
    return datasets.Dataset.from_list([{"prompt": f"Question {i}: what is {i} plus {i}?"} for i in range(n)])


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                learning_rate=1e-3, seed=0, disable_tqdm=True, per_device_train_batch_size=2, max_new_tokens=4)
    base.update(kw)
    return OnlineDPOConfig(**base)


def reward_model(seed=3):
    from transformers import LlamaForSequenceClassification

    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(num_labels=1, hidden_size=32, intermediate_size=64)).eval()


@pytest.fixture(scope="module")
def reward_dir(tmp_path_factory):
    """A tiny random AutoModelForSequenceClassification (one label) and SmolLM2's tokenizer, saved."""
    path = tmp_path_factory.mktemp("reward")
    reward_model().save_pretrained(path)
    smollm2_tokenizer().save_pretrained(path)
    return path


class FixedJudge:
    """A PairwiseJudge with preset verdicts."""

    def __init__(self, verdicts):
        self.verdicts = verdicts

    def judge(self, prompts, completion_pairs):
        return list(self.verdicts[:len(prompts)])


def logged(trainer):
    return [h for h in trainer.state.log_history if "loss" in h]


def test_parse_verdict():
    for answer, want in [("0", 0), ("1", 1), (" 1\n", 1), ("Response 0", 0), ("The best model is:\n\n#1\n", 1),
                         ('"model_identifier": "0"', 0), ("**1**", 1), ("Model 1.", 1), ("1, because", 1),
                         ("", -1), ("2", -1), ("10", -1), ("0.7", -1), ("In 2021 I", -1), ("The answer to this", -1),
                         ("```python\ndef", -1)]:
        assert parse_verdict(answer) == want, answer
    assert render_prompt([{"role": "user", "content": "Hi"}]) == "User: Hi\n\n"
    assert isinstance(FixedJudge([0]), PairwiseJudge)


def test_tokenize_prompts():
    tok = smollm2_tokenizer()
    standard = tokenize_prompts(prompts(3), tok, max_prompt_length=4)
    assert standard.column_names == ["prompt", "prompt_input_ids"]
    assert standard[0]["prompt_input_ids"] == tok("Question 0: what is 0 plus 0?", add_special_tokens=False)[
        "input_ids"][-4:]
    chat = datasets.Dataset.from_list([{"prompt": [{"role": "user", "content": "Hello?"}], "other": 1}])
    ids = tokenize_prompts(chat, tok, max_prompt_length=None)[0]["prompt_input_ids"]
    assert tok.decode(ids).endswith("<|im_start|>assistant\n") and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    with pytest.raises(ValueError, match=r"lacks column 'prompt'; columns present: \['question'\]"):
        tokenize_prompts(datasets.Dataset.from_list([{"question": "x"}]), tok)
    with pytest.raises(ValueError, match="row 1: the prompt is empty"):
        tokenize_prompts(datasets.Dataset.from_list([{"prompt": "a"}, {"prompt": ""}]), tok)
    with pytest.raises(ValueError, match=r"row 0: prompt\[0\] must be a dict"):
        tokenize_prompts(datasets.Dataset.from_list([{"prompt": [{"role": "user"}]}]), tok)


def test_config_and_trainer_errors(tmp_path):
    for bad, match in [(dict(precompute_ref_log_probs=True), "precompute_ref_log_probs is impossible online"),
                       (dict(reference_free=True), "needs a reference model"),
                       (dict(loss_type="simpo"), "needs a reference model"),
                       (dict(ld_alpha=0.5), "ld_alpha is not supported online"),
                       (dict(beta=[]), "beta must be"), (dict(beta=[0.1, -1.0]), "beta must be"),
                       (dict(reward_model_path="r", judge="j"), "not both"),
                       (dict(temperature=0.0), "temperature must be positive"),
                       (dict(max_length=4), "leaves no room for a prompt")]:
        with pytest.raises(ValueError, match=match):
            config(tmp_path, **bad)
    assert config(tmp_path, beta=0.3).beta == [0.3]
    assert config(tmp_path, max_length=20, max_prompt_length=50, max_new_tokens=8).prompt_limit == 12
    tok = smollm2_tokenizer()
    with pytest.raises(ValueError, match="either a reward model or a judge"):
        OnlineDPOTrainer(tiny_llama(), args=config(tmp_path), train_dataset=prompts(2), processing_class=tok)
    with pytest.raises(ValueError, match="either a reward model or a judge"):
        OnlineDPOTrainer(tiny_llama(), args=config(tmp_path), train_dataset=prompts(2), processing_class=tok,
                         reward_model=reward_model(), judge=FixedJudge([0]))
    with pytest.raises(ValueError, match="evaluation is not implemented"):
        OnlineDPOTrainer(tiny_llama(), args=config(tmp_path), train_dataset=prompts(2), eval_dataset=prompts(2),
                         processing_class=tok, judge=FixedJudge([0]))


def test_reward_model_ranking_and_missing_eos_penalty(reward_dir):
    """Scores from a reward model loaded from disk; the penalty on the winner without EOS flips the ranking."""
    from transformers import AutoModelForSequenceClassification

    tok = smollm2_tokenizer()
    scorer = RewardModelScorer(AutoModelForSequenceClassification.from_pretrained(reward_dir), tok)
    texts = [" It is 4.<|im_end|>", " It is five, I think"]
    scores = scorer.score(["What is 2 plus 2?"] * 2, texts)
    want = scorer.model(**tok(["What is 2 plus 2?" + t for t in texts[:1]], return_tensors="pt",
                              add_special_tokens=False)).logits[0, 0]
    assert scores.shape == (2,) and scores.dtype == torch.float32 and rel_err(scores[0], want) <= 1e-5
    winner = int(scores[1] > scores[0])        # scores of the first samples [:1], the second samples [1:]
    contain_eos = torch.tensor([winner == 1, winner == 0])     # only the loser ended with EOS
    margin = float((scores[winner] - scores[1 - winner]).abs())
    _, first_wins = rank_by_scores(scores, contain_eos, None)
    assert bool(first_wins[0]) == (winner == 0)
    penalised, first_wins = rank_by_scores(scores, contain_eos, margin + 1.0)
    assert bool(first_wins[0]) == (winner == 1)
    assert penalised[winner] == pytest.approx(float(scores[winner]) - margin - 1.0)
    assert penalised[1 - winner] == scores[1 - winner]
    chat = scorer.score([[{"role": "user", "content": "Hi"}]], ["Hello!"])
    assert chat.shape == (1,) and torch.isfinite(chat).all()


def test_steps_with_reward_model_and_beta_per_epoch(tmp_path, reward_dir):
    """Three epochs of one step (two prompts) with β = [0.5, 0.25]: β 0.5, 0.25, 0.25; TRL's metrics, finite."""
    trainer = OnlineDPOTrainer(tiny_llama(seed=1), args=config(tmp_path, beta=[0.5, 0.25], num_train_epochs=3,
                                                               reward_model_path=str(reward_dir)),
                               train_dataset=prompts(2), processing_class=smollm2_tokenizer())
    assert trainer.ref_model is not None      # the frozen copy of the policy
    trainer.train()
    logs = logged(trainer)
    assert [h["beta"] for h in logs] == pytest.approx([0.5, 0.25, 0.25])
    for h in logs:
        assert all(math.isfinite(h[k]) for k in ONLINE_METRICS + SCORE_METRICS + ("loss",)), h
        assert "judge/unparseable" not in h and 0.0 <= h["val/contain_eos_token"] <= 1.0
        assert h["objective/scores_margin"] >= 0 and h["objective/entropy"] > 0
        assert h["objective/non_score_reward"] == pytest.approx(-h["beta"] * h["objective/kl"], rel=1e-5, abs=1e-7)
    assert logs[0]["objective/kl"] == 0.0 and logs[-1]["objective/kl"] != 0.0   # the policy left the reference


def test_loss_on_fixed_pairs_equals_dpo_loss_on_float64_logps(tmp_path):
    """Fixed completions ranked by a judge (second wins, first wins, no verdict): the packed loss equals dpo_loss on
    log-probs from float64 full logits; the unranked pair is left out and counted; objective/kl matches."""
    tok = smollm2_tokenizer()
    policy, ref = tiny_llama(seed=4), tiny_llama(seed=5)
    trainer = OnlineDPOTrainer(policy, ref, args=config(tmp_path, beta=[0.3], per_device_train_batch_size=3),
                               train_dataset=prompts(3), processing_class=tok, judge=FixedJudge([1, 0, -1]))
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, 49152, (n,), generator=g).tolist() + [2] for n in (3, 5, 2, 4, 1, 6)]
    trainer.sample_completions = lambda prompt_ids: (completions, torch.ones(6, dtype=torch.bool))
    rows = [trainer.train_dataset[i] for i in range(3)]
    batch = trainer.generate_pairs({"prompt": [r["prompt"] for r in rows],
                                    "prompt_input_ids": [r["prompt_input_ids"] for r in rows]})
    assert batch.targets.tolist() == completions[3] + completions[0] + completions[1] + completions[4]
    policy.train()
    loss = trainer.compute_loss(policy, batch, num_items_in_batch=2)

    def logps(model, prompt, completion):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model.double()(ids).logits[0, len(prompt) - 1:-1].log_softmax(-1)
        return logits.gather(1, torch.tensor(completion)[:, None]).sum()

    pairs = [(rows[0]["prompt_input_ids"], completions[3], completions[0]),
             (rows[1]["prompt_input_ids"], completions[1], completions[4])]
    got = {name: torch.stack([logps(m, p, c) for p, c, _ in pairs] + [logps(m, p, r) for p, _, r in pairs])
           for name, m in (("policy", policy.eval()), ("ref", ref))}
    losses, _, _ = dpo_loss(got["policy"][:2], got["policy"][2:], got["ref"][:2], got["ref"][2:], beta=0.3)
    assert rel_err(loss.detach().double(), losses.mean()) <= 1e-5
    sums = trainer.metrics._sums["train"]
    assert sums["judge/unparseable"] == [1.0, 3.0] and sums["val/contain_eos_token"] == [6.0, 6.0]
    kl = (got["policy"] - got["ref"]).mean()    # a difference of fp32 sums: its error is relative to theirs
    assert abs(sums["objective/kl"][0] / sums["objective/kl"][1] - kl) <= 1e-5 * got["policy"].abs().mean()


def test_no_verdict_at_all_trains_nothing_and_says_so(tmp_path, caplog):
    """A judge that never answers: the step runs, the weights stay, all prompts are counted; the log warns with the
    count and what to do, TRL's metric names are logged as NaN (the Trainer's loss too, not 0), and the tally that
    makes `fastdpo train-online` exit non-zero records no trained step."""
    policy = tiny_llama(seed=6)
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    trainer = OnlineDPOTrainer(policy, args=config(tmp_path, max_steps=1), train_dataset=prompts(2),
                               processing_class=smollm2_tokenizer(), judge=FixedJudge([-1, -1]))
    trainer.train()
    (h,) = logged(trainer)
    assert h["judge/unparseable"] == 1.0 and math.isnan(h["loss"])
    assert all(math.isnan(h[k]) for k in ONLINE_METRICS if k not in ("val/contain_eos_token", "beta"))
    assert all(torch.equal(p, before[n]) for n, p in policy.named_parameters())
    assert (trainer.tally.steps, trainer.tally.trained) == (1, 0)
    assert "step 1 trained on nothing: the judge gave no verdict for any of the 2 prompt(s)" in caplog.text
    assert "What to do: judge with an instruct model" in trainer.tally.untrained_reason


def test_cli_run_that_trains_nothing_exits_non_zero(tmp_path):
    """`fastdpo train-online` with a tiny random model as its own judge (no verdicts, as SmolLM2-135M judging
    itself in the issue): it warns every step and exits 2 saying why and what to do, saving no adapter."""
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=21).save_pretrained(model_dir)
    smollm2_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?"}) + "\n" for i in range(4)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastdpo", "train-online", "--model", str(model_dir), "--dataset", str(data),
           "--judge", str(model_dir), "--judge-max-new-tokens", "2", "--use-peft", "--per-device-train-batch-size",
           "2", "--max-new-tokens", "4", "--max-steps", "2", "--logging-steps", "1", "--output-dir", str(out),
           "--report-to", "none", "--save-strategy", "no", "--disable-tqdm", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("trained on nothing: the judge gave no verdict for any of the 2 prompt(s)") == 2
    assert "error: none of this run's 2 optimiser step(s) trained on anything, so the model was not saved" in proc.stderr
    assert "What to do: judge with an instruct model" in proc.stderr
    assert not (out / "adapter_model.safetensors").exists()


@needs_smollm2
def test_step_with_smollm2_judge(tmp_path, smollm2_cache, monkeypatch):
    """The real SmolLM2-135M-Instruct judges a tiny policy's samples (PEFT reference); every prompt is ranked or
    counted as unparseable, and the metrics are finite where a pair was ranked."""
    from peft import LoraConfig

    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    trainer = OnlineDPOTrainer(tiny_llama(seed=7), args=config(tmp_path, max_steps=1, judge=str(SMOLLM2_GGUF),
                                                               judge_max_new_tokens=8),
                               train_dataset=prompts(2), processing_class=smollm2_tokenizer(),
                               peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert trainer.ref_model is None          # the policy with its adapter disabled
    trainer.train()
    (h,) = logged(trainer)
    assert len(trainer.judge.last_answers) == 2
    unparseable = sum(parse_verdict(a) < 0 for a in trainer.judge.last_answers)
    assert h["judge/unparseable"] == unparseable / 2 and all(k in h for k in ONLINE_METRICS)
    # NaN where no pair was ranked, as TRL logs the mean of nothing
    assert all(math.isfinite(v) for k, v in h.items() if isinstance(v, float)) == (unparseable < 2)


def test_cli_errors(tmp_path, capsys):
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "Hi"}\n')
    base = ["train-online", "--dataset", str(data), "--output-dir", str(tmp_path / "o"), "--model", str(tmp_path)]
    assert cli.main([*base, "--judge", "j", "--reward-model", "r"]) == 2
    assert "give reward_model_path or judge, not both" in capsys.readouterr().err
    assert cli.main([*base, "--judge", "j", "--precompute-ref-log-probs"]) == 2
    assert "fastdpo train-online: error: precompute_ref_log_probs is impossible online" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.parse_command(["--dataset", str(data), "--judge", "j", "--eval-fraction", "0.5"], "train-online")
    assert "evaluation is not implemented for train-online" in capsys.readouterr().err


def test_cli_train_online_end_to_end(tmp_path, reward_dir):
    """`fastdpo train-online` on conversational prompts: a tiny policy with LoRA, the tiny reward model from disk,
    β per epoch and the EOS penalty; the metrics reach trainer_state.json and the adapter is saved."""
    model_dir = tmp_path / "tiny"
    tiny_llama(seed=21).save_pretrained(model_dir)
    smollm2_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"What is {i} plus {i}?"}]}) + "\n"
                            for i in range(4)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "fastdpo", "train-online", "--model", str(model_dir), "--dataset", str(data),
           "--reward-model", str(reward_dir), "--use-peft", "--per-device-train-batch-size", "2", "--max-new-tokens",
           "4", "--num-train-epochs", "2", "--beta", "0.2", "0.1", "--missing-eos-penalty", "1.0", "--logging-steps",
           "1", "--learning-rate", "1e-3", "--output-dir", str(out), "--report-to", "none", "--save-strategy", "no",
           "--disable-tqdm", "true"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=CWD)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logs = [h for h in json.loads((out / "trainer_state.json").read_text())["log_history"] if "loss" in h]
    assert [h["beta"] for h in logs] == pytest.approx([0.2, 0.2, 0.1, 0.1])
    assert all(math.isfinite(h[k]) for h in logs for k in ONLINE_METRICS + SCORE_METRICS)
    assert (out / "adapter_model.safetensors").is_file()
