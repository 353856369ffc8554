"""Alerts evaluated by the aggregator on real runs: firing, not firing, events, user alerts,
MPI (defined once from every rank, on namespaced and reduced series), abort on critical."""

import sys
import textwrap

from conftest import mpiexec, read_run, run_script

SINGLE = textwrap.dedent(
    """
    import time
    from simvue import Run
    with Run() as run:
        run.init(name="alerts-one")
        run.add_alert(name="too-big", source="metrics", rule="is above", metric="x", threshold=5,
                      frequency=0.005, window=2)
        run.create_metric_range_alert("in-range", "x", 0, 100, "is outside range", frequency=0.005, window=1)
        run.add_alert(name="err", source="events", pattern="ERROR", frequency=0.005)
        run.add_alert("older-form", "is below", "x", 0.005, 1, threshold=-1)
        run.create_user_alert("manual")
        run.create_metric_threshold_alert("short-run", "y", 1.0, "is above", frequency=60, window=1)
        for step in range(20):
            run.log_metrics({"x": float(step), "y": 2.0})
            time.sleep(0.05)
        run.log_event("ERROR: boom")
        run.log_alert("manual", "critical")
    """
)


def alerts_by_name(run: dict) -> dict:
    return {alert["name"]: alert for alert in run["alerts"]}


def test_alerts_fire_or_stay_ok_and_are_exported(store_dir):
    result = run_script(SINGLE)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "alerts-one")
    alerts = alerts_by_name(run)
    assert {name: a["status"] for name, a in alerts.items()} == {
        "too-big": "critical", "in-range": "ok", "err": "critical", "older-form": "ok", "manual": "critical",
        "short-run": "critical",  # evaluated once at the end of the run
    }
    assert alerts["too-big"]["rule"] == "is above" and alerts["too-big"]["threshold"] == 5.0
    assert alerts["too-big"]["fired_at"] and alerts["in-range"]["fired_at"] is None
    assert alerts["err"]["pattern"] == "ERROR" and alerts["older-form"]["rule"] == "is below"
    from simvue.client import Client

    with Client() as client:
        assert [a["name"] for a in client.get_alerts("alerts-one", critical_only=True)] == [
            "too-big", "err", "manual", "short-run"
        ]
    fired = [e["message"] for e in run["events"] if e["message"].startswith("alert ")]
    assert sorted(message.split("'")[1] for message in fired) == ["err", "manual", "short-run", "too-big"]


def test_bad_alert_definitions_are_clear_errors(store_dir):
    code = textwrap.dedent(
        """
        from simvue import Run
        run = Run()
        run.config(suppress_errors=False)
        run.init(name="bad-alerts")
        for call in (
            lambda: run.add_alert(name="a", rule="is sideways", metric="x", threshold=1),
            lambda: run.add_alert(name="b", rule="is above", metric="x"),
            lambda: run.add_alert(name="c", source="events"),
            lambda: run.create_metric_range_alert("d", "x", 5, 1, "is inside range"),
            lambda: run.log_alert("e", "purple"),
        ):
            try:
                call()
                print("ACCEPTED")
            except Exception as exc:
                print(type(exc).__name__, exc)
        run.log_metrics({"x": 1.0})
        run.close()
        """
    )
    result = run_script(code)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 5 and not any(line == "ACCEPTED" for line in lines), lines
    assert all(line.startswith("Simvue") for line in lines)
    assert "is sideways" in lines[0] and "threshold" in lines[1] and "pattern" in lines[2] and "range_low" in lines[3]
    run = read_run(store_dir, "bad-alerts")
    assert run["alerts"] == [] and len(run["metrics"]["x"]) == 1


def test_alerts_from_every_rank_are_defined_once_and_watch_rank_and_reduced_series(store_dir, tmp_path):
    code = tmp_path / "alerts_mpi.py"
    code.write_text(
        textwrap.dedent(
            """
            import os
            from simvue import Run
            rank = int(os.environ["PMI_RANK"])
            with Run() as run:
                run.init(name="alerts-mpi", reduce={"load": ["max"]})
                run.add_alert(name="rank1-hot", rule="is above", metric="rank1/x", threshold=50, window=1)
                run.add_alert(name="max-load", rule="is above", metric="load.max", threshold=0.5, window=1)
                run.add_alert(name="rank0-hot", rule="is above", metric="rank0/x", threshold=50, window=1)
                for step in range(10):
                    run.log_metrics({"x": float(rank * 100 + step), "load": 0.1 + 0.8 * rank}, step=step)
            """
        )
    )
    result = mpiexec(2, sys.executable, str(code), timeout=120)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "alerts-mpi")
    assert [alert["name"] for alert in run["alerts"]] == ["rank1-hot", "max-load", "rank0-hot"]
    assert {a["name"]: a["status"] for a in run["alerts"]} == {
        "rank1-hot": "critical", "max-load": "critical", "rank0-hot": "ok"
    }


def test_a_critical_alert_can_stop_the_run(store_dir):
    code = textwrap.dedent(
        """
        import time
        from simvue import Run
        with Run() as run:
            run.init(name="alert-abort")
            run.create_metric_threshold_alert("diverged", "loss", 10, "is above", frequency=0.005, window=1,
                                              trigger_abort=True)
            for step in range(2000):
                run.log_metrics({"loss": float(step)})
                time.sleep(0.01)
        """
    )
    result = run_script(code, timeout=60)
    assert result.returncode == 1 and "an abort was requested" in result.stderr, result.stderr
    run = read_run(store_dir, "alert-abort")
    assert run["status"] == "terminated"
    assert alerts_by_name(run)["diverged"]["status"] == "critical"
    assert len(run["metrics"]["loss"]) < 2000


def test_an_alert_not_attached_to_the_run_is_kept_but_never_evaluated(store_dir):
    code = textwrap.dedent(
        """
        from simvue import Run
        with Run() as run:
            run.init(name="unattached")
            run.create_metric_threshold_alert("elsewhere", "x", 1, "is above", frequency=0.001, window=1,
                                              attach_to_run=False)
            run.create_user_alert("mine", attach_to_run=False)
            run.log_alert("mine", "critical")
            for step in range(20):
                run.log_metrics({"x": 10.0})
        """
    )
    result = run_script(code)
    assert result.returncode == 0, result.stderr
    run = read_run(store_dir, "unattached")
    alerts = {alert["name"]: alert for alert in run["alerts"]}
    assert {name: (a["status"], a.get("attached")) for name, a in alerts.items()} == {
        "elsewhere": ("ok", False), "mine": ("ok", False)
    }
    assert not [e for e in run["events"] if "alert" in e["message"]]
