"""pandas paths: DataFrame artifacts round trip, and Client results as DataFrames."""

import pytest

pandas = pytest.importorskip("pandas", reason="pandas is not installed")

from conftest import run_script
from simvue.client import Client

SCRIPT = """
import pandas
from simvue import Run
frame = pandas.DataFrame({"x": [1.5, 2.5, 3.5], "label": ["a", "b", "c"]}, index=[10, 20, 30])
with Run() as run:
    run.init(name="frames", tags=["pandas"])
    run.save(frame, "output", name="table")
    for step in range(5):
        run.log_metrics({"loss": 1.0 / (step + 1)})
"""


def test_dataframes_round_trip_and_client_answers_in_dataframes():
    result = run_script(SCRIPT)
    assert result.returncode == 0, result.stderr
    with Client() as client:
        table = client.get_artifact("frames", "table")
        expected = pandas.DataFrame({"x": [1.5, 2.5, 3.5], "label": ["a", "b", "c"]}, index=[10, 20, 30])
        pandas.testing.assert_frame_equal(table, expected)
        runs = client.get_runs(["has tag.pandas"], output_format="dataframe")
        assert list(runs["name"]) == ["frames"]
        run_id = runs["id"][0]
        values = client.get_metric_values(["loss"], "step", run_ids=[run_id], output_format="dataframe")
        assert list(values.columns) == ["run", "metric", "step", "value"]
        assert list(values["value"]) == [1.0 / (step + 1) for step in range(5)]
