"""The planner: predictions from a model's shape and a device's rates, and its advice."""

from __future__ import annotations

import json
import sys

import pytest

from star_engine.attention.dense import DenseAttention
from star_engine.attention.ring import RingAttention
from star_engine.attention.spec import StrategySpec
from star_engine.config import PRESETS
from star_engine.costs import Calibration, attention_flops_per_pair, linear_flops_per_token
from star_engine.launch.control import Place
from star_engine.prediction import predict, recommend
from tests.launcher import mpirun, run

CONFIG = PRESETS["llama-3.1-8b"]
RATES = Calibration("test device", linear_flops_per_s=5e14, attention_flops_per_s=6e14, source="made up",
                    copy_bandwidth_Bps=4e12, link_bandwidth_Bps=1e11, gather_merge_s_per_layer=1e-5,
                    memory_bytes=140 << 30)


def plan(spec: StrategySpec, gpus: int, context: int = 131072, rates: Calibration = RATES):
    return predict(CONFIG, spec, gpus, context, 64, 32, rates)


def test_dense_phase_1_is_the_causal_square_and_every_token_at_the_measured_rates():
    n = 65536
    want = (n * (n + 1) / 2 * attention_flops_per_pair(CONFIG) / RATES.attention_flops_per_s
            + n * linear_flops_per_token(CONFIG) / RATES.linear_flops_per_s)
    assert plan(StrategySpec("dense"), 1, n).phase1_s == pytest.approx(want)


def test_the_balanced_layout_evens_out_the_ranks_that_the_uniform_one_leaves_idle():
    uniform, balanced = plan(StrategySpec(), 2), plan(StrategySpec(layout="balanced"), 2)
    assert uniform.phase1_per_rank_s[0] < 0.7 * uniform.phase1_per_rank_s[1]  # the owner of block 0 idles
    assert max(balanced.phase1_per_rank_s) / min(balanced.phase1_per_rank_s) < 1.01
    assert balanced.phase1_s < 0.8 * uniform.phase1_s
    assert balanced.tpot_s > uniform.tpot_s  # its busiest rank holds more K/V to read per token


def test_a_slow_link_makes_ring_wait_for_its_kv_and_star_for_its_anchor():
    slow = Calibration(**{**RATES.__dict__, "link_bandwidth_Bps": 1e9})
    assert plan(StrategySpec("ring"), 4, rates=slow).phase1_s > 2 * plan(StrategySpec("ring"), 4).phase1_s
    assert plan(StrategySpec(), 4, rates=slow).phase1_s > plan(StrategySpec(), 4).phase1_s
    unmeasured = Calibration(**{**RATES.__dict__, "link_bandwidth_Bps": None})
    assert plan(StrategySpec("ring"), 4, rates=unmeasured).left_out == ["link"]


def test_a_window_is_encoded_by_each_blocks_owner_and_the_anchor_still_broadcast():
    n, gpus, block = 131072, 4, 32768
    star = plan(StrategySpec(anchor_fraction=1 / 8), gpus, n)
    windowed = plan(StrategySpec(anchor_fraction=1 / 8, window_fraction=1 / 2), gpus, n)
    anchor, window = block // 8, block // 2
    token_s = linear_flops_per_token(CONFIG) / RATES.linear_flops_per_s
    pair_s = attention_flops_per_pair(CONFIG) / RATES.attention_flops_per_s
    # The window's tokens over the anchor and causally before the block, and the block over the window.
    extra = window * token_s + (window * anchor + window * (window + 1) / 2 + block * window) * pair_s
    assert windowed.phase1_per_rank_s[0] == pytest.approx(star.phase1_per_rank_s[0])  # block 0 has none
    for rank in range(1, gpus):
        assert windowed.phase1_per_rank_s[rank] == pytest.approx(star.phase1_per_rank_s[rank] + extra)
    quarter = plan(StrategySpec(anchor_fraction=1 / 8, window_fraction=1 / 4), gpus, n)
    assert star.phase1_s < quarter.phase1_s < windowed.phase1_s


def test_advice_is_the_fewest_gpus_that_meet_the_target_within_memory():
    specs = [StrategySpec(), StrategySpec(layout="balanced"), StrategySpec("ring")]
    predictions = [plan(spec, gpus) for gpus in (2, 4, 8) for spec in specs]
    target = min(p.ttft_s for p in predictions if p.gpus == 4) * 1.01
    assert "fewest GPUs" in recommend(predictions, RATES.memory_bytes, target)
    assert "on 4 GPUs" in recommend(predictions, RATES.memory_bytes, target)
    assert "no layout reaches 0.001 s" in recommend(predictions, RATES.memory_bytes, 0.001)
    assert "nothing fits in 1 GiB per GPU" in recommend(predictions, 1 << 30, None)
    fastest = min(predictions, key=lambda p: p.ttft_s)
    assert f"{fastest.label} on {fastest.gpus} GPUs" in recommend(predictions, RATES.memory_bytes, None)


def test_a_job_predicts_a_shared_context_encoded_once_and_read_once_a_step():
    from star_engine.measure.job_prediction import predict_job
    from star_engine.settings import ScaleOutSettings

    def job(questions: int, batch: int) -> dict:
        return predict_job(CONFIG, StrategySpec("dense"), 1, [32768] * 16, 32, 64, batch, ScaleOutSettings("all"),
                           RATES, questions=questions)

    alone = predict(CONFIG, StrategySpec("dense"), 1, 32768, 32, 64, RATES)
    # One at a time: the fifteen later questions skip phase 1, and nothing else changes.
    assert job(1, 1)["wall_s"] - job(16, 1)["wall_s"] == pytest.approx(15 * alone.phase1_s)
    # Sixteen decoding together: a step reads the context once, not sixteen times.
    copies, shared = job(1, 16)["wall_s"] - 15 * alone.phase1_s, job(16, 16)["wall_s"]
    steps = 63 * 15 * alone.decode_kv_s  # the reads saved over the 63 steps all sixteen decode
    assert copies - shared == pytest.approx(steps, rel=0.05)


def test_plan_prints_a_table_and_advice_and_saves_its_predictions(tmp_path):
    out = tmp_path / "plan.json"
    result = run([sys.executable, "-m", "star_engine", "plan", "--lengths", "64K", "--gpus", "1,2",
                  "--ttft-target", "100", "--output", str(out)], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "65536 tokens: fewest GPUs for 100 s to the first token: dense on 1 GPU" in result.stdout
    saved = json.loads(out.read_text())
    assert {p["label"] for p in saved["predictions"]} == {"dense", "star a=1/8 pw=1/2 +q",
                                                          "star a=1/8 balanced pw=1/2 +q", "ring"}
    assert saved["predicted_on"]["command"].startswith("python -m star_engine plan --lengths 64K")  # and when


@pytest.mark.alone
def test_calibrate_measures_every_rate_on_the_ranks_it_is_launched_with(tmp_path):
    out = tmp_path / "cpu.json"
    result = run([*mpirun(2), sys.executable, "-m", "star_engine", "plan", "--calibrate", "--model", "tiny",
                  "--output", str(out)], timeout=300)
    assert result.returncode == 0, result.stderr
    measured = Calibration.load(out)
    assert measured.device == "cpu" and "2 rank(s)" in measured.source
    for rate in (measured.linear_flops_per_s, measured.attention_flops_per_s, measured.copy_bandwidth_Bps,
                 measured.link_bandwidth_Bps, measured.gather_merge_s_per_layer):
        assert rate is not None and rate > 0
    assert measured.query_overhead_s >= 0 and measured.decode_overhead_s >= 0


def test_ring_receives_the_largest_of_the_other_ranks_chunks_and_dense_nothing():
    ring = RingAttention(Place(0, 3), None).layout(1000)
    assert ring.received == tuple(max(k for r, k in enumerate(ring.kept) if r != rank) for rank in range(3))
    assert DenseAttention(Place(0, 2), None).layout(1000).received == (0, 0)


def test_advice_counts_the_headroom_a_request_runs_with_not_only_the_estimate():
    p = plan(StrategySpec("ring"), 2)
    assert p.memory_bytes < p.memory_needed_bytes
    between = (p.memory_bytes + p.memory_needed_bytes) / 2
    assert "nothing fits" in recommend([p], between, None)
    assert "fastest that fits" in recommend([p], p.memory_needed_bytes, None)


def test_a_calibration_takes_only_the_rates_it_lacks_from_an_earlier_one_of_the_same_device():
    network_only = Calibration(**{**RATES.__dict__, "link_bandwidth_Bps": None, "network_bandwidth_Bps": 1e10,
                                  "source": "two nodes"})
    filled, taken = network_only.filled_from(RATES)
    assert taken == ["link_bandwidth_Bps"] and filled.link_bandwidth_Bps == RATES.link_bandwidth_Bps
    assert filled.network_bandwidth_Bps == 1e10 and filled.source == "two nodes; link_bandwidth_Bps from made up"
    other_device = Calibration(**{**RATES.__dict__, "device": "another"})
    assert network_only.filled_from(other_device) == (network_only, [])
