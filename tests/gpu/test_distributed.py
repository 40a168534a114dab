"""tests/gpu/mpi under mpirun, one rank per GPU, and the multi-rank CPU suite's strategy
tests on GPUs."""

from __future__ import annotations

import re
import sys

import pytest
import torch

from tests.launcher import mpirun, run


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_multi_gpu_suite(ranks):
    if ranks > torch.cuda.device_count():
        pytest.skip(f"needs {ranks} GPUs")
    result = run([*mpirun(ranks), sys.executable, "-m", "pytest", "tests/gpu/mpi", "-q", "--color=no",
                  "-p", "no:cacheprovider"], timeout=600, env={"STAR_ENGINE_MPI_TESTS": "1"})
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-6000:]
    # A suite whose every test skipped proves nothing: each rank's summary counts some passed.
    summaries = re.findall(r"^=* ?(.*\bin [\d.]+s\b.*?) ?=*$", result.stdout, re.MULTILINE)
    assert len(summaries) == ranks and all(re.search(r"\b[1-9]\d* passed", s) for s in summaries), summaries


SILENT_PEER = """
import time, torch
from star_engine.comm import NcclCommunicator
from star_engine.launch.launcher import init_distributed
from star_engine.launch.ending import run_guarded
from star_engine.launch.devices import select_device
def main():
    dist = init_distributed()
    nccl = NcclCommunicator(dist, select_device("cuda", dist))
    if dist.rank == 1:
        time.sleep(120)  # alive, but never joins the collective
    o, lse = torch.zeros(4, 1, 64, device="cuda"), torch.zeros(4, 1, device="cuda")
    nccl.gather_merge(o, lse)
    nccl.synchronize()
    return 0
raise SystemExit(run_guarded(main))
"""


@pytest.mark.parametrize("path,message", [("0", "NCCL: no progress for 10 s"),
                                          ("1", "peer exchange: no word from a peer for 10 s")])
def test_a_stuck_peer_ends_the_job_with_a_clear_message_within_the_timeout(path, message):
    """Through NCCL (its watchdog aborts the communicator) and through the peer-memory
    exchange (its kernel waits for the others until a deadline)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = run([*mpirun(2), sys.executable, "-c", SILENT_PEER], timeout=100,
                 env={"STAR_ENGINE_NCCL_TIMEOUT": "10", "STAR_ENGINE_PEER_GATHER": path})
    assert result.returncode != 0
    assert f"rank 0: {message}" in result.stderr, result.stderr[-4000:]
    assert "rank 1 did not answer" in result.stderr


STALLED_REPLAY = """
import sys, torch
from star_engine.attention.dense import DenseAttention
from star_engine.checkpoint import load_model
from star_engine.comm import NcclCommunicator
from star_engine.launch.launcher import init_distributed
from star_engine.launch.ending import run_guarded
from star_engine.launch.devices import select_device
from star_engine.engine import Engine
from star_engine.settings import KVCacheSettings

def stalled_when_captured(broadcast):
    def stalled(self, tensor, root):
        if torch.cuda.is_current_stream_capturing():
            torch.cuda._sleep(300 * 2_000_000_000)  # a collective whose peer stopped: minutes
        return broadcast(self, tensor, root)
    return stalled

def main():
    dist = init_distributed()
    device = select_device("cuda", dist)
    comm = NcclCommunicator(dist, device)
    engine = Engine(load_model(sys.argv[1], torch.bfloat16, device), DenseAttention(dist, comm), comm, dist,
                    KVCacheSettings(512))
    NcclCommunicator.broadcast = stalled_when_captured(NcclCommunicator.broadcast)
    ids = torch.arange(100) % 300
    print("decoding", flush=True)
    engine.generate(ids[:90], ids[90:], 8, stop_at_eos=False)
    return 0
raise SystemExit(run_guarded(main))
"""


def test_a_replayed_decode_step_that_never_completes_ends_the_job_within_the_timeout(tmp_path):
    """Every decode step after the first is a CUDA graph replay, whose collectives the
    watchdog never sees enqueued: the wait for it is what is bounded. Here the graph holds
    a kernel that runs for minutes, as a collective does whose peer stopped."""
    import time

    from tests.reference import make_tiny_checkpoint

    checkpoint = make_tiny_checkpoint(tmp_path, hidden_size=256, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=512)
    start = time.monotonic()
    result = run([sys.executable, "-c", STALLED_REPLAY, str(checkpoint)], timeout=120,
                 env={"STAR_ENGINE_NCCL_TIMEOUT": "5"})
    assert "decoding" in result.stdout, result.stderr[-4000:]
    assert result.returncode == 1
    assert ("star_engine: rank 0: NCCL: no progress for 5 s: decode step 2 of 1 row (replayed from its CUDA "
            "graph) did not complete") in result.stderr, result.stderr[-4000:]
    assert time.monotonic() - start < 60  # start-up, 5 s of waiting, and the exit: not the kernel's minutes


ONE_GPU_EACH = """
import torch
from star_engine.launch.launcher import init_distributed
from star_engine.launch.ending import run_guarded
from star_engine.launch.devices import select_device
def main():
    dist = init_distributed()
    device = select_device("cuda", dist)
    print(f"rank {dist.rank} sees {torch.cuda.device_count()}: {torch.cuda.get_device_properties(device).uuid}")
    return 0
raise SystemExit(run_guarded(main))
"""


@pytest.mark.parametrize("visible", ["$OMPI_COMM_WORLD_LOCAL_RANK", "0"])
def test_each_rank_takes_the_gpu_its_launcher_made_visible_and_never_shares_one(visible):
    """As srun --gpus-per-task=1 does, each rank is shown one GPU (its own, or, wrongly, the
    same one)."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    result = run([*mpirun(2), "sh", "-c", f'CUDA_VISIBLE_DEVICES={visible} exec "$0" -c "$1"', sys.executable,
                  ONE_GPU_EACH], timeout=120)
    if visible == "0":
        assert result.returncode != 0
        assert "ranks 0, 1 would share one GPU" in result.stderr, result.stderr[-4000:]
        return
    assert result.returncode == 0, result.stderr[-4000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert [line.split(":")[0] for line in lines] == ["rank 0 sees 1", "rank 1 sees 1"]
    assert lines[0].split(": ")[1] != lines[1].split(": ")[1]


def test_auto_scale_out_on_one_gpu_runs_each_request_on_its_one_host_as_dense(tmp_path):
    """One GPU is one host: every request on it, dense (exact), through the hand-out and the
    group's engine, decode replayed from CUDA graphs (bfloat16); the answers --attn dense
    gives, bit for bit (the same kernels)."""
    import json

    model = "llama-3.1-8b"  # random weights; head_dim 128: the decode kernel and its graphs
    requests = tmp_path / "in.jsonl"
    requests.write_text("".join(json.dumps({"id": f"r{i}", "context": "The code is 4417. " * (20 + 30 * i),
                                            "query": "What is the code?"}) + "\n" for i in range(5)))
    outputs = {}
    for name, flags in (("auto", ["--hosts-per-request", "auto", "--max-block", "256"]), ("dense", ["--attn", "dense"])):
        out = tmp_path / f"{name}.jsonl"
        result = run([sys.executable, "-m", "star_engine", "run", "--input", str(requests), "--output", str(out),
                      "--model", model, "--device", "cuda", "--max-tokens", "4096", "--max-new-tokens", "6",
                      *flags], timeout=300)
        assert result.returncode == 0, result.stderr[-4000:]
        outputs[name] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert {r["id"]: r["output"] for r in outputs["auto"].values()} == \
        {r["id"]: r["output"] for r in outputs["dense"].values()}
    assert all(r["hosts"] == [0] for r in outputs["auto"].values())
