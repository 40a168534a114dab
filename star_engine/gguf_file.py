"""GGUF files (llama.cpp's format): a model's config and its tensors under the names of
Hugging Face checkpoints, dequantised, and kept as safetensors beside what else is derived
from a file (cache_dir). A file cut short or corrupt is one error that names it."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor

from .config import ModelConfig

# GGUF tensor names (llama.cpp) -> Hugging Face names.
_GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_GGUF_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def cache_dir(path: Path, kind: str) -> Path:
    """Where what is derived from the file `path` is kept (STAR_ENGINE_CACHE, ~/.cache/star_engine)."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("STAR_ENGINE_CACHE", Path.home() / ".cache" / "star_engine"))
    return root / kind / f"{path.stem}-{key}"


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    """The model's config and its tensors, by Hugging Face names, dequantised. Parsing and
    dequantising take seconds per rank: the result is kept as safetensors (cache_dir)."""
    from safetensors.torch import load_file, save_file

    cache = cache_dir(path, "models")
    if (cache / "model.safetensors").is_file():
        fields = json.loads((cache / "config.json").read_text())
        cfg = ModelConfig(**{**fields, "eos_token_ids": tuple(fields["eos_token_ids"])})
        return cfg, load_file(str(cache / "model.safetensors"))
    cfg, tensors = _read_gguf(path)
    try:  # write aside, then rename: ranks that convert at the same time do not clash
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=cache.parent))
        tmp.chmod(0o755)
        save_file(tensors, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(asdict(cfg)))
        tmp.rename(cache)
    except OSError:
        pass  # unwritable or already there: only costs the conversion again
    return cfg, tensors


def _gguf_field(reader, key: str, default=None):
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _read_gguf(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    try:
        import gguf
    except ImportError:
        raise ValueError(f"{path}: reading a .gguf file needs the gguf package: pip install gguf "
                         "(or pip install 'star_engine[gguf]')") from None

    reader = _gguf_reader(gguf, path)
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ValueError(f"{path}: GGUF architecture {arch!r} is not supported (llama, qwen2)")

    def meta(key: str, default=None):
        return _gguf_field(reader, f"{arch}.{key}", default)

    raw = {t.name: t for t in reader.tensors}
    heads = meta("attention.head_count")
    kv_heads = meta("attention.head_count_kv", heads)
    hidden = meta("embedding_length")
    eos = [_gguf_field(reader, k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id")]
    scaling = None
    if "rope_freqs.weight" in raw:  # llama.cpp stores llama3 scaling as per-frequency divisors
        factors = gguf.quants.dequantize(raw["rope_freqs.weight"].data, raw["rope_freqs.weight"].tensor_type)
        scaling = {"rope_type": "freq_factors", "factors": [float(f) for f in factors]}
    cfg = ModelConfig(
        vocab_size=int(raw["token_embd.weight"].shape[1]),
        hidden_size=hidden,
        intermediate_size=meta("feed_forward_length"),
        num_layers=meta("block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=meta("attention.key_length", hidden // heads),
        rope_theta=float(meta("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rms_norm_eps=float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in raw,
        qkv_bias=arch == "qwen2",
        max_position_embeddings=int(meta("context_length", 8192)),
        eos_token_ids=tuple(dict.fromkeys(int(e) for e in eos if e is not None)),
    )

    tensors: dict[str, Tensor] = {}
    for hf_name, tensor in _gguf_tensors(raw):
        values = torch.from_numpy(np.array(gguf.quants.dequantize(tensor.data, tensor.tensor_type)))
        # llama.cpp interleaves the rotary pairs of q and k rows for the llama architecture;
        # the engine (like Hugging Face) rotates halves, so undo that permutation.
        if arch == "llama" and hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            n = heads if "q_proj" in hf_name else kv_heads
            values = values.reshape(n, -1, 2, values.shape[-1]).transpose(1, 2).reshape(values.shape)
        tensors[hf_name] = values.float()
    return cfg, tensors


class _PastTheEnd(Exception):
    """A read of bytes [start, end) of a file that ends before `end`; `tensor`: whose data it was."""

    def __init__(self, start: int, end: int) -> None:
        super().__init__(start, end)
        self.start, self.end, self.tensor = start, end, None


def _gguf_reader(gguf, path: Path):
    """gguf.GGUFReader of the file, which must hold every byte its header and tensors need: a
    file cut short or corrupt is a ValueError naming it, what was expected and what it holds.
    (The reader itself takes what is left of a short read, and fails later with an error of
    numpy's that says neither.)"""
    size = path.stat().st_size

    class Reader(gguf.GGUFReader):
        # _get makes every read of the file; a tensor's data is one read, at the offset its
        # entry in the header gives.
        def _get(self, offset, dtype, count=1, override_order=None):
            end = offset + np.dtype(dtype).itemsize * int(count)
            if end > size:
                raise _PastTheEnd(offset, end)
            return super()._get(offset, dtype, count, override_order)

        def _build_tensors(self, start_offs, fields):
            try:
                super()._build_tensors(start_offs, fields)
            except _PastTheEnd as cut:
                cut.tensor = next(field.name for field in fields if start_offs + int(field.parts[5][0]) == cut.start)
                raise

    try:
        return Reader(str(path))
    except _PastTheEnd as cut:
        expected = (f"tensor {cut.tensor} expects {cut.end - cut.start:,} bytes at offset {cut.start:,}" if cut.tensor
                    else f"its header needs at least {cut.end:,} bytes")
        raise ValueError(f"{path} is truncated or corrupt: {expected}, and the file holds {size:,} bytes") from None
    except (ValueError, KeyError, IndexError, OverflowError) as exc:  # the reader's checks of the header's fields
        raise ValueError(f"{path} is truncated or corrupt: {exc} (the file holds {size:,} bytes)") from None


def _gguf_tensors(raw: dict) -> Iterator[tuple[str, object]]:
    for name, tensor in raw.items():
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
            yield f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}", tensor
        elif base in _GGUF_NAMES:
            yield f"{_GGUF_NAMES[base]}.{suffix}", tensor
