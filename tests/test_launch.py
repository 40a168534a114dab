"""How a job is launched: a launch that MPI would split into one-rank jobs is refused, and
each rank takes the GPU the launcher made visible to it, never one another rank has."""

from __future__ import annotations

import sys

import pytest

from star_engine.launch.devices import check_gpus_not_shared, gpu_index
from star_engine.launch.launcher import launcher_size, split_launch_error
from tests.launcher import run

OPEN_MPI = "Open MPI v4.1.8, package: Open MPI"
MPICH = "MPICH Version: 4.2.0"
SRUN_4 = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "0"}


def test_srun_without_an_mpi_plugin_is_refused_before_open_mpi_starts():
    message = split_launch_error(SRUN_4, OPEN_MPI, world=None)
    assert message is not None
    assert "srun started 4 tasks with no MPI plugin" in message
    for advice in ("srun --mpi=pmix", "--mpi=pmi2", "srun --mpi=list", "SLURM_MPI_TYPE", "MpiDefault"):
        assert advice in message


@pytest.mark.parametrize("process_manager", [{"PMIX_RANK": "0"}, {"PMI_RANK": "0", "PMI_FD": "11"}])
def test_srun_with_an_mpi_plugin_starts(process_manager):
    assert split_launch_error({**SRUN_4, **process_manager}, OPEN_MPI, world=None) is None
    assert split_launch_error({**SRUN_4, **process_manager}, OPEN_MPI, world=4) is None


def test_other_mpis_may_use_slurms_own_pmi_so_only_their_world_tells():
    assert split_launch_error(SRUN_4, MPICH, world=None) is None
    assert split_launch_error(SRUN_4, MPICH, world=4) is None
    message = split_launch_error(SRUN_4, MPICH, world=1)
    assert message is not None and "srun started 4 tasks, but MPI counts 1" in message
    assert "srun --mpi=pmix" in message


def test_a_world_smaller_than_the_launchers_count_is_refused_whatever_the_launcher():
    message = split_launch_error({"PMI_SIZE": "2", "PMI_RANK": "1"}, MPICH, world=1)
    assert message is not None and "(PMI_SIZE=2), but MPI counts 1" in message
    assert "mpi4py.get_config()" in message


def test_mpirun_inside_an_allocation_counts_its_own_processes_not_slurms():
    # mpirun starts its daemons as a Slurm step of one task per node; its ranks inherit that.
    env = {"OMPI_COMM_WORLD_SIZE": "8", "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "0"}
    assert launcher_size(env) == (8, "OMPI_COMM_WORLD_SIZE")
    assert split_launch_error(env, OPEN_MPI, world=None) is None
    assert split_launch_error(env, OPEN_MPI, world=8) is None


def test_a_process_started_alone_is_one_rank():
    assert launcher_size({}) is None
    assert split_launch_error({}, OPEN_MPI, world=None) is None
    assert split_launch_error({}, OPEN_MPI, world=1) is None


def test_a_split_job_stops_before_writing_anything_and_only_its_first_rank_says_why(tmp_path):
    requests = tmp_path / "in.jsonl"
    requests.write_text('{"id": "a", "context": "c", "query": "q"}\n')
    out = tmp_path / "out.jsonl"
    stderr = []
    for rank in range(2):  # two processes a launcher meant as one job, each alone in its MPI world
        result = run([sys.executable, "-m", "star_engine", "run", "--model", "tiny", "--input", str(requests),
                      "--output", str(out)], timeout=120, env={"PMI_SIZE": "2", "PMI_RANK": str(rank)})
        assert result.returncode == 2
        stderr.append(result.stderr)
    assert "the launcher started 2 processes (PMI_SIZE=2), but MPI counts 1" in stderr[0]
    assert stderr[1] == ""
    assert not out.exists()


# --- GPUs --------------------------------------------------------------------------------

def test_a_task_that_sees_one_gpu_uses_it():
    # srun --gpus-per-task=1 or --gpu-bind: CUDA_VISIBLE_DEVICES names one GPU per task.
    assert [gpu_index(1, local_rank, 4) for local_rank in range(4)] == [0, 0, 0, 0]


def test_ranks_that_see_the_nodes_gpus_deal_them_out_by_node_local_rank():
    assert [gpu_index(4, local_rank, 4) for local_rank in range(4)] == [0, 1, 2, 3]
    assert [gpu_index(8, local_rank, 2) for local_rank in range(2)] == [0, 1]


def test_more_ranks_than_visible_gpus_is_refused():
    with pytest.raises(ValueError, match="4 ranks on this node see 2 GPUs each"):
        gpu_index(2, 0, 4)


class _Ranks:
    """Stands in for a Dist whose ranks hold `gpus`."""

    def __init__(self, gpus: list[str]) -> None:
        self.gpus = gpus

    def allgather(self, _mine: str) -> list[str]:
        return self.gpus


def test_two_ranks_on_one_gpu_are_refused_unless_asked_for(monkeypatch):
    shared = _Ranks(["node1:GPU-a", "node1:GPU-b", "node2:GPU-a", "node1:GPU-a"])
    with pytest.raises(ValueError, match="ranks 0, 3 would share one GPU"):
        check_gpus_not_shared(shared, "node1:GPU-a")
    monkeypatch.setenv("STAR_ENGINE_SHARE_GPUS", "1")
    check_gpus_not_shared(shared, "node1:GPU-a")


def test_one_gpu_per_rank_is_not_sharing():
    check_gpus_not_shared(_Ranks(["node1:GPU-a", "node1:GPU-b", "node2:GPU-c"]), "node1:GPU-a")
