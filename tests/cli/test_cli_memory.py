"""The memory estimate and plan of the train commands (fastdpo.cli.memory): the estimator against peak RSS measured
on SmolLM2-135M-Instruct + LoRA, the choices it makes where the user left them open, and what it prints."""

from pathlib import Path

import pytest

from fastdpo.cli.memory import (
    FIT_FRACTION,
    GIB,
    ModelShape,
    available_bytes,
    estimate_peak_bytes,
    plan_memory,
)

# SmolLM2-135M-Instruct in fp32 with LoRA r16 on every linear layer
SMOLLM2_LORA = ModelShape(layers=30, hidden=576, kv_hidden=192, intermediate=1536, weight_bytes=557_597_952,
                          trainable_params=4_884_480)
# Peak RSS of whole `fastdpo train` runs (HH pairs, max_length 512, one optimiser step, 2-core CPU), in GiB.
MEASURED = {(1024, False): 3.54, (3072, False): 8.36, (3072, True): 4.26}


@pytest.mark.parametrize(("tokens", "checkpointing"), sorted(MEASURED))
def test_estimate_matches_measured_peak_rss(tokens, checkpointing):
    estimate = estimate_peak_bytes(SMOLLM2_LORA, tokens, checkpointing=checkpointing) / GIB
    assert estimate == pytest.approx(MEASURED[tokens, checkpointing], rel=0.15)


def test_estimate_grows_with_tokens_and_shrinks_with_checkpointing():
    est = lambda t, c=False, **kw: estimate_peak_bytes(SMOLLM2_LORA, t, checkpointing=c, **kw)
    assert est(2048) > est(1024) > est(512)
    assert est(4096, True) < est(4096) / 2
    assert est(1024, extra_weight_bytes=GIB) == est(1024) + GIB
    full = ModelShape(**{**SMOLLM2_LORA.__dict__, "trainable_params": 139_431_744})
    assert estimate_peak_bytes(full, 1024, checkpointing=False) > est(1024) + GIB   # gradients and AdamW states


def fake_estimate(per_token, checkpointed_per_token=1):
    return lambda tokens, checkpointing: tokens * (checkpointed_per_token if checkpointing else per_token)


def test_plan_keeps_the_default_when_it_fits():
    plan = plan_memory(fake_estimate(10), 10_000 / FIT_FRACTION, tokens=None, checkpointing=None, default_tokens=1000,
                       min_tokens=100)
    assert (plan.tokens, plan.checkpointing, plan.fits) == (1000, False, True)


def test_plan_halves_the_budget_then_checkpoints():
    plan = plan_memory(fake_estimate(10), 3_000 / FIT_FRACTION, tokens=None, checkpointing=None, default_tokens=1000,
                       min_tokens=100)
    assert (plan.tokens, plan.checkpointing) == (250, False)
    # the longest pair (600 tokens) must fit a micro-batch: checkpointing at the full budget instead
    plan = plan_memory(fake_estimate(10), 3_000 / FIT_FRACTION, tokens=None, checkpointing=None, default_tokens=1000,
                       min_tokens=600)
    assert (plan.tokens, plan.checkpointing, plan.fits) == (1000, True, True)


def test_plan_keeps_what_the_user_set_and_says_when_it_does_not_fit():
    plan = plan_memory(fake_estimate(10), 3_000 / FIT_FRACTION, tokens=1000, checkpointing=False,
                       default_tokens=1000, min_tokens=100)
    assert (plan.tokens, plan.checkpointing, plan.fits, plan.estimate) == (1000, False, False, 10_000)
    plan = plan_memory(fake_estimate(10, 5), 100, tokens=None, checkpointing=None, default_tokens=1000, min_tokens=500)
    assert (plan.tokens, plan.checkpointing, plan.fits) == (500, True, False)   # the leanest candidate
    unknown = plan_memory(fake_estimate(10), None, tokens=None, checkpointing=None, default_tokens=1000, min_tokens=1)
    assert (unknown.tokens, unknown.checkpointing, unknown.fits) == (1000, False, True)


def test_available_memory_is_read():
    """Where Linux's /proc/meminfo is there to read, a number of bytes up to the machine's total (a stub answering
    None, or kB, fails); elsewhere None."""
    available = available_bytes("cpu")
    if not Path("/proc/meminfo").is_file():
        assert available is None
        return
    total_kb = int(next(line for line in Path("/proc/meminfo").read_text().splitlines()
                        if line.startswith("MemTotal:")).split()[1])
    assert isinstance(available, int) and 1 << 20 < available <= total_kb * 1024


def test_apply_prints_the_choice_and_warns_before_a_run_that_will_not_fit(tmp_path, monkeypatch, capsys):
    from _shared import config, tiny_llama
    from fastdpo.cli import memory

    args = config(tmp_path, max_length=64)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 64 << 30)
    args, plan = memory.apply_memory_plan(args, set(), tiny_llama(), memory.pair_shape(args))
    out = capsys.readouterr()
    assert (plan.tokens, plan.checkpointing, plan.fits) == (1024, False, True) and not out.err
    assert (args.max_tokens_per_batch, args.gradient_accumulation_steps, args.activation_checkpointing) == (1024, 4, False)
    assert "estimated peak" in out.out and "chose --max-tokens-per-batch 1024" in out.out

    args = config(tmp_path, max_length=64, max_tokens_per_batch=4096)
    monkeypatch.setattr(memory, "available_bytes", lambda device: 1 << 20)
    _, plan = memory.apply_memory_plan(args, {"max_tokens_per_batch"}, tiny_llama(), memory.pair_shape(args))
    err = capsys.readouterr().err
    assert not plan.fits and plan.tokens == 4096 and plan.checkpointing   # the user's budget, checkpointed
    assert "may be killed for memory" in err and err.rstrip().splitlines()[-1].startswith("What to do: lower")
