"""The part of a model one rank holds under tensor parallelism (see hosts.py): its
attention heads and KV heads, its share of the MLP's inner dimension and of the
vocabulary, and which slices of each unsplit parameter those are."""

from __future__ import annotations

from dataclasses import dataclass

from .config import ModelConfig


@dataclass(frozen=True)
class Shard:
    """The part of a model that rank `rank` of a host of `size` ranks holds."""
    rank: int
    size: int
    heads: range  # query heads
    kv_heads: range
    intermediate: range  # of the MLP's inner dimension
    vocab: range  # rows of the embedding and the output head
    vocab_width: int  # the rows of the largest vocabulary part, to which logits are padded

    @staticmethod
    def of(config: ModelConfig, rank: int = 0, size: int = 1) -> "Shard":
        """Rank `rank`'s part; ValueError where the model cannot be split `size` ways."""
        problem = split_problem(config, size)
        if problem:
            raise ValueError(problem)
        heads, kv = config.num_heads // size, config.num_kv_heads
        first_kv = rank * kv // size  # a KV head serves size / kv ranks where kv < size
        kv_heads = range(first_kv, first_kv + max(1, kv // size))
        vocab_width = -(-config.vocab_size // size)
        return Shard(rank, size, range(rank * heads, (rank + 1) * heads), kv_heads,
                     _part(config.intermediate_size, rank, size), _part(config.vocab_size, rank, size), vocab_width)

    def slices(self, name: str, config: ModelConfig) -> tuple[int, list[range]] | None:
        """Which part of the unsplit engine parameter `name` this shard holds: (dimension,
        ranges along it, concatenated in order), or None for the whole of it."""
        d = config.head_dim
        if name in ("embed.weight", "lm_head.weight"):
            return 0, [self.vocab]
        if name.endswith(("wqkv.weight", "wqkv.bias")):
            q_rows = config.num_heads * d
            kv_rows = config.num_kv_heads * d
            kv = range(self.kv_heads.start * d, self.kv_heads.stop * d)
            return 0, [range(self.heads.start * d, self.heads.stop * d),
                       range(q_rows + kv.start, q_rows + kv.stop),
                       range(q_rows + kv_rows + kv.start, q_rows + kv_rows + kv.stop)]
        if name.endswith("wo.weight"):
            return 1, [range(self.heads.start * d, self.heads.stop * d)]
        if name.endswith("w_gate_up.weight"):
            inner = config.intermediate_size
            return 0, [self.intermediate, range(inner + self.intermediate.start, inner + self.intermediate.stop)]
        if name.endswith("w_down.weight"):
            return 1, [self.intermediate]
        return None


def _part(total: int, rank: int, size: int) -> range:
    """Rank `rank`'s share of `total` rows: ceil(total / size) each, the last ones fewer."""
    width = -(-total // size)
    return range(min(total, rank * width), min(total, (rank + 1) * width))


def split_problem(config: ModelConfig, tp: int) -> str | None:
    """Why a model cannot be split over `tp` ranks, or None."""
    heads, kv = config.num_heads, config.num_kv_heads
    if heads % tp:
        return f"--tp {tp} does not divide the model's {heads} attention heads"
    if (kv % tp if kv >= tp else tp % kv):
        return f"--tp {tp} and the model's {kv} KV heads: one must divide the other"
    return None
