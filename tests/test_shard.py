"""How a model is split over the ranks of a host (--tp), and how ranks form hosts."""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from star_engine.checkpoint import load_config, load_model
from star_engine.config import PRESETS
from star_engine.costs import decode_weights, model_weights, rank_weights
from star_engine.hosts import host_problem
from star_engine.model import Transformer
from star_engine.shard import Shard, split_problem
from tests.reference import make_tiny_checkpoint


def test_heads_mlp_and_vocabulary_are_dealt_in_order_and_kv_heads_shared_where_fewer_than_ranks():
    config = PRESETS["llama-3.1-70b"]  # 64 heads, 8 KV heads
    shards = [Shard.of(config, rank, 16) for rank in range(16)]
    assert [s.heads for s in shards[:2]] == [range(0, 4), range(4, 8)]
    assert [s.kv_heads for s in shards[:4]] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    # every query head of a rank reads the KV head it reads in the whole model (GQA groups of 8)
    assert all(h // 8 == s.kv_heads.start for s in shards for h in s.heads)
    assert sum(len(s.intermediate) for s in shards) == config.intermediate_size
    assert [s.vocab.start for s in shards[1:]] == [s.vocab.stop for s in shards[:-1]]
    assert shards[-1].vocab.stop == config.vocab_size and {s.vocab_width for s in shards} == {8016}


def test_a_model_that_cannot_be_split_evenly_is_refused_with_the_reason():
    config = PRESETS["tiny"]  # 4 heads, 2 KV heads
    assert split_problem(config, 8) == "--tp 8 does not divide the model's 4 attention heads"
    assert split_problem(PRESETS["llama-3.1-8b"], 16) is None  # 32 heads, KV heads shared by two ranks each
    odd = replace(config, num_heads=6, num_kv_heads=3)
    assert split_problem(odd, 2) == "--tp 2 and the model's 3 KV heads: one must divide the other"
    with pytest.raises(ValueError, match="does not divide"):
        Shard.of(config, 0, 3)


def test_hosts_are_consecutive_ranks_of_one_node():
    assert host_problem(2, 4, (0, 0, 1, 1)) is None
    assert host_problem(3, 4, (0, 0, 0, 0)) == "--tp 3 does not divide the 4 ranks of the job into hosts"
    assert "host 0 (ranks 0-1) spans 2 nodes" in host_problem(2, 4, (0, 1, 0, 1))


def test_a_rank_holds_its_share_of_the_weights_and_a_copy_of_every_norm():
    config = PRESETS["llama-3.1-70b"]
    assert rank_weights(config, 1) == model_weights(config)
    norms = (2 * config.num_layers + 1) * config.hidden_size
    assert rank_weights(config, 2) * 2 == pytest.approx(model_weights(config) + norms, rel=1e-9)
    shard = Shard.of(config, 0, 2)
    with torch.device("meta"):
        held = sum(p.numel() for p in Transformer(config, shard).parameters())
    assert held == rank_weights(config, 2)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_a_decode_step_reads_what_the_fullest_rank_holds_but_the_embedding_unless_it_is_the_output_head(tp, tied):
    config = replace(PRESETS["llama-3.1-70b"], tie_word_embeddings=tied)
    read = []
    for rank in range(tp):
        with torch.device("meta"):
            model = Transformer(config, Shard.of(config, rank, tp))
        read.append(sum(p.numel() for name, p in model.named_parameters() if tied or name != "embed.weight"))
    assert decode_weights(config, tp) == max(read)
    # The weights the H200 runs of bench/results/ held their time per token against.
    assert decode_weights(PRESETS["llama-3.1-8b"]) * 2 == 15_009_849_344
    assert decode_weights(PRESETS["llama-3.1-70b"], 2) * 2 == 69_504_352_256


@pytest.mark.parametrize("tp", [2, 4])
def test_a_shard_read_from_a_checkpoint_holds_the_slices_of_the_whole_models_weights(tp):
    checkpoint = make_tiny_checkpoint(Path(tempfile.mkdtemp()))
    config = load_config(str(checkpoint))
    whole = dict(load_model(str(checkpoint), torch.float32, torch.device("cpu")).named_parameters())
    for rank in range(tp):
        shard = Shard.of(config, rank, tp)
        part = load_model(str(checkpoint), torch.float32, torch.device("cpu"), shard=shard)
        for name, param in part.named_parameters():
            slices = shard.slices(name, config)
            if slices is None:
                assert torch.equal(param, whole[name]), name
                continue
            dim, ranges = slices
            want = torch.cat([whole[name].narrow(dim, r.start, len(r)) for r in ranges], dim)
            assert torch.equal(param, want), name


def test_a_presets_shards_are_slices_of_the_same_random_weights():
    whole = dict(load_model("tiny", torch.float32, torch.device("cpu")).named_parameters())
    config = PRESETS["tiny"]
    shard = Shard.of(config, 1, 2)
    for name, param in load_model("tiny", torch.float32, torch.device("cpu"), shard=shard).named_parameters():
        slices = shard.slices(name, config)
        want = whole[name] if slices is None else torch.cat(
            [whole[name].narrow(slices[0], r.start, len(r)) for r in slices[1]], slices[0])
        assert torch.equal(param, want), name
