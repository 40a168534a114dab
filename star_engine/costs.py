"""What phase 1 costs on a device: a model's work per token and per attention pair, and the
rates at which a device does each, measured (a calibration).

A token's per-token work (its projections and MLP in every layer) and an attended (query,
key) pair run at different rates, so the balanced star layout weighs them by the device's
measured rates: token_weight says how many attention pairs cost as much as one token.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .config import ModelConfig
from .environment import job_setting
from .json_file import write_json
from .shard import Shard

DEFAULT_CALIBRATION = Path(__file__).with_name("calibrations") / "nvidia-h200.json"


@dataclass(frozen=True)
class Calibration:
    """A device's measured rates; None where a rate was not measured (the planner then
    leaves that cost out, and says so)."""

    device: str
    linear_flops_per_s: float  # the per-token work: projections, MLP (and what rides along)
    attention_flops_per_s: float  # attention over (query, key) pairs
    source: str  # how the rates were measured
    copy_bandwidth_Bps: float | None = None  # device memory, bytes read plus written per second
    link_bandwidth_Bps: float | None = None  # one rank to another, bytes per second
    gather_merge_s_per_layer: float | None = None  # one decode token's (o, lse) exchange and merge
    decode_overhead_s: float | None = None  # a decode step beyond its reads and exchanges
    query_overhead_s: float | None = None  # the query pass beyond its work
    memory_bytes: int | None = None  # one device's memory
    network_bandwidth_Bps: float | None = None  # between ranks of different nodes
    network_gather_merge_s_per_layer: float | None = None  # gather_merge across nodes

    @classmethod
    def load(cls, path: Path | None = None) -> "Calibration":
        """`path`, else $STAR_ENGINE_CALIBRATION (the job's), else the shipped H200 calibration."""
        path = path or Path(job_setting("STAR_ENGINE_CALIBRATION") or DEFAULT_CALIBRATION)
        try:
            fields = json.loads(path.read_text())
            known = {k: v for k, v in fields.items() if k in cls.__dataclass_fields__}
            return cls(**known)
        except (OSError, ValueError, TypeError) as exc:
            raise ValueError(f"calibration {path}: {exc}") from None

    def filled_from(self, earlier: "Calibration") -> tuple["Calibration", list[str]]:
        """This calibration with the rates it lacks taken from an earlier one of the same
        device (one node's link, another job's network), and the names of those rates."""
        if earlier.device != self.device:
            return self, []
        taken = [name for name, value in asdict(self).items()
                 if value is None and getattr(earlier, name) is not None]
        if not taken:
            return self, []
        source = f"{self.source}; {', '.join(taken)} from {earlier.source}"
        return replace(self, source=source, **{name: getattr(earlier, name) for name in taken}), taken

    def save(self, path: Path) -> None:
        write_json(path, asdict(self))


def layer_weights(config: ModelConfig) -> int:
    """Weights of one decoder layer's projections and MLP (and their biases, if any)."""
    hidden, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    bias = q + 2 * kv if config.qkv_bias else 0
    return hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * config.intermediate_size + bias


def model_weights(config: ModelConfig) -> int:
    """All weights: the layers (and their norms), the embedding, the output head unless tied."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return (config.num_layers * (layer_weights(config) + 2 * config.hidden_size) + config.hidden_size
            + config.vocab_size * config.hidden_size + head)


def rank_weights(config: ModelConfig, tp: int = 1) -> int:
    """The weights the rank of a host of `tp` ranks holds that holds the most (its first,
    shard.py): its heads' and KV heads' projections, its share of the MLP and of the
    vocabulary, and a copy of every norm."""
    if tp == 1:
        return model_weights(config)
    shard = Shard.of(config, 0, tp)
    d, hidden = config.head_dim, config.hidden_size
    q, kv, inner = len(shard.heads) * d, len(shard.kv_heads) * d, len(shard.intermediate)
    layer = hidden * (q + 2 * kv) + q * hidden + 3 * hidden * inner + (q + 2 * kv if config.qkv_bias else 0)
    vocab = len(shard.vocab) * hidden * (1 if config.tie_word_embeddings else 2)
    return config.num_layers * (layer + 2 * hidden) + hidden + vocab


def decode_weights(config: ModelConfig, tp: int = 1) -> int:
    """Weights one decode step reads on the rank of a host of `tp` ranks that holds the most:
    all it holds but its part of the embedding table (of which it reads one row), unless the
    table is also the output head."""
    embedding = 0 if config.tie_word_embeddings else len(Shard.of(config, 0, tp).vocab) * config.hidden_size
    return rank_weights(config, tp) - embedding


def kv_bytes_per_token(config: ModelConfig, element_size: int, kv_heads: int | None = None) -> int:
    """K and V of one token in every layer: of all KV heads, or of `kv_heads` (a rank's)."""
    return 2 * config.num_layers * (kv_heads or config.num_kv_heads) * config.head_dim * element_size


def linear_flops_per_token(config: ModelConfig) -> float:
    """Every layer's projections and MLP: two FLOPs per weight."""
    return 2.0 * layer_weights(config) * config.num_layers


def attention_flops_per_pair(config: ModelConfig) -> float:
    """Every layer's q.k and p.v for one (query, key) pair: four FLOPs per head dimension."""
    return 4.0 * config.num_heads * config.head_dim * config.num_layers


def token_weight(config: ModelConfig, calibration: Calibration) -> float:
    """Attention pairs that take as long as one token's per-token work on the device."""
    token_s = linear_flops_per_token(config) / calibration.linear_flops_per_s
    pair_s = attention_flops_per_pair(config) / calibration.attention_flops_per_s
    return token_s / pair_s


def fit_rates(linear_flops: list[float], attention_flops: list[float], seconds: list[float]) -> tuple[float, float]:
    """(linear, attention) FLOP/s that best explain measured times as linear / linear rate +
    attention / attention rate, in relative error (least squares)."""
    import numpy as np

    flops = np.array([linear_flops, attention_flops], dtype=float).T
    measured = np.array(seconds, dtype=float)
    inverse, *_ = np.linalg.lstsq(flops / measured[:, None], np.ones(len(measured)), rcond=None)
    if (inverse <= 0).any():
        raise ValueError("the measured times do not separate the two rates (too few or too alike sizes)")
    return float(1 / inverse[0]), float(1 / inverse[1])
