"""Reading the job's shape from launcher variables, and the rendezvous file."""

from __future__ import annotations

import os
import stat
import threading
import time

import pytest

from simvue.topology import Topology, detect
from simvue.transport import rendezvous
from simvue.transport.rendezvous import AggregatorAddress


def test_no_launcher_is_a_single_process():
    topo = detect({})
    assert (topo.rank, topo.size, topo.is_mpi) == (0, 1, False)


def test_mpich_hydra_variables():
    topo = detect({"PMI_RANK": "3", "PMI_SIZE": "4", "MPI_LOCALRANKID": "3", "MPI_LOCALNRANKS": "4"})
    assert (topo.rank, topo.size, topo.local_rank, topo.launcher) == (3, 4, 3, "mpich")
    assert topo.is_mpi and topo.single_node
    assert topo.job_id.startswith("mpich-")  # Hydra exports no job id: the shared parent stands in


def test_open_mpi_with_pmix_namespace():
    env = {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
           "OMPI_COMM_WORLD_LOCAL_SIZE": "4", "PMIX_RANK": "1", "PMIX_NAMESPACE": "prterun-n1-123@1"}
    topo = detect(env)
    assert (topo.rank, topo.size, topo.launcher, topo.job_id) == (1, 8, "openmpi", "pmix-prterun-n1-123@1")
    assert not topo.single_node


def test_slurm_step_but_not_a_bare_batch_script():
    step = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "42",
            "SLURM_STEP_ID": "0"}
    assert detect(step).job_id == "slurm-42.0"
    batch = {k: v for k, v in step.items() if k != "SLURM_STEP_ID"}
    assert detect(batch).is_mpi is False


@pytest.mark.parametrize("tasks_per_node, node_id, local_size", [
    ("4", "0", 4),  # srun -n 4 on one node
    ("2(x2)", "1", 2),  # srun -N 2 -n 4
    ("3,1", "1", 1),  # srun -N 2 -n 4 with an uneven split
    ("2(x3),1", "2", 2),
    ("bad", "0", 4),  # unreadable: the step's size, as before
])
def test_a_slurm_step_over_several_nodes_is_not_single_node(tasks_per_node, node_id, local_size):
    """srun sets SLURM_NTASKS_PER_NODE only when asked (--ntasks-per-node): without it a
    multi-node step must still be seen as one, or rank 0 would listen on loopback only."""
    step = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "1", "SLURM_NTASKS": "4",
            "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": tasks_per_node, "SLURM_NODEID": node_id}
    topology = detect(step)
    assert topology.local_size == local_size
    assert topology.single_node == (local_size == 4)


def test_garbage_values_fall_back_to_a_single_process():
    assert detect({"PMI_RANK": "x", "PMI_SIZE": "4"}).size == 1
    assert detect({"PMI_RANK": "7", "PMI_SIZE": "4"}).size == 1


def test_mpiexec_n_1_is_not_a_multi_rank_job():
    assert detect({"PMI_RANK": "0", "PMI_SIZE": "1"}).is_mpi is False


def test_rendezvous_file_is_private_and_found_by_a_waiting_rank(tmp_path, monkeypatch):
    monkeypatch.setenv("SIMVUE_RENDEZVOUS_DIR", str(tmp_path / "rv"))
    topo = Topology(rank=0, size=2, launcher="mpich", job_id="mpich-h-1-2")
    path = rendezvous.file_for(topo, 1)
    address = AggregatorAddress(address="tcp://127.0.0.1:5555", key=b"k" * 32, run_name="r", run_id="i",
                                started=1.0, pid=1)
    found = []
    waiter = threading.Thread(target=lambda: found.append(rendezvous.find_file(path, timeout_s=10)))
    waiter.start()
    time.sleep(0.1)
    rendezvous.publish_file(path, address)
    waiter.join(10)
    assert found == [address]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert rendezvous.file_for(topo, 2) != path  # the second run of the job has its own file


def test_finding_no_rendezvous_file_gives_up_in_bounded_time(tmp_path):
    started = time.monotonic()
    assert rendezvous.find_file(tmp_path / "never.json", timeout_s=0.3) is None
    assert time.monotonic() - started < 2.0


def test_a_process_never_joins_the_run_it_exported_itself(monkeypatch):
    address = AggregatorAddress(address="tcp://127.0.0.1:1", key=b"k" * 32, pid=os.getpid())
    rendezvous.export(address)
    try:
        assert rendezvous.inherited() is None
    finally:
        rendezvous.export(None)
    monkeypatch.setenv(rendezvous.INHERITED_ENV, AggregatorAddress(address="tcp://x:1", key=b"k", pid=-5).to_json())
    assert rendezvous.inherited().address == "tcp://x:1"


def _address(port: int = 5555) -> AggregatorAddress:
    return AggregatorAddress(address=f"tcp://127.0.0.1:{port}", key=b"k" * 32, run_name="r", run_id="i", started=1.0,
                             pid=1)


def test_a_rendezvous_directory_others_can_write_is_refused_by_writer_and_readers(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    path = shared / "job.1.json"
    with pytest.raises(rendezvous.RendezvousRefused, match="can be written by other users"):
        rendezvous.publish_file(path, _address())
    assert not path.exists()
    path.write_text(_address().to_json())
    os.chmod(path, 0o600)
    with pytest.raises(rendezvous.RendezvousRefused, match="can be written by other users"):
        rendezvous.find_file(path, timeout_s=5)


def test_a_rendezvous_file_readable_by_others_or_a_symlink_is_refused(tmp_path):
    private = tmp_path / "rv"
    private.mkdir(mode=0o700)
    loose = private / "loose.json"
    loose.write_text(_address().to_json())
    os.chmod(loose, 0o644)
    with pytest.raises(rendezvous.RendezvousRefused, match="only you can read"):
        rendezvous.find_file(loose, timeout_s=5)
    link = private / "link.json"
    link.symlink_to(loose)
    with pytest.raises(rendezvous.RendezvousRefused, match="symbolic link"):
        rendezvous.find_file(link, timeout_s=5)


@pytest.mark.skipif(os.geteuid() != 0, reason="planting a file owned by another user needs root")
def test_a_rendezvous_file_planted_by_another_user_is_refused(tmp_path):
    private = tmp_path / "rv"
    private.mkdir(mode=0o700)
    planted = private / "job.1.json"
    planted.write_text(_address(6666).to_json())
    os.chmod(planted, 0o600)
    os.chown(planted, 65534, 65534)
    with pytest.raises(rendezvous.RendezvousRefused, match="belongs to user id 65534"):
        rendezvous.find_file(planted, timeout_s=5)
    os.chown(private, 65534, 65534)
    with pytest.raises(rendezvous.RendezvousRefused, match="belongs to user id 65534"):
        rendezvous.publish_file(private / "job.2.json", _address())


@pytest.mark.parametrize("launcher_env, library", [
    ({"PMI_RANK": "0", "PMI_SIZE": "2"}, "mpich "),  # mpiexec: the MPI wheel beside us
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}, None),
    ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0", "SLURM_PROCID": "0", "SLURM_NTASKS": "2",
      "SLURM_MPI_TYPE": "pmix"}, "slurm mpi=pmix"),
    ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1"}, None),
])
def test_the_mpi_library_is_named_only_when_the_launcher_is_an_mpi_one(monkeypatch, launcher_env, library):
    """srun and torchrun start processes that may use no MPI: an MPI wheel installed beside
    simvue says nothing about them."""
    from simvue.resources.facts import mpi_library

    for name in [k for k in os.environ if k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_", "MPI_LOCAL"))]:
        monkeypatch.delenv(name)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "TORCHELASTIC_RUN_ID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in launcher_env.items():
        monkeypatch.setenv(name, value)
    found = mpi_library()
    assert found is not None and found["size"] == 2
    if library is None:
        assert "library" not in found, found
    else:
        assert found["library"].startswith(library), found


def test_runs_of_a_slurm_job_array_are_named_after_their_task_unless_named():
    from simvue.names import default_name

    array = {"SLURM_ARRAY_JOB_ID": "900", "SLURM_CLUSTER_NAME": "c1"}
    names = [default_name({**array, "SLURM_ARRAY_TASK_ID": str(task)}) for task in (0, 1, 2)]
    base = names[0].rsplit("-", 1)[0]
    assert names == [f"{base}-0", f"{base}-1", f"{base}-2"]  # one sweep, one base
    other = default_name({**array, "SLURM_ARRAY_JOB_ID": "901", "SLURM_ARRAY_TASK_ID": "0"})
    assert other.endswith("-0")
    assert len(default_name({}).split("-")) == 2  # outside an array: adjective-noun
