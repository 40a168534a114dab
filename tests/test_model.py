"""The engine's model gives the logits of Hugging Face transformers on the same weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from star_engine.attention.local import local_attention
from star_engine.checkpoint import load_config, load_model
from star_engine.model_source import resolve
from star_engine.config import PRESETS, ModelConfig
from tests.reference import make_tiny_checkpoint

CPU = torch.device("cpu")


def causal_logits(model, ids: torch.Tensor) -> torch.Tensor:
    hidden = model(ids, torch.arange(len(ids)), lambda layer, q, k, v: local_attention(q, k, v, causal=True))
    return model.logits(hidden)


def transformers_logits(path, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()
    with torch.no_grad():
        return hf(ids[None]).logits[0].float()


@pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
               "rope_theta": 500000.0}),
    ("qwen2", {}),  # q, k, v biases
    ("mistral", {"sliding_window": None}),
])
def test_logits_equal_transformers_on_a_random_tiny_model(tmp_path, model_type, overrides):
    path = make_tiny_checkpoint(tmp_path, model_type, **overrides)
    ids = torch.randint(0, 300, (150,), generator=torch.Generator().manual_seed(1))
    ours = causal_logits(load_model(str(path), torch.float32, CPU), ids)
    torch.testing.assert_close(ours, transformers_logits(path, ids), atol=2e-4, rtol=1e-4)


def test_logits_equal_transformers_on_the_built_in_model():
    source = resolve("smollm2-135m-instruct")
    ids = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(2))
    ours = causal_logits(load_model("smollm2-135m-instruct", torch.float32, CPU), ids)
    want = transformers_logits(str(source.path.parent), ids, gguf_file=source.path.name)
    torch.testing.assert_close(ours, want, atol=2e-3, rtol=1e-3)
    assert (ours[-1].argmax() == want[-1].argmax()).item()


def test_llama3_rope_scaling_is_read_from_transformers_5_configs():
    cfg = ModelConfig.from_hf({
        "model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 8,
        "num_hidden_layers": 1, "num_attention_heads": 2,
        "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                            "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}})
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["factor"] == 8.0


def test_sliding_window_models_are_refused_rather_than_run_inexactly():
    with pytest.raises(ValueError, match="sliding-window"):
        ModelConfig.from_hf({"model_type": "mistral", "vocab_size": 10, "hidden_size": 8,
                             "intermediate_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
                             "sliding_window": 4096})


def test_presets_have_random_weights_equal_on_every_rank():
    a = load_model("tiny", torch.float32, CPU)
    b = load_model("tiny", torch.float32, CPU)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert PRESETS["llama-3.1-8b"].num_kv_heads == 8


def test_unknown_models_are_a_clear_error():
    with pytest.raises(ValueError, match="neither a built-in model"):
        resolve("no-such-model")


def test_prefill_in_token_chunks_equals_prefill_at_once(monkeypatch):
    import star_engine.model as model_module

    model = load_model("tiny", torch.float32, CPU)
    ids = torch.randint(0, 512, (300,), generator=torch.Generator().manual_seed(3))
    whole = causal_logits(model, ids)
    monkeypatch.setattr(model_module, "PREFILL_CHUNK", 64)
    torch.testing.assert_close(causal_logits(model, ids), whole, atol=1e-5, rtol=1e-5)


def test_a_gguf_file_without_the_gguf_package_is_one_clear_error(tmp_path, monkeypatch):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the gguf package: pip install gguf"):
        load_config(str(model))


@pytest.fixture(scope="module")
def built_in_gguf():
    """The built-in model's file, and its layout as the gguf package reads the whole file."""
    import gguf

    path = resolve("smollm2-135m-instruct").path
    return path, gguf.GGUFReader(str(path))


def cut_copy(source: Path, size: int, directory: Path) -> Path:
    """The first `size` bytes of `source`, as a .gguf file of their own."""
    cut = directory / f"cut-{size}.gguf"
    with source.open("rb") as whole:
        cut.write_bytes(whole.read(size))
    return cut


@pytest.mark.parametrize("where", ["its first bytes", "its metadata (at 1 MB)", "its table of tensors"])
def test_a_gguf_file_cut_in_its_header_is_named_as_truncated_with_the_bytes_it_holds(tmp_path, built_in_gguf,
                                                                                      where):
    path, whole = built_in_gguf
    size = {"its first bytes": 10, "its metadata (at 1 MB)": 1 << 20,
            "its table of tensors": whole.data_offset - 100}[where]
    cut = cut_copy(path, size, tmp_path)
    with pytest.raises(ValueError) as error:
        load_config(str(cut))
    message = str(error.value)
    assert f"{cut} is truncated or corrupt" in message and f"holds {size:,} bytes" in message


@pytest.mark.parametrize("which", [0, -1], ids=["first tensor", "last tensor"])
def test_a_gguf_file_cut_in_a_tensor_names_it_the_bytes_it_expects_and_the_bytes_the_file_holds(tmp_path,
                                                                                                built_in_gguf,
                                                                                                which):
    path, whole = built_in_gguf
    tensor = whole.tensors[which]
    size = tensor.data_offset + tensor.n_bytes // 2
    cut = cut_copy(path, size, tmp_path)
    with pytest.raises(ValueError) as error:
        load_config(str(cut))
    message = str(error.value)
    assert f"{cut} is truncated or corrupt" in message
    assert f"tensor {tensor.name} expects {tensor.n_bytes:,} bytes" in message and f"holds {size:,} bytes" in message


def test_a_file_that_is_not_gguf_is_named_as_corrupt(tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match=f"{model} is truncated or corrupt"):
        load_config(str(model))
