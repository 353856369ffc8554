"""Array metrics on grids from real processes: every rank of an MPI job, pool workers that
inherit or are handed the run, and a run sent to a server and read back from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import ROOT, mpiexec, needs_server, read_run
from test_mpi_launch import _clean_env, simvue_cli

pytestmark = pytest.mark.mpi_skip


def _field(rank: int, step: int) -> np.ndarray:  # as examples/grid_sim.py computes it
    x, y = np.linspace(0, 1, 40), np.linspace(0, 0.5, 20)
    xx, yy = np.meshgrid(x, y)
    return np.exp(-step / 10) * np.sin(np.pi * xx) * np.cos(np.pi * yy) + rank


@pytest.mark.parametrize("reduce", [False, True], ids=["namespaced", "reduced"])
def test_the_grid_example_under_mpiexec_4_keeps_every_rank_s_arrays(store_dir, reduce):
    steps, name = 20, f"grid-sim-{os.getpid()}-{int(reduce)}"
    env = {"GRID_SIM_STEPS": str(steps), "GRID_SIM_NAME": name}
    if reduce:
        env["GRID_SIM_REDUCE"] = "1"
    job = mpiexec(4, sys.executable, "examples/grid_sim.py", cwd=ROOT, timeout=90, env=_clean_env(env))
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == name

    exported = simvue_cli("export", name)  # what a user reads back
    assert exported.returncode == 0, exported.stderr
    run = json.loads(exported.stdout)
    assert run["status"] == "completed"
    [grid] = run["grids"]
    assert grid["name"] == "plate" and grid["labels"] == ["x", "y"] and [len(a) for a in grid["axes"]] == [40, 20]
    arrays = run["arrays"]
    expected = {f"rank{k}/temperature" for k in range(4)}
    if reduce:
        expected |= {"temperature.mean", "temperature.max"}
    assert set(arrays) == expected and {a["grid"] for a in arrays.values()} == {grid["id"]}
    for k in range(4):
        values = arrays[f"rank{k}/temperature"]["values"]
        assert [v[0] for v in values] == list(range(steps)), f"rank{k} is incomplete"
        for step, _, field in values:
            np.testing.assert_array_equal(np.array(field), _field(k, step))
        peaks = run["metrics"][f"rank{k}/peak"]
        assert [p[2] for p in peaks] == [float(_field(k, s).max()) for s in range(steps)]
    if reduce:
        for step, _, field in arrays["temperature.mean"]["values"]:
            np.testing.assert_allclose(np.array(field), np.mean([_field(k, step) for k in range(4)], axis=0),
                                       rtol=1e-12)
        for step, _, field in arrays["temperature.max"]["values"]:
            np.testing.assert_array_equal(np.array(field), _field(3, step))
        assert [p[2] for p in run["metrics"]["temperature.count"]] == [4.0] * steps
        assert len(arrays["temperature.mean"]["values"]) == steps


POOL = textwrap.dedent(
    """
    import multiprocessing as mp, sys
    import numpy as np
    from simvue import Run

    def work(args):
        run, task = args
        run.log_metrics({"profile": np.full(3, float(task)), "seen": [task, task]}, step=task)
        return task

    def inherited(task):
        RUN.log_metrics({"profile": np.full(3, 10.0 + task)}, step=100 + task)
        return task

    if __name__ == "__main__":
        method = sys.argv[1]
        with Run() as RUN:
            RUN.init(name="grid-pool-" + method)
            RUN.assign_metric_to_grid(metric_name="profile", grid_name="line", axes_ticks=[[0, 1, 2]],
                                      axes_labels=["depth"])
            with mp.get_context(method).Pool(2) as pool:
                assert sorted(pool.map(work, [(RUN, t) for t in range(6)])) == list(range(6))
                if method == "fork":
                    assert sorted(pool.map(inherited, range(4))) == list(range(4))
    """
)


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_pool_workers_log_arrays_on_the_grid_their_parent_defined(store_dir, tmp_path, method):
    script = tmp_path / "pool_grid.py"  # a file: spawned workers import the functions from it
    script.write_text(POOL)
    result = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, f"grid-pool-{method}")
    assert run["status"] == "completed"
    by_name = {grid["id"]: grid["name"] for grid in run["grids"]}
    profiles = {name: a for name, a in run["arrays"].items() if name.endswith("/profile")}
    assert profiles and all(by_name[a["grid"]] == "line" for a in profiles.values())  # the parent's grid
    steps = sorted(step for a in profiles.values() for step, _, _ in a["values"])
    expected = list(range(6)) + ([100, 101, 102, 103] if method == "fork" else [])
    assert steps == expected
    for array in profiles.values():
        for step, _, values in array["values"]:
            assert values == [float(step)] * 3 if step < 100 else [10.0 + step - 100] * 3
    seen = {name: a for name, a in run["arrays"].items() if name.endswith("/seen")}
    assert sum(len(a["values"]) for a in seen.values()) == 6
    assert all(by_name[a["grid"]] == "seen" for a in seen.values())  # the default grid


@needs_server
def test_arrays_reach_a_server_and_read_back_the_same(store_dir, tmp_path):
    from simvue.server.local import ServerProcess  # a real server process on 127.0.0.1

    server = ServerProcess(tmp_path / "server-data")
    try:
        env = {**server.env, "GRID_SIM_STEPS": "12", "GRID_SIM_NAME": "grid-online"}
        job = subprocess.run([sys.executable, "examples/grid_sim.py"], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env={**os.environ, **env})
        assert job.returncode == 0, job.stderr
        local = read_run(store_dir, "grid-online")
        remote = simvue_cli_env(env, "export", "grid-online")
        assert remote.returncode == 0, remote.stderr
        remote_run = json.loads(remote.stdout)
    finally:
        server.stop()
    assert [(g["name"], g["axes"], g["labels"]) for g in remote_run["grids"]] == [
        (g["name"], g["axes"], g["labels"]) for g in local["grids"]
    ]
    assert set(remote_run["arrays"]) == {"temperature"}
    local_values = local["arrays"]["temperature"]["values"]
    remote_values = remote_run["arrays"]["temperature"]["values"]
    assert [v[0] for v in remote_values] == list(range(12))
    for (step, _, field), (remote_step, _, remote_field) in zip(local_values, remote_values):
        assert remote_step == step and remote_field == field
        np.testing.assert_array_equal(np.array(field), _field(0, step))


def simvue_cli_env(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "simvue.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **env})
