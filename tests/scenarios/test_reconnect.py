"""Runs created in the ``created`` state and resumed later with ``Run.reconnect``."""

import sys
import textwrap

from conftest import mpiexec, read_run, run_script

CREATE = textwrap.dedent(
    """
    import sys
    from simvue import Run
    with Run() as run:
        if sys.argv[2] == "running":
            run.init(name=sys.argv[1], folder="/later", running=False, metadata={"planned": True})
        else:
            run.init(name=sys.argv[1], folder="/later", status="created")
    """
)
RESUME = textwrap.dedent(
    """
    import sys
    from simvue import Run
    run = Run()
    run.config(suppress_errors=False)
    run.reconnect(sys.argv[1])
    for step in range(10):
        run.log_metrics({"x": float(step)})
    run.log_event("resumed")
    run.close()
    print("NAME", run.name)
    """
)


def test_a_created_run_waits_and_is_resumed_by_another_process(store_dir):
    for name, form in (("planned", "running"), ("planned-too", "status")):
        created = run_script(CREATE, name, form)
        assert created.returncode == 0, created.stderr
        assert read_run(store_dir, name)["status"] == "created"
        resumed = run_script(RESUME, name)
        assert resumed.returncode == 0, resumed.stderr
        assert f"NAME {name}" in resumed.stdout
        run = read_run(store_dir, name)
        assert run["status"] == "completed" and run["folder"] == "/later"
        assert [point[2] for point in run["metrics"]["x"]] == [float(step) for step in range(10)]
        assert [event["message"] for event in run["events"]] == ["resumed"]


def test_only_created_runs_can_be_resumed(store_dir):
    assert run_script(CREATE, "once", "status").returncode == 0
    assert run_script(RESUME, "once").returncode == 0
    again = run_script(RESUME, "once")
    assert again.returncode != 0 and "only a run in the 'created' state" in again.stderr
    missing = run_script(RESUME, "no-such-run")
    assert missing.returncode != 0 and "no run named" in missing.stderr


def test_every_mpi_rank_reconnects_to_one_run(store_dir, tmp_path):
    assert run_script(CREATE, "mpi-later", "status").returncode == 0
    code = tmp_path / "resume.py"
    code.write_text(
        "import os\nfrom simvue import Run\nrank = int(os.environ['PMI_RANK'])\n"
        "with Run() as run:\n    run.reconnect('mpi-later')\n"
        "    for step in range(5):\n        run.log_metrics({'x': float(rank * 10 + step)})\n"
    )
    result = mpiexec(2, sys.executable, str(code), timeout=120)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "mpi-later")
    assert run["status"] == "completed"
    for rank in range(2):
        assert [p[2] for p in run["metrics"][f"rank{rank}/x"]] == [float(rank * 10 + s) for s in range(5)]
