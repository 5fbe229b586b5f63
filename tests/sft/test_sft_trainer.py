"""fastdpo's SFTTrainer against TRL 1.16's on the same rows, packing, the effective-batch mean and assistant masks."""

import copy

import datasets
import pytest
import torch

from _reference import rel_err
from _shared import smollm2_tokenizer, tiny_llama
from fastdpo import SFTConfig, SFTTrainer
from fastdpo.data.sft import BestFitBatchSampler, pack_sequences, tokenize_sft

QUESTIONS = ["What is two plus two?", "Name a primary colour.", "How do I keep bread fresh?", "Say hello in French.",
             "What is the capital of Italy?", "Give me a synonym of quick.", "Is the sea salty?", "Count to three."]
ANSWERS = [" Four.", " Red is one.", " In a paper bag at room temperature, away from the sun.", " Bonjour!",
           " Rome.", " Fast, or rapid.", " Yes, mostly from dissolved minerals.", " One, two, three."]
TURNS = [[{"role": "user", "content": q}, {"role": "assistant", "content": a.strip()}] for q, a in zip(QUESTIONS, ANSWERS)]
ROWS = {
    "prompt_completion": [{"prompt": q, "completion": a} for q, a in zip(QUESTIONS, ANSWERS)],
    "conversational_prompt_completion": [{"prompt": t[:1], "completion": t[1:]} for t in TURNS],
    "text": [{"text": q + a} for q, a in zip(QUESTIONS, ANSWERS)],
    "messages": [{"messages": TURNS[i] + TURNS[(i + 3) % 8]} for i in range(8)],
}
# SmolLM2's chat template with {% generation %} tags around what an assistant turn adds, so that transformers'
# return_assistant_tokens_mask (TRL's assistant_only_loss) has masks to compare with.
SMOL_TAGGED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
    "{{ message['content'] + '<|im_end|>' + '\n' }}{% endgeneration %}{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
# A Llama-3-style template (headers, system prompt, trimmed content, no newline after a turn).
HEADERS_TAGGED = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim + '<|eot_id|>' }}"
    "{% endgeneration %}{% else %}{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


def untagged(template):
    return template.replace("{% generation %}", "").replace("{% endgeneration %}", "")


def with_template(template):
    tok = copy.deepcopy(smollm2_tokenizer())
    tok.chat_template = template
    return tok


def sft_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to=[], use_cpu=True, logging_steps=1, save_strategy="no",
                learning_rate=1e-3, seed=0, disable_tqdm=True, max_tokens_per_batch=4096)
    return SFTConfig(**{**base, **kw})


def trl_loss_and_grads(tmp_path, rows, tokenizer, model=None, **kw):
    """TRL 1.16's own SFTTrainer: its tokenised rows, and the loss and gradients of one batch of all rows."""
    from trl import SFTConfig as TRLConfig
    from trl import SFTTrainer as TRLTrainer

    args = TRLConfig(output_dir=str(tmp_path / "trl"), report_to=[], use_cpu=True, bf16=False,
                     gradient_checkpointing=False, per_device_train_batch_size=len(rows), **kw)
    trainer = TRLTrainer(model or tiny_llama(seed=3), args=args, train_dataset=datasets.Dataset.from_list(rows),
                         processing_class=tokenizer)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad for n, p in trainer.model.named_parameters()}
    return trainer.train_dataset, loss.detach(), grads


def fastdpo_loss_and_grads(tmp_path, rows, tokenizer, model=None, **kw):
    trainer = SFTTrainer(model or tiny_llama(seed=3), args=sft_args(tmp_path, **kw),
                         train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, pack_sequences(list(trainer.train_dataset)))
    loss.backward()
    return trainer.train_dataset, loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("fmt,options", [
    ("prompt_completion", {}), ("conversational_prompt_completion", {}), ("text", {}),
    ("messages", {"assistant_only_loss": False}), ("prompt_completion", {"completion_only_loss": False}),
    ("prompt_completion", {"loss_type": "dft"}),
])
def test_loss_and_gradients_equal_trl(tmp_path, fmt, options):
    tok = smollm2_tokenizer()
    trl_rows, trl_loss, trl_grads = trl_loss_and_grads(tmp_path, ROWS[fmt], tok, **options)
    rows, loss, grads = fastdpo_loss_and_grads(tmp_path, ROWS[fmt], tok, **options)
    assert rows["input_ids"] == trl_rows["input_ids"] and rows["labels"] == trl_rows["labels"]
    assert rel_err(loss, trl_loss) <= 1e-5, (loss, trl_loss)
    assert all(rel_err(grads[n], g) <= 1e-5 for n, g in trl_grads.items()), "gradients differ"


def test_assistant_only_loss_equals_trl_with_generation_tags(tmp_path):
    """TRL needs {% generation %} tags for assistant_only_loss; fastdpo finds the same tokens without them."""
    trl_rows, trl_loss, _ = trl_loss_and_grads(tmp_path, ROWS["messages"], with_template(SMOL_TAGGED),
                                               assistant_only_loss=True)
    rows, loss, _ = fastdpo_loss_and_grads(tmp_path, ROWS["messages"], smollm2_tokenizer())   # the default
    assert rows["labels"] == trl_rows["labels"] and rel_err(loss, trl_loss) <= 1e-5


@pytest.mark.parametrize("template,system", [(SMOL_TAGGED, None), (HEADERS_TAGGED, "You answer in one line.")])
def test_messages_mask_exactly_the_assistant_tokens(template, system):
    """Token by token: fastdpo's mask from prefix renderings of the untagged template == transformers' mask from the
    tagged one; and the masked text is exactly each assistant turn's content and end-of-turn tokens."""
    tagged, plain = with_template(template), with_template(untagged(template))
    if template == SMOL_TAGGED:
        assert untagged(template) == smollm2_tokenizer().chat_template.strip() or \
            plain.apply_chat_template(TURNS[0], tokenize=False) == \
            smollm2_tokenizer().apply_chat_template(TURNS[0], tokenize=False)
    conversations = [([{"role": "system", "content": system}] if system else []) + row["messages"]
                     for row in ROWS["messages"]]
    tokenized, _ = tokenize_sft(datasets.Dataset.from_list([{"messages": m} for m in conversations]), plain)
    for messages, row in zip(conversations, tokenized):
        want = tagged.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert row["input_ids"] == want["input_ids"]
        assert [int(t != -100) for t in row["labels"]] == want["assistant_masks"]
        masked = plain.decode([t for t in row["labels"] if t != -100])
        if template == SMOL_TAGGED:
            assert masked == "".join(m["content"] + "<|im_end|>\n" for m in messages if m["role"] == "assistant")
        else:   # SmolLM2's vocabulary has no <|eot_id|>: a token "><" straddles the end of a turn, in both masks
            assert masked == "<".join(m["content"] + "<|eot_id|>" for m in messages if m["role"] == "assistant")


def test_qlora_loss_and_gradients_equal_trl(tmp_path):
    """QLoRA as ``fastdpo sft --load-in-4bit --use-peft`` builds it (bitsandbytes NF4 base, fp32 LoRA): the fused
    head's loss (1e-5) and adapter gradients (1e-2) equal TRL's full-logits ones on the same 4-bit model."""
    pytest.importorskip("bitsandbytes")
    from fastdpo.models import ModelSource, apply_lora, load_causal_lm

    tiny_llama(seed=3).save_pretrained(tmp_path / "tiny")

    def qlora():
        torch.manual_seed(0)   # the same lora_A initialisation for both
        base = load_causal_lm(ModelSource(str(tmp_path / "tiny"), None), load_in_4bit=True)
        return apply_lora(base, r=4, alpha=8, dropout=0.0, quantized=True)

    rows, tok = ROWS["prompt_completion"], smollm2_tokenizer()
    _, want, want_grads = trl_loss_and_grads(tmp_path, rows, tok, model=qlora())
    _, got, got_grads = fastdpo_loss_and_grads(tmp_path, rows, tok, model=qlora())
    assert rel_err(got, want) <= 1e-5
    trained = [n for n, g in want_grads.items() if g is not None]
    assert trained and all("lora_" in n for n in trained)
    # through bitsandbytes' 4-bit layers the packed [1, T] stream and TRL's padded [B, T] rows give lora_B gradients
    # 3-4e-3 apart (measured; the loss agrees to 1e-5, and without quantization test_loss_and_gradients_equal_trl
    # agrees to 1e-5 on the same rows): the 16-bit tolerance
    errors = [rel_err(got_grads[n], want_grads[n]) for n in trained if want_grads[n].abs().sum() > 0]
    assert errors and max(errors) <= 1e-2
    assert any(want_grads[n].abs().sum() > 0 for n in trained)


def test_packed_equals_unpacked_per_sequence_losses(tmp_path):
    trainer = SFTTrainer(tiny_llama(seed=4), args=sft_args(tmp_path),
                         train_dataset=datasets.Dataset.from_list(ROWS["messages"]), processing_class=smollm2_tokenizer())
    rows = list(trainer.train_dataset)
    with torch.no_grad():
        batch = pack_sequences(rows)
        packed = [trainer.compute_loss(trainer.model, batch)]
        lengths = (batch.label_cu_seqlens[1:] - batch.label_cu_seqlens[:-1]).double()
        alone = torch.stack([trainer.compute_loss(trainer.model, pack_sequences([r])) for r in rows]).double()
    assert rel_err(packed[0], (alone * lengths).sum() / lengths.sum()) <= 1e-6
    assert pack_sequences(rows).position_ids[0, batch.cu_seqlens[1]] == 0


def test_one_micro_batch_equals_four(tmp_path):
    """One SGD step on 8 sequences as 1 micro-batch or as 4 accumulated ones (uneven token counts): same update."""
    data = datasets.Dataset.from_list(ROWS["prompt_completion"])
    deltas, losses = [], []
    for packing, batch_size, accumulation in ((True, 8, 1), (False, 2, 4)):
        model = tiny_llama(seed=5)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        trainer = SFTTrainer(model, args=sft_args(tmp_path, packing=packing, per_device_train_batch_size=batch_size,
                                                  gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd",
                                                  lr_scheduler_type="constant", max_grad_norm=0.0),
                             train_dataset=data, processing_class=smollm2_tokenizer())
        trainer.train()
        losses.append(trainer.state.log_history[0]["loss"])
        deltas.append(torch.cat([(p.detach() - before[n]).flatten() for n, p in model.named_parameters()]))
    assert rel_err(deltas[1], deltas[0]) <= 1e-5 and abs(losses[1] - losses[0]) <= 1e-5 * losses[0]


def test_best_fit_decreasing():
    sampler = BestFitBatchSampler([5, 3, 7, 2, 2, 6], 9, shuffle=False)
    assert sampler.batches == [[2, 3], [5, 1], [0, 4]]
    assert sorted(i for b in BestFitBatchSampler([4] * 10, 9, seed=1) for i in b) == list(range(10))
    with pytest.raises(ValueError, match="sequence 1"):
        BestFitBatchSampler([3, 12], 9)


def test_eval_loss_is_the_mean_over_eval_tokens(tmp_path):
    """Evaluation in several packed micro-batches: eval_loss is the token-weighted mean (one micro-batch's loss)."""
    data = datasets.Dataset.from_list(ROWS["prompt_completion"])
    trainer = SFTTrainer(tiny_llama(seed=6), args=sft_args(tmp_path, max_tokens_per_batch=40), train_dataset=data,
                         eval_dataset=data, processing_class=smollm2_tokenizer())
    metrics = trainer.evaluate()
    assert len(trainer.get_eval_dataloader()) > 2
    with torch.no_grad():
        whole = trainer.compute_loss(trainer.model.eval(), pack_sequences(list(trainer.eval_dataset)))
    assert metrics["eval_loss"] == pytest.approx(whole.item(), rel=1e-5)
    assert 0.0 <= metrics["eval_mean_token_accuracy"] <= 1.0
