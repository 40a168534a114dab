"""star_engine under Slurm, on the local cluster that tests/slurm/cluster.sh starts (partition
`one`: one node of 4 CPUs; partition `two`: two nodes of 2 CPUs on this host): srun with and
without an MPI plugin, the job scripts of examples/slurm/ through sbatch, one node and two,
and a job stopped by SIGTERM that goes on where it stopped."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from star_engine.costs import Calibration
from tests.jobs import ALL_HOSTS, TINY, good, read_jsonl, write_jsonl
from tests.launcher import ROOT, mpirun, run, start
from tests.test_errors import errors_before_the_work
from tests.test_distributed import FAILING_RANK
from tests.test_scale_out import mixed_requests

CLUSTER_DIR = Path(os.environ.get("STAR_SLURM_DIR", "/tmp/star_engine-slurm"))
SCRIPTS = ROOT / "examples" / "slurm"


@pytest.fixture(scope="module")
def slurm() -> dict[str, str]:
    """The environment of the local cluster's jobs, or a skip that says why there is none."""
    env = {"SLURM_CONF": os.environ.get("SLURM_CONF") or str(CLUSTER_DIR / "slurm.conf"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           # Open MPI's PMIx client: quiet, and speaking what Slurm's PMIx server knows.
           "PMIX_MCA_psec": "native", "PMIX_MCA_gds": "hash"}
    start_one = "start one with `tests/slurm/cluster.sh up` (Debian, as root)"
    if shutil.which("srun") is None:
        pytest.skip(f"no Slurm here (no srun): {start_one}")
    if not Path(env["SLURM_CONF"]).exists():
        pytest.skip(f"no Slurm cluster ({env['SLURM_CONF']} does not exist): {start_one}")
    try:
        partitions = run(["sinfo", "-h", "-o", "%P"], timeout=10, env=env).stdout.split()
    except subprocess.TimeoutExpired:
        pytest.skip(f"the Slurm cluster of {env['SLURM_CONF']} does not answer: {start_one}")
    if not {"one*", "two"} <= set(partitions):
        pytest.skip(f"{env['SLURM_CONF']} is not the test cluster (partitions {partitions}): {start_one}")
    return env


def srun(args: list[str], slurm: dict[str, str], timeout: float = 300, **env: str) -> subprocess.CompletedProcess:
    return run(["srun", *args], timeout=timeout, env={**slurm, **env})


def requests_file(directory: Path, count: int, context_len: int = 300) -> Path:
    return write_jsonl(directory / "requests.jsonl", [good(f"r{i}", context_len) for i in range(count)])


def test_srun_with_pmix_answers_as_mpirun_does(tmp_path, slurm):
    requests = requests_file(tmp_path, 3)
    by_mpirun = run([*mpirun(4), sys.executable, "-m", "star_engine", "run", "--input", str(requests),
                     "--output", str(tmp_path / "mpirun.jsonl"), *TINY], timeout=300)
    assert by_mpirun.returncode == 0, by_mpirun.stderr
    by_srun = srun(["--mpi=pmix", "-p", "one", "-n", "4", sys.executable, "-m", "star_engine", "run", "--input",
                    str(requests), "--output", str(tmp_path / "srun.jsonl"), *TINY], slurm)
    assert by_srun.returncode == 0, by_srun.stderr
    assert "on 4 ranks (1 node)" in by_srun.stderr
    assert "find-available" not in by_srun.stderr  # PMIx's notices are silenced
    assert _answers(tmp_path / "srun.jsonl") == _answers(tmp_path / "mpirun.jsonl")


def on_one_node_and_on_two(run_it: list[str], tmp_path: Path, slurm: dict[str, str]) -> subprocess.CompletedProcess:
    """`run_it` on 4 ranks of one node (mpirun, into one.jsonl) and of two nodes (srun, two
    ranks each, over TCP, into two.jsonl); the second's result. Both must succeed."""
    one_node = run([*mpirun(4), *run_it, "--output", str(tmp_path / "one.jsonl")], timeout=300)
    assert one_node.returncode == 0, one_node.stderr
    two_nodes = srun(["--mpi=pmix", "-p", "two", "--ntasks-per-node=2", "-n", "4", *run_it,
                      "--output", str(tmp_path / "two.jsonl")], slurm, OMPI_MCA_btl="self,tcp")
    assert two_nodes.returncode == 0, two_nodes.stderr
    return two_nodes


def test_hosts_of_two_ranks_on_each_of_two_nodes_answer_as_on_one_node_and_a_host_across_nodes_is_refused(
        tmp_path, slurm):
    """--tp 2 over the two nodes: each node one host (the model split in two), star across
    the hosts through the network, the answers of the same hosts on one node; a host that
    would span the nodes is refused."""
    requests = requests_file(tmp_path, 3)
    run_it = [sys.executable, "-m", "star_engine", "run", "--input", str(requests), "--model", "tiny",
              "--max-new-tokens", "12", "--tp", "2"]
    two_nodes = on_one_node_and_on_two(run_it, tmp_path, slurm)
    assert "on 4 ranks (2 nodes, 2 hosts of 2)" in two_nodes.stderr
    assert _answers(tmp_path / "two.jsonl") == _answers(tmp_path / "one.jsonl")
    across = srun(["--mpi=pmix", "-p", "two", "--ntasks-per-node=1", "-n", "2", *run_it,
                   "--output", str(tmp_path / "across.jsonl")], slurm, OMPI_MCA_btl="self,tcp")
    assert across.returncode == 2 and not (tmp_path / "across.jsonl").exists()
    assert across.stderr.count("host 0 (ranks 0-1) spans 2 nodes: the ranks of a host must share a node") == 1


def test_srun_without_an_mpi_plugin_stops_every_task_with_one_message(tmp_path, slurm):
    out = tmp_path / "out.jsonl"
    result = srun(["-p", "one", "-n", "4", sys.executable, "-m", "star_engine", "run", "--input",
                   str(requests_file(tmp_path, 2)), "--output", str(out), *TINY], slurm)
    assert result.returncode != 0
    assert result.stderr.count("srun started 4 tasks with no MPI plugin") == 1, result.stderr
    assert "srun --mpi=pmix" in result.stderr
    assert not out.exists()


def test_an_error_found_before_the_work_reaches_the_user_once_under_srun(tmp_path, slurm):
    """With --kill-on-bad-exit, as a careful job script asks: Slurm ends the step as soon as
    a task leaves with an error, rank 0's message still comes out, once."""
    for args, message in errors_before_the_work(tmp_path):
        result = srun(["--mpi=pmix", "--kill-on-bad-exit=1", "-p", "one", "-n", "2", sys.executable, "-m",
                       "star_engine", *args], slurm, timeout=120)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.count(message) == 1, (args, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_rank_that_raises_ends_the_step_promptly_with_its_message(slurm):
    begin = time.monotonic()
    result = srun(["--mpi=pmix", "-p", "one", "-n", "4", sys.executable, "-c", FAILING_RANK], slurm, timeout=120)
    assert result.returncode != 0
    assert "rank 1: RuntimeError: disk on fire" in result.stderr
    assert time.monotonic() - begin < 60


# --- The job scripts ---------------------------------------------------------------------

JOBS = {  # name: sbatch options, variables, arguments after the script
    "run": ([], {}, TINY),
    "run_nodes": (["-p", "two", "--ntasks-per-node=2"],
                  # Open MPI 4's shared-memory transport fails between two "nodes" of one host.
                  {"OMPI_MCA_btl": "self,tcp"}, TINY),
    "run_mpirun": ([], {}, TINY),
    "bench": ([], {"LENGTHS": "256,512", "OUTPUT": "bench.json"}, ["--query-tokens", "8", "--max-new-tokens", "2"]),
}


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """Every job script of examples/slurm/, submitted at once with `sbatch --wait`, each in a
    directory of its own with the same requests: its result and its directory."""
    waiting = {}
    for name, (options, variables, args) in JOBS.items():
        directory = tmp_path_factory.mktemp(name)
        requests_file(directory, 3)
        env = {**slurm, "MODEL": "tiny", "INPUT": "requests.jsonl", "OUTPUT": "out.jsonl", **variables}
        waiting[name] = (start(["sbatch", "--wait", *options, str(SCRIPTS / f"{name}.sbatch"), *args],
                               cwd=directory, env=env), directory)
    done = {}
    for name, (job, directory) in waiting.items():
        stdout, stderr = job.communicate(timeout=600)
        done[name] = (subprocess.CompletedProcess(job.args, job.returncode, stdout, stderr), directory)
    return done


def _log(directory: Path) -> str:
    return "".join(path.read_text() for path in sorted(directory.glob("star_engine*.out")))


def _answers(path: Path) -> dict[str, str]:
    records = read_jsonl(path)
    assert all(r["error"] is None for r in records)
    return {r["id"]: r["output"] for r in records}


def test_the_one_node_job_script_answers_every_request(jobs):
    result, directory = jobs["run"]
    assert result.returncode == 0, result.stderr + _log(directory)
    assert "on 4 ranks (1 node)" in _log(directory)
    assert sorted(_answers(directory / "out.jsonl")) == ["r0", "r1", "r2"]


def test_the_several_node_job_script_gives_the_one_node_answers_with_two_ranks_per_node(jobs):
    result, directory = jobs["run_nodes"]
    assert result.returncode == 0, result.stderr + _log(directory)
    assert "on 4 ranks (2 nodes)" in _log(directory)
    assert _answers(directory / "out.jsonl") == _answers(jobs["run"][1] / "out.jsonl")


def test_the_mpirun_job_script_gives_the_srun_answers(jobs):
    result, directory = jobs["run_mpirun"]
    assert result.returncode == 0, result.stderr + _log(directory)
    assert _answers(directory / "out.jsonl") == _answers(jobs["run"][1] / "out.jsonl")


def test_the_bench_job_script_measures_star_against_ring_and_records_the_mpi_world(jobs):
    result, directory = jobs["bench"]
    assert result.returncode == 0, result.stderr + _log(directory)
    saved = json.loads((directory / "bench.json").read_text())
    assert saved["ranks"] == 4 and saved["command"].startswith("srun --mpi=pmix -n 4 python -m star_engine bench")
    assert {(r["attn"], r["context"]) for r in saved["rows"]} == {(a, n) for a in ("star", "ring") for n in (256, 512)}
    assert "star a=1/8 balanced pw=1/2 +q at 512 tokens: over ring" in _log(directory)


# --- Stopped by Slurm, then going on -----------------------------------------------------

# Jobs stopped below run every request on every host (ALL_HOSTS): one stream of requests,
# so that a stop finds some unanswered.


class StoppableJob:
    """A job script answering 4 requests of a second or so each, in `directory`, that can
    be submitted and sent a signal, as Slurm does before a time limit, once it has answered
    one more request."""

    IDS = [f"r{i}" for i in range(4)]

    def __init__(self, script: str, directory: Path, slurm: dict[str, str]) -> None:
        write_jsonl(directory / "requests.jsonl", [good(rid, 1500) for rid in self.IDS])
        self.script, self.directory, self.slurm = script, directory, slurm
        self.out = directory / "out.jsonl"
        self.env = {**slurm, "MODEL": "tiny", "INPUT": "requests.jsonl", "OUTPUT": "out.jsonl"}

    def answered(self) -> list[str]:
        return [r["id"] for r in read_jsonl(self.out)] if self.out.exists() else []

    def submit_and_stop(self, scancel: list[str], *options: str, run_flags: tuple[str, ...] = ()) -> str:
        before = len(self.answered())
        job = run(["sbatch", "--parsable", *options, str(SCRIPTS / self.script), "--max-new-tokens", "600",
                   *run_flags], timeout=30, cwd=self.directory, env=self.env)
        assert job.returncode == 0, job.stderr
        job_id = job.stdout.strip()
        _wait_for(lambda: len(self.answered()) > before, f"job {job_id}'s answer")
        assert run(["scancel", *scancel, job_id], timeout=30, env=self.slurm).returncode == 0
        return job_id

    def goes_on_once_requeued(self, job_id: str) -> None:
        _wait_for(lambda: _job(job_id, self.slurm).get("Restarts") == "1", f"job {job_id} to be requeued")
        state = _wait_for(lambda: _finished(_job(job_id, self.slurm)), f"requeued job {job_id} to end", seconds=300)
        assert state["JobState"] == "COMPLETED", state
        assert sorted(self.answered()) == self.IDS  # every id exactly once


def test_a_job_stopped_by_sigterm_goes_on_where_it_stopped_resubmitted_or_requeued(tmp_path, slurm):
    job = StoppableJob("run.sbatch", tmp_path, slurm)
    # Not requeueable: the job ends, non-zero; the same script submitted again goes on.
    first = job.submit_and_stop(["--signal=TERM"], "--no-requeue", run_flags=ALL_HOSTS)
    state = _wait_for(lambda: _finished(_job(first, slurm)), f"job {first} to end")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "143:0", state
    stopped = job.answered()
    assert 1 <= len(stopped) < len(job.IDS) and len(set(stopped)) == len(stopped)
    assert "SIGTERM on a rank: stopped after" in _log(tmp_path)
    # Requeueable (the script's default): the job puts itself back in the queue and ends the work.
    job.goes_on_once_requeued(job.submit_and_stop(["--signal=TERM"], run_flags=ALL_HOSTS))


def test_an_auto_scaled_job_across_two_nodes_answers_as_under_mpirun_and_goes_on_once_requeued(tmp_path, slurm):
    """Each request on the group of hosts its context needs, groups within and across the
    nodes; stopped and requeued, the job answers every id once."""
    requests = write_jsonl(tmp_path / "mixed.jsonl", mixed_requests(12))
    on_one_node_and_on_two([sys.executable, "-m", "star_engine", "run", "--input", str(requests), *TINY,
                            "--hosts-per-request", "auto", "--max-block", "256"], tmp_path, slurm)
    # Which group of a size takes a request depends on timing; its size and answer do not.
    answers = {r["id"]: (len(r["hosts"]), r["output"]) for r in read_jsonl(tmp_path / "two.jsonl")}
    assert answers == {r["id"]: (len(r["hosts"]), r["output"]) for r in read_jsonl(tmp_path / "one.jsonl")}
    assert {size for size, _ in answers.values()} == {1, 2, 4}
    (tmp_path / "requeued").mkdir()
    job = StoppableJob("run.sbatch", tmp_path / "requeued", slurm)  # two groups of two hosts at once
    job.goes_on_once_requeued(job.submit_and_stop(["--signal=TERM"], run_flags=("--hosts-per-request", "auto",
                                                                                 "--max-block", "1024")))


def test_the_mpirun_job_script_passes_the_notice_on_to_the_ranks_and_goes_on(tmp_path, slurm):
    """Its notice goes to the batch script (--signal=B:USR1@120), which hands it to mpirun."""
    job = StoppableJob("run_mpirun.sbatch", tmp_path, slurm)
    job.goes_on_once_requeued(job.submit_and_stop(["--batch", "--signal=USR1"], run_flags=ALL_HOSTS))
    assert "SIGUSR1 on a rank: stopped after" in _log(tmp_path)


def test_a_request_that_never_finishes_before_the_notice_is_given_up_and_requeueing_ends(tmp_path, slurm):
    """A request left unfinished at two stops in a row gets its error record; the job script
    requeues itself at most MAX_REQUEUES times and then says so; submitted again, it answers
    the rest without trying the request a third time."""
    write_jsonl(tmp_path / "requests.jsonl", [good("slow", 1500, max_new_tokens=14000), good("quick1"),
                                              good("quick2")])
    env = {**slurm, "MODEL": "tiny", "INPUT": "requests.jsonl", "OUTPUT": "out.jsonl", "MAX_REQUEUES": "1",
           "STAR_ENGINE_STOP_GRACE": "1"}
    job = run(["sbatch", "--parsable", str(SCRIPTS / "run.sbatch"), *ALL_HOSTS], timeout=30, cwd=tmp_path, env=env)
    assert job.returncode == 0, job.stderr
    job_id = job.stdout.strip()
    for runs in (1, 2):  # stopped each time "slow" is in hand, as by a notice before the time limit
        _wait_for(lambda: _log(tmp_path).count('"slow": 1530 context + ') == runs, f"run {runs} to take up slow")
        assert run(["scancel", "--signal=TERM", job_id], timeout=30, env=slurm).returncode == 0
        if runs == 1:
            _wait_for(lambda: _job(job_id, slurm).get("Restarts") == "1", f"job {job_id} to be requeued")
    state = _wait_for(lambda: _finished(_job(job_id, slurm)), f"job {job_id} to end")
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "143:0" and state["Restarts"] == "1", state
    log = _log(tmp_path)
    assert "not requeued: SLURM_RESTART_COUNT=1 reached MAX_REQUEUES=1" in log
    assert [(r["id"], r["error"]) for r in read_jsonl(tmp_path / "out.jsonl")] == [
        ("slow", "not finished in two runs of the job: raise the time limit")]

    again = run(["sbatch", "--wait", str(SCRIPTS / "run.sbatch"), *ALL_HOSTS], timeout=300, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr + _log(tmp_path)
    records = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in records] == ["slow", "quick1", "quick2"]
    assert records[1]["error"] is None and records[2]["error"] is None


def _job(job_id: str, slurm: dict[str, str]) -> dict[str, str]:
    line = run(["scontrol", "show", "job", "-o", job_id], timeout=30, env=slurm).stdout
    return dict(field.split("=", 1) for field in line.split() if "=" in field)


def _finished(state: dict[str, str]) -> dict[str, str] | None:
    return state if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT") else None


def _wait_for(condition, what: str, seconds: float = 180):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"waited {seconds:g} s for {what}")


@pytest.mark.alone
def test_a_calibration_across_two_nodes_measures_the_network_and_keeps_the_one_node_link(tmp_path, slurm):
    out = tmp_path / "cpu.json"
    calibrate = [sys.executable, "-m", "star_engine", "plan", "--calibrate", "--model", "tiny", "--output", str(out)]
    one_node = run([*mpirun(2), *calibrate], timeout=300)
    assert one_node.returncode == 0, one_node.stderr
    assert Calibration.load(out).network_bandwidth_Bps is None
    two_nodes = srun(["--mpi=pmix", "-p", "two", "--ntasks-per-node=1", "-n", "2", *calibrate], slurm,
                     OMPI_MCA_btl="self,tcp")
    assert two_nodes.returncode == 0, two_nodes.stderr
    assert "kept from" in two_nodes.stderr and "link_bandwidth_Bps" in two_nodes.stderr
    both = Calibration.load(out)
    assert "(2 nodes)" in both.source
    for rate in (both.link_bandwidth_Bps, both.gather_merge_s_per_layer, both.network_bandwidth_Bps,
                 both.network_gather_merge_s_per_layer):
        assert rate is not None and rate > 0
