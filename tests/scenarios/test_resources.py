"""Resource sampling: real processes sampled by the real sampler process, read back from the
store.  GPUs are covered in test_resources_gpu.py; MPI in tests/mpi/test_mpi_resources.py."""

from __future__ import annotations

import os
import socket
import sys
import textwrap
import time
from collections import deque

import psutil
import pytest

from simvue import Run
from simvue.abort import AbortSignal
from simvue.config import Settings
from simvue.errors import SimvueTypeError, SimvueValueError
from simvue.losses import LossCounter
from simvue.resources import NodeSampler, Proc, SamplingRole, node_name
from simvue.transport.sender import Sender
from simvue.transport.spill import SpillFile

from conftest import read_run, run_script

HOST = node_name(socket.gethostname())


def _series(run: dict, name: str) -> list[list[float]]:
    return run["metrics"].get(name, [])


def _values(run: dict, name: str) -> list[float]:
    return [point[2] for point in _series(run, name)]


# -- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, interval",
    [
        ({}, 30.0),
        ({"resources_metrics_interval": 5}, 5.0),
        ({"resources_metrics_interval": None}, 0.0),
        ({"resources_metrics_interval": 0}, 0.0),
        ({"resources_metrics_interval": 0.2}, 1.0),  # the minimum honoured
        ({"system_metrics_interval": -1}, 30.0),
        ({"system_metrics_interval": 12}, 12.0),
        ({"disable_resources_metrics": True}, 0.0),
        ({"disable_resources_metrics": False}, 30.0),
        ({"log_hardware": True, "hardware_interval": 10}, 10.0),
        ({"log_hardware": False, "hardware_interval": 30}, 0.0),  # the switch wins
        ({"hardware_interval": 10, "log_hardware": False}, 0.0),
    ],
)
def test_every_name_for_the_interval_sets_one_setting(options, interval):
    assert Settings().replace(**options).resources_interval_s == interval


@pytest.mark.parametrize("options", [{"resources_metrics_interval": -3}, {"resources_metrics_interval": "10"}, {"log_hardware": 1}])
def test_bad_intervals_are_clear_errors(options):
    run = Run()
    run.config(suppress_errors=False)
    with pytest.raises(SimvueTypeError if "log_hardware" in options else SimvueValueError):
        run.config(**options)


def test_the_environment_sets_or_disables_sampling(monkeypatch):
    from simvue.config import from_environment

    monkeypatch.setenv("SIMVUE_RESOURCES_INTERVAL_S", "2")
    assert from_environment().resources_interval_s == 2.0
    monkeypatch.setenv("SIMVUE_DISABLE_SYSTEM_METRICS", "true")
    assert from_environment().resources_interval_s == 0.0


# -- what is sampled ------------------------------------------------------------------------


def test_a_single_process_run_gets_the_plain_simvue_names_and_node_series(store_dir):
    result = run_script(textwrap.dedent("""
        import time
        from simvue import Run
        with Run() as run:
            run.config(resources_metrics_interval=1)
            run.init(name="plain")
            end = time.time() + 2.2
            while time.time() < end:
                pass  # busy: the process's CPU must show it
    """))
    assert result.returncode == 0, result.stderr
    assert "simvue:" not in result.stderr
    run = read_run(store_dir, "plain")
    for name in ("cpu.usage.percentage", "cpu.usage.memory", "memory.usage", "threads"):
        assert len(_series(run, f"resources/{name}")) >= 3, name
    assert _values(run, "resources/memory.usage") == _values(run, "resources/cpu.usage.memory")
    # Busy for the whole run: the samples after the first are near one full core (the
    # machine may be shared, so the median is checked, not each one).
    cpu = sorted(_values(run, "resources/cpu.usage.percentage")[1:])
    assert cpu[len(cpu) // 2] > 50, cpu
    assert all(10 < v < 2000 for v in _values(run, "resources/memory.usage"))
    for name in ("memory.usage", "memory.available", "cpu.usage.percentage", "load.average"):
        assert _series(run, f"resources/node/{HOST}/{name}"), name
    total = psutil.virtual_memory().total / 2**20
    assert all(0 < v < total for v in _values(run, f"resources/node/{HOST}/memory.usage"))
    assert not [name for name in run["metrics"] if name.startswith("resources/main/")]
    # Steps count the samples; time is seconds since the run started.
    series = _series(run, "resources/memory.usage")
    assert [p[0] for p in series] == list(range(len(series)))
    assert series[0][1] < 1.0
    hosts = run["metadata"]["simvue"]["hosts"]
    assert hosts[HOST]["cpus"] == psutil.cpu_count()
    assert hosts[HOST]["memory_total_mb"] == pytest.approx(total, rel=0.01)
    assert hosts[HOST]["mpi"] is None and hosts[HOST]["gpus"] == []


def test_samples_keep_the_interval_and_close_is_not_held_up(store_dir):
    result = run_script(textwrap.dedent("""
        import time
        from simvue import Run
        run = Run()
        run.config(resources_metrics_interval=1)
        run.init(name="timing")
        time.sleep(3.5)
        start = time.monotonic()
        run.close()
        print(time.monotonic() - start)
    """))
    assert result.returncode == 0, result.stderr
    close_s = float(result.stdout.strip())
    times = [p[1] for p in _series(read_run(store_dir, "timing"), f"resources/node/{HOST}/memory.usage")]
    # One at the start, one a second (t = 0, 1, 2, 3), one at close (about 3.5).
    assert 5 <= len(times) <= 6, times
    gaps = [b - a for a, b in zip(times, times[1:-1])]
    assert all(0.8 < gap < 1.3 for gap in gaps), gaps
    assert times[-1] - times[-2] < 1.0
    assert close_s < 1.0


def test_a_long_interval_still_gives_a_first_and_a_last_sample(store_dir, monkeypatch):
    monkeypatch.delenv("SIMVUE_RESOURCES_INTERVAL_S")
    result = run_script(textwrap.dedent("""
        import time
        from simvue import Run
        with Run() as run:
            run.init(name="short")   # the default interval, 30 s
            time.sleep(0.5)
            start = time.monotonic()
        print(time.monotonic() - start)
    """))
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.strip()) < 2.0  # not one interval
    assert len(_series(read_run(store_dir, "short"), "resources/memory.usage")) == 2


def test_the_sampler_starts_after_init_returns_and_a_longer_run_still_has_its_series(store_dir):
    """``init`` does not start the sampler process: the aggregator's thread starts it
    ``SAMPLER_START_DELAY_S`` later (lengthened here, so that the check cannot race it).  A
    run lasting a few intervals then has its samples from then on, and a last one at close."""
    result = run_script(textwrap.dedent("""
        import time
        import psutil
        from simvue import Run
        from simvue.aggregator import service
        service.SAMPLER_START_DELAY_S = 1.0
        def samplers():
            return [p for p in psutil.Process().children() if "simvue.resources.agent" in " ".join(p.cmdline())]
        run = Run()
        run.config(resources_metrics_interval=1)
        run.init(name="later")
        print(len(samplers()))
        time.sleep(3.5)
        print(len(samplers()))
        run.close()
        print(len(samplers()))
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "1", "0"]
    run = read_run(store_dir, "later")
    times = [p[1] for p in _series(run, "resources/memory.usage")]
    # Started at about 1 s: samples then, one a second after it, and one at close (~3.5 s).
    assert len(times) >= 3, times
    assert 0.9 < times[0] < 2.5, times
    assert times[-1] > 3.0, times
    assert HOST in run["metadata"]["simvue"]["hosts"]


def test_a_run_that_ends_before_its_sampler_starts_has_no_series_and_loses_nothing(store_dir, monkeypatch):
    """A run closed within ``SAMPLER_START_DELAY_S`` of ``init`` starts no sampler process
    (nor waits for one at close), and everything it logged is stored."""
    from simvue.aggregator import service

    monkeypatch.setattr(service, "SAMPLER_START_DELAY_S", 60.0)  # surely longer than this run
    run = Run()
    run.config(resources_metrics_interval=1, suppress_errors=False)
    run.init(name="brief")
    for step in range(100):
        run.log_metrics({"x": float(step)})
    assert run.close() is True
    exported = read_run(store_dir, "brief")
    assert exported["status"] == "completed"
    assert [p[2] for p in exported["metrics"]["x"]] == [float(s) for s in range(100)]
    assert [name for name in exported["metrics"] if name.startswith("resources/")] == []
    assert "hosts" not in exported["metadata"].get("simvue", {})


def test_sampling_off_means_no_series_and_no_sampler_process(store_dir):
    result = run_script(textwrap.dedent("""
        import psutil
        from simvue import Run
        with Run() as run:
            run.config(disable_resources_metrics=True)
            run.init(name="off")
            run.log_metrics({"x": 1})
            print(len(psutil.Process().children()))
    """))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "0"
    run = read_run(store_dir, "off")
    assert [name for name in run["metrics"] if name.startswith("resources/")] == []
    assert "hosts" not in run["metadata"]["simvue"]


def test_a_busy_worker_and_a_200_mb_worker_are_told_apart(store_dir):
    result = run_script(textwrap.dedent("""
        import multiprocessing, time
        from simvue import Run

        def busy(run):
            run.log_metrics({"kind": 1})
            end = time.time() + 3
            while time.time() < end:
                pass

        def big(run):
            run.log_metrics({"kind": 2})
            block = bytearray(200 * 2**20)
            for i in range(0, len(block), 4096):
                block[i] = 1   # touch every page: resident
            time.sleep(3)

        if __name__ == "__main__":
            multiprocessing.set_start_method("fork")
            with Run() as run:
                run.config(resources_metrics_interval=1)
                run.init(name="pool")
                workers = [multiprocessing.Process(target=f, args=(run,)) for f in (busy, big)]
                for w in workers:
                    w.start()
                for w in workers:
                    w.join()
    """), timeout=60)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "pool")
    label = {int(_values(run, f"{w}/kind")[0]): w for w in ("worker0", "worker1")}
    busy, big = label[1], label[2]
    busy_cpu = _values(run, f"resources/{busy}/cpu.usage.percentage")
    big_cpu = _values(run, f"resources/{big}/cpu.usage.percentage")
    assert len(busy_cpu) >= 2 and len(big_cpu) >= 2
    assert max(busy_cpu[1:]) > 50 and max(busy_cpu[1:]) > 3 * max(big_cpu[1:]) + 5, (busy_cpu, big_cpu)
    big_rss = _values(run, f"resources/{big}/memory.usage")
    busy_rss = _values(run, f"resources/{busy}/memory.usage")
    assert max(big_rss) > 200 and max(big_rss) - max(busy_rss) > 180, (big_rss, busy_rss)
    # The plain names cover the whole pool (the parent and its workers).
    assert max(_values(run, "resources/memory.usage")) > 200


def test_a_child_process_counts_towards_the_process_that_started_it(store_dir):
    result = run_script(textwrap.dedent("""
        import subprocess, sys, time
        from simvue import Run
        with Run() as run:
            run.config(resources_metrics_interval=1)
            run.init(name="child")
            solver = subprocess.Popen([sys.executable, "-c",
                "b = bytearray(150 * 2**20)\\nfor i in range(0, len(b), 4096): b[i] = 1\\nimport time; time.sleep(3)"])
            time.sleep(2.5)
            solver.wait()
    """), timeout=60)
    assert result.returncode == 0, result.stderr
    assert max(_values(read_run(store_dir, "child"), "resources/memory.usage")) > 150


# -- the sampler itself ---------------------------------------------------------------------


def test_node_sampler_reads_real_processes_in_process():
    sampler = NodeSampler("node-a")
    me = os.getpid()
    sampler.set_processes([Proc("rank0", me)])
    first = sampler.sample()
    # This process and its descendants (pytest may have children of its own).
    assert first["resources/rank0/memory.usage"] >= 0.9 * psutil.Process().memory_info().rss / 2**20
    assert "resources/node/node-a/cpu.usage.percentage" not in first  # rates need two samples
    end = time.time() + 0.4
    while time.time() < end:
        pass
    second = sampler.sample()
    assert 50 < second["resources/rank0/cpu.usage.percentage"] < 150
    assert "resources/node/node-a/network.received" in second
    sampler.set_processes([Proc("rank0", me), Proc("rank1", 2**22 + 12345)])  # a pid that does not exist
    third = sampler.sample()
    assert "resources/rank0/threads" in third and not any(k.startswith("resources/rank1/") for k in third)


def test_a_sample_soon_after_the_previous_one_takes_its_rates_over_a_longer_span():
    """A process's last sample comes as it says goodbye, at any time after the previous one:
    a moment's work then (its exit) is not blown up into a figure for a whole interval."""
    sampler = NodeSampler("node-a")
    me = os.getpid()
    sampler.set_processes([Proc("rank0", me)])
    clock = 1000.0
    sampler.sample(clock)
    time.sleep(0.3)  # idle
    clock += 5.0
    idle = sampler.sample(clock)["resources/rank0/cpu.usage.percentage"]
    cpu_before = sum(psutil.Process().cpu_times()[:2])
    while sum(psutil.Process().cpu_times()[:2]) - cpu_before < 0.2:
        pass  # 0.2 s of CPU, reported 0.1 s (of injected time) after the previous sample
    clock += 0.1
    soon = sampler.sample(clock)
    assert idle < 20
    # over the 5.1 s since the sample before: about 4 %; over the last 0.1 s alone it would read 200 %
    assert soon["resources/rank0/cpu.usage.percentage"] < 20, soon
    assert soon["resources/rank0/memory.usage"] > 0
    clock += 5.0
    later = sampler.sample(clock)  # the span goes back to the previous sample, short or not
    assert later["resources/rank0/cpu.usage.percentage"] < 20, later


def test_node_names_are_safe_in_series_names():
    assert node_name("node-7.cluster.local") == "node-7.cluster.local"
    assert node_name("bad host/name") == "bad_host_name"


def test_other_nodes_are_sampled_by_one_of_their_processes_chosen_by_the_aggregator(store_dir, tmp_path):
    """A second node, played by senders whose HELLO names another host: the aggregator sends
    the first a SAMPLE plan, and the second when the first leaves; the steps of that node's
    series go on without a repeat."""
    run = Run()
    run.config(resources_metrics_interval=1)
    run.init(name="nodes")
    address = run._address

    def join(pid: int, name: str):
        losses = LossCounter()
        buffer = deque()
        role = SamplingRole("node-b", lambda: address.started, buffer.append)
        sender = Sender(
            address.address, address.key,
            {"role": "worker", "pid": pid, "host": "node-b", "cuda": None},
            flush_interval_s=0.05, heartbeat_interval_s=1.0, close_timeout_s=10.0,
            spill=SpillFile(tmp_path / f"{name}.msgpack", losses), losses=losses,
            abort=AbortSignal(), buffer=buffer, on_sample=role.configure,
        )
        return sender, role

    first, first_role = join(os.getpid(), "first")
    deadline = time.monotonic() + 10
    while first_role.sampling is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first_role.sampling is not None, "the first process on node-b was not asked to sample"
    second, second_role = join(os.getppid(), "second")
    time.sleep(1.5)
    assert second_role.sampling is None  # one sampler per node
    first_role.stop(5)
    assert first.close(None, {}, 10)
    deadline = time.monotonic() + 10
    while second_role.sampling is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert second_role.sampling is not None, "no process took over sampling node-b"
    time.sleep(1.5)
    second_role.stop(5)
    assert second.close(None, {}, 10)
    run.close()

    exported = read_run(store_dir, "nodes")
    node_b = _series(exported, "resources/node/node-b/memory.usage")
    steps = [p[0] for p in node_b]
    assert len(steps) >= 4 and steps == list(range(len(steps)))
    assert _series(exported, "resources/worker0/memory.usage")  # sampled on node-b by its own sampler
    assert _series(exported, "resources/worker1/memory.usage")
    assert {"node-b", HOST} <= exported["metadata"]["simvue"]["hosts"].keys()
    # This node's sampler samples only this node's processes.
    assert len(_series(exported, f"resources/node/{HOST}/memory.usage")) >= 2


def test_emission_metrics_are_estimated_from_the_samples(store_dir):
    """``enable_emission_metrics``: a busy process for ~3 s at 1 s samples gives energy and
    CO2 series whose totals add up their deltas and match cores x watts x time."""
    code = textwrap.dedent(
        """
        import time
        from simvue import Run
        with Run() as run:
            run.config(resources_metrics_interval=1, enable_emission_metrics=True, cpu_watts_per_core=20.0,
                       co2_grams_per_kwh=400.0)
            run.init(name="emissions")
            end = time.time() + 3.3
            while time.time() < end:
                pass
        """
    )
    result = run_script(code, env={"SIMVUE_RESOURCES_INTERVAL_S": "1"})
    assert result.returncode == 0, result.stderr
    exported = read_run(store_dir, "emissions")
    energy = _series(exported, "sustainability.energy_consumed.delta")
    total = _series(exported, "sustainability.energy_consumed.total")
    co2 = _series(exported, "sustainability.emissions.total")
    assert len(energy) >= 3 and [p[0] for p in energy] == list(range(len(energy)))
    assert total[-1][2] == pytest.approx(sum(p[2] for p in energy))
    assert co2[-1][2] == pytest.approx(total[-1][2] * 0.4)
    cpu = _series(exported, "resources/cpu.usage.percentage")
    expected = sum(p[2] / 100 * 20.0 * (b[1] - a[1]) for a, b, p in zip(cpu, cpu[1:], cpu[1:])) / 3.6e6
    assert total[-1][2] == pytest.approx(expected, rel=1e-6)
    assert 0.5 * 20 * 3 / 3.6e6 < total[-1][2] < 2.5 * 20 * 3.5 / 3.6e6  # about one busy core for ~3 s


def test_every_rank_of_a_run_shorter_than_the_interval_has_a_first_and_a_last_sample(store_dir, tmp_path):
    """The default 30 s interval and a job of about a second: each rank is sampled when it
    joins and when it leaves, so every rank has its series, not only rank 0."""
    from pathlib import Path

    from conftest import mpiexec

    if not (Path(sys.executable).parent / "mpiexec").exists():
        pytest.skip("no mpiexec in the virtual environment")
    script = tmp_path / "short.py"
    script.write_text(textwrap.dedent(
        """
        import time
        from simvue import Run
        with Run() as run:
            run.init(name="short")
            end = time.time() + 1.0
            while time.time() < end:
                run.log_metrics({"x": 1.0})
                time.sleep(0.01)
        """
    ))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    env["SIMVUE_RESOURCES_INTERVAL_S"] = "30"
    result = mpiexec(4, sys.executable, str(script), env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    exported = read_run(store_dir, "short")
    for rank in range(4):
        memory = _series(exported, f"resources/rank{rank}/memory.usage")
        assert len(memory) >= 2, f"rank{rank} has {len(memory)} samples"
        assert all(point[2] > 10 for point in memory)


def test_the_sampler_process_samples_a_process_when_it_joins_and_once_more_as_it_leaves():
    import subprocess

    from simvue.resources.agent import JOIN_SAMPLE_DELAY_S, Agent

    agent = Agent("node", 30.0, time.time(), None, None)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        me, other = Proc("rank0", os.getpid()), Proc("rank1", child.pid)
        agent.set_processes((me,))
        agent._extra_done()
        asked = time.monotonic()
        agent.set_processes((me, other))  # rank1 joins: a sample soon, whatever the interval
        assert agent._extra_at - asked <= JOIN_SAMPLE_DELAY_S + 0.05
        agent._extra_done()
        agent.set_processes((me,))  # rank1 leaves: one more sample at once, with it in
        assert agent._extra_at <= time.monotonic()
        values = agent.sampler.sample()
        assert values["resources/rank1/memory.usage"] > 1
        agent._extra_done()
        assert [p.label for p in agent.sampler.processes] == ["rank0"]
        # Two leave before the extra sample is taken: both are in it.
        agent.set_processes((me, other, Proc("rank2", os.getppid())))
        agent._extra_done()
        agent.set_processes((me, Proc("rank2", os.getppid())))
        agent.set_processes((me,))
        assert sorted(p.label for p in agent.sampler.processes) == ["rank0", "rank1", "rank2"]
    finally:
        child.kill()
        child.wait()
        agent.sampler.close()
