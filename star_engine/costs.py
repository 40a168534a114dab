"""What phase 1 costs on a device: a model's work per token and per attention pair, and the
rates at which a device does each, measured (a calibration).

A token's per-token work (its projections and MLP in every layer) and an attended (query,
key) pair run at different rates, so the balanced star layout weighs them by the device's
measured rates: token_weight says how many attention pairs cost as much as one token.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .model import ModelConfig

DEFAULT_CALIBRATION = Path(__file__).with_name("calibrations") / "nvidia-h200.json"


@dataclass(frozen=True)
class Calibration:
    device: str
    linear_flops_per_s: float  # the per-token work: projections, MLP (and what rides along)
    attention_flops_per_s: float  # attention over (query, key) pairs
    source: str  # how the rates were measured

    @classmethod
    def load(cls, path: Path | None = None) -> "Calibration":
        """`path`, else $STAR_ENGINE_CALIBRATION, else the shipped H200 calibration."""
        path = path or Path(os.environ.get("STAR_ENGINE_CALIBRATION") or DEFAULT_CALIBRATION)
        try:
            fields = json.loads(path.read_text())
            return cls(**{k: fields[k] for k in ("device", "linear_flops_per_s", "attention_flops_per_s", "source")})
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"calibration {path}: {exc}") from None

    def as_dict(self) -> dict:
        return asdict(self)


def linear_flops_per_token(config: ModelConfig) -> float:
    """Every layer's projections and MLP: two FLOPs per weight."""
    hidden, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = hidden * q + 2 * hidden * kv + q * hidden + 3 * hidden * config.intermediate_size
    return 2.0 * per_layer * config.num_layers


def attention_flops_per_pair(config: ModelConfig) -> float:
    """Every layer's q.k and p.v for one (query, key) pair: four FLOPs per head dimension."""
    return 4.0 * config.num_heads * config.head_dim * config.num_layers


def token_weight(config: ModelConfig, calibration: Calibration) -> float:
    """Attention pairs that take as long as one token's per-token work on the device."""
    token_s = linear_flops_per_token(config) / calibration.linear_flops_per_s
    pair_s = attention_flops_per_pair(config) / calibration.attention_flops_per_s
    return token_s / pair_s
