"""The Simvue tutorial's final script (from the Simvue documentation) runs unchanged apart from its scale, single
process and on every rank of ``mpiexec -n 2``, and everything it records can be read back."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import mpiexec, read_run
from simvue.client import Client

SCRIPT = Path(__file__).parent / "seeds" / "tutorial_final.py"
SCALE = {"TUTORIAL_ITERATIONS": "60", "TUTORIAL_PAUSE": "0.01", "TUTORIAL_ALERT_MINUTES": "0.002"}


def check_run(store_dir: Path, name: str, prefix: str = "") -> dict:
    run = read_run(store_dir, name)
    assert run["status"] == "completed"
    assert run["folder"] == "/rand_nums" and set(run["tags"]) == {"random-numbers", "v1", "completed"}
    assert run["metadata"]["number_of_iterations"] == 60 and "mean" in run["metadata"]
    assert run["folder_details"]["metadata"] == {"environment": "testing"}
    for metric in ("random_number", "averages.mean", "averages.median", "averages.mode"):
        assert [p[0] for p in run["metrics"][prefix + metric]] == list(range(60)), metric
    means = [p[2] for p in run["metrics"][prefix + "averages.mean"]]
    numbers = [p[2] for p in run["metrics"][prefix + "random_number"]]
    assert abs(means[-1] - sum(numbers) / len(numbers)) < 1e-9
    levels = {e["level"] for e in run["events"]}
    assert "debug" in levels  # the logging Handler's messages
    messages = [e["message"] for e in run["events"]]
    assert any("Random Number Generation Completed!" in m for m in messages)
    alerts = {a["name"]: a for a in run["alerts"]}
    assert set(alerts) == {"mean_outside_acceptable_range", "zero_division_error"}
    division_events = any("Division by Zero Error" in m for m in messages)
    assert (alerts["zero_division_error"]["status"] == "critical") == division_events
    return run


def test_the_tutorial_script_single_process(store_dir, tmp_path):
    script = tmp_path / SCRIPT.name
    shutil.copy(SCRIPT, script)
    result = subprocess.run(
        [sys.executable, str(script)], env={**os.environ, **SCALE, "TUTORIAL_NAME": "tutorial"},
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    run = check_run(store_dir, "tutorial")
    artifacts = {a["name"]: a for a in run["artifacts"]}
    assert {"averages_out.json", "all_random_numbers", "percentage_changes_in_mean"} <= set(artifacts)
    assert artifacts["all_random_numbers"]["category"] == "output"
    with Client() as client:
        assert client.get_run("tutorial").name == "tutorial"


def test_the_tutorial_script_on_every_rank(store_dir, tmp_path):
    script = tmp_path / "tutorial_final.py"
    shutil.copy(SCRIPT, script)
    result = mpiexec(2, sys.executable, str(script), env={**SCALE, "TUTORIAL_NAME": "tutorial-mpi"},
                     cwd=tmp_path, timeout=150)
    assert result.returncode == 0, result.stderr
    for rank in range(2):
        check_run(store_dir, "tutorial-mpi", prefix=f"rank{rank}/")


def test_the_tutorial_script_lasting_longer_than_every_timeout_ends_completed(store_dir, tmp_path, scaled_timeouts):
    """The tutorial at a pace that makes it outlive every (scaled) timeout several times:
    it ends completed, as a real tutorial run of minutes does with the real timeouts."""
    script = tmp_path / SCRIPT.name
    shutil.copy(SCRIPT, script)
    env = {**os.environ, **SCALE, **scaled_timeouts, "TUTORIAL_PAUSE": "0.17", "TUTORIAL_NAME": "tutorial-long"}
    result = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    run = check_run(store_dir, "tutorial-long")
    assert "lost" not in run["metadata"]["simvue"]
