"""Array metrics on grids, in one process and in the aggregator's state: what is accepted,
what is refused and why, what is stored, and how arrays of several senders are namespaced
or reduced element by element.  (Several real processes: tests/scenarios/test_grid_jobs.py.)"""

from __future__ import annotations

import math
import pickle
import sys
import warnings

import numpy as np
import pytest

from simvue import Run, SimvueTypeError, SimvueValueError, SimvueWarning, validation
from simvue.aggregator.arrays import combine_arrays, grid_id
from simvue.store import Store, StoreBatch
from simvue.store.sqlite import pack_batch, read_spilled_batches
from simvue.transport.protocol import MessageKind, RecordKind

from conftest import read_run
from test_aggregator_state import Sim

PLATE = {"axes_ticks": [np.linspace(0, 1, 5), np.linspace(0, 2, 3)], "axes_labels": ["x", "y"]}


def test_arrays_on_a_grid_are_stored_with_the_grid_and_exported(store_dir):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="grids")
        assert run.assign_metric_to_grid(metric_name="T", grid_name="plate", **PLATE)
        for step in range(5):
            field = np.arange(15, dtype=float).reshape(3, 5) * step
            assert run.log_metrics({"T": field, "loss": 1.0 / (step + 1), "profile": [step, step + 1.5]})
    exported = read_run(store_dir, "grids")
    grids = {grid["name"]: grid for grid in exported["grids"]}
    assert grids["plate"]["axes"] == [[0.0, 0.25, 0.5, 0.75, 1.0], [0.0, 1.0, 2.0]]
    assert grids["plate"]["labels"] == ["x", "y"]
    # logged without a grid: the upstream client's default one, named after the metric
    assert grids["profile"]["axes"] == [[0.0, 1.0]] and grids["profile"]["labels"] == ["axis_0"]
    arrays = exported["arrays"]
    assert arrays["T"]["grid"] == grids["plate"]["id"] and arrays["profile"]["grid"] == grids["profile"]["id"]
    assert [v[0] for v in arrays["T"]["values"]] == list(range(5))
    assert arrays["T"]["values"][3][2] == (np.arange(15.0).reshape(3, 5) * 3).tolist()
    assert arrays["profile"]["values"][4][2] == [4.0, 5.5]
    # the numbers of the same calls share their steps and times
    assert [p[0] for p in exported["metrics"]["loss"]] == list(range(5))
    assert [p[1] for p in exported["metrics"]["loss"]] == [v[1] for v in arrays["T"]["values"]]


@pytest.mark.parametrize("value, error, words", [
    (np.ones((2, 2, 2)), SimvueValueError, "has 3 axes"),
    ([[1, 2], [3]], SimvueValueError, "not an array of numbers"),
    (np.array([1.0, np.nan]), SimvueValueError, "inf or nan"),
    (np.array([1.0, np.inf]), SimvueValueError, "inf or nan"),
    ([1e400], SimvueValueError, "inf or nan"),
    (np.array(["a", "b"]), SimvueTypeError, "holds ints or floats"),
    (np.array([True, False]), SimvueTypeError, "holds ints or floats"),
    (np.array([1 + 2j]), SimvueTypeError, "holds ints or floats"),
    ([], SimvueValueError, "empty array"),
    (np.zeros(validation.MAX_TENSOR_VALUES + 1), SimvueValueError, "at most 50000"),
    ([["a"]], SimvueTypeError, "holds ints or floats"),
])
def test_bad_arrays_are_clear_errors_and_nothing_logged_is_lost(store_dir, value, error, words):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="bad-arrays")
        run.log_metrics({"ok": np.arange(3.0)})
        with pytest.raises(error, match=words):
            run.log_metrics({"bad": value, "x": 1.0})
        run.log_metrics({"ok": np.arange(3.0) + 1})
    exported = read_run(store_dir, "bad-arrays")
    assert exported["status"] == "completed"
    assert [v[2] for v in exported["arrays"]["ok"]["values"]] == [[0.0, 1.0, 2.0], [1.0, 2.0, 3.0]]
    assert "bad" not in exported["arrays"] and "x" not in exported["metrics"]


@pytest.mark.parametrize("kwargs, words", [
    ({"metric_name": "m", "grid_name": "nowhere"}, "not defined"),
    ({"metric_name": "m", "axes_ticks": [[0, 1]]}, "give both"),
    ({"metric_name": "m", "axes_ticks": [[0, 1]], "axes_labels": ["x", "y"]}, "2 axes_labels for 1 axes"),
    ({"metric_name": "m", "axes_ticks": [[0, 2, 1]], "axes_labels": ["x"]}, "not in order"),
    ({"metric_name": "m", "axes_ticks": [[0, 1], [0, 1], [0, 1]], "axes_labels": ["x", "y", "z"]}, "1 or 2 axes"),
    ({"metric_name": "m", "axes_ticks": [[]], "axes_labels": ["x"]}, "1-50000 ticks"),
    ({"metric_name": "m", "axes_ticks": [[0, float("nan")]], "axes_labels": ["x"]}, "finite"),
    ({"metric_name": "m", "axes_ticks": [["a"]], "axes_labels": ["x"]}, "must be int or float"),
    ({"metric_name": "m", "axes_ticks": [[0, 1]], "axes_labels": [3]}, "list of str"),
    ({"metric_name": "m", "grid_name": "\x00", "axes_ticks": [[0, 1]], "axes_labels": ["x"]}, "invalid grid name"),
    ({"metric_name": "bad\x00name", "axes_ticks": [[0, 1]], "axes_labels": ["x"]}, "invalid metric name"),
    ({"metric_name": "m", "axes_ticks": [[0, 1]], "axes_labels": ["\ud800"]}, "axis label"),
])
def test_bad_grids_are_clear_errors(store_dir, kwargs, words):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="bad-grids")
        with pytest.raises((SimvueValueError, SimvueTypeError), match=words):
            run.assign_metric_to_grid(**kwargs)
    assert read_run(store_dir, "bad-grids")["grids"] == []


def test_an_array_that_does_not_fit_its_grid_warns_once_and_the_rest_is_kept(store_dir):
    with Run() as run:
        run.init(name="misfit")
        run.assign_metric_to_grid(metric_name="T", grid_name="plate", **PLATE)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.log_metrics({"T": np.ones((5, 5))}) is False
            assert run.log_metrics({"T": np.ones((4, 4))}) is False
        assert len([w for w in caught if issubclass(w.category, SimvueWarning)]) == 1
        assert "does not fit its grid 'plate'" in str(caught[0].message)
        # either axis order fits: the grid's first axis along the array's last, or its first
        assert run.log_metrics({"T": np.ones((3, 5))}) and run.log_metrics({"T": np.ones((5, 3))})
    exported = read_run(store_dir, "misfit")
    assert [v[0] for v in exported["arrays"]["T"]["values"]] == [2, 3]
    assert exported["metadata"]["simvue"]["dropped_calls"]["main"]["log_metrics"] == 2


def test_a_redefined_grid_is_announced_again_and_reassigning_moves_a_metric(store_dir):
    with Run() as run:
        run.config(suppress_errors=False)
        run.init(name="regrid")
        run.assign_metric_to_grid(metric_name="a", grid_name="g", axes_ticks=[[0, 1]], axes_labels=["x"])
        run.log_metrics({"a": [1, 2]})
        run.assign_metric_to_grid(metric_name="b", grid_name="g", axes_ticks=[[0, 1, 2]], axes_labels=["x"])
        run.log_metrics({"a": [1, 2, 3], "b": [4, 5, 6]})  # a is on the new definition too
        run.assign_metric_to_grid(metric_name="a", grid_name="other", axes_ticks=[[5, 6, 7]], axes_labels=["t"])
        run.assign_metric_to_grid(metric_name="b", grid_name="other")  # an existing grid, by name
        run.log_metrics({"a": [0, 0, 0], "b": [0, 0, 0]})
    exported = read_run(store_dir, "regrid")
    names = {grid["id"]: grid["name"] for grid in exported["grids"]}
    assert sorted(names.values()) == ["g", "g", "other"]  # two definitions of g, each kept
    assert names[exported["arrays"]["a"]["grid"]] == names[exported["arrays"]["b"]["grid"]] == "other"
    assert [v[2] for v in exported["arrays"]["a"]["values"]] == [[1.0, 2.0], [1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]


def test_with_suppressed_errors_a_bad_grid_warns_and_never_raises(store_dir):
    with Run() as run:
        run.init(name="quiet")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert run.assign_metric_to_grid(metric_name="m", grid_name="none") is False
            assert run.assign_metric_to_grid(metric_name=3, axes_ticks=object(), axes_labels=None) is False
            assert run.log_metrics({"m": object()}) is False
            assert run.log_metrics({"m": np.ones((2, 2, 2))}) is False
        assert caught and all(issubclass(w.category, SimvueWarning) for w in caught)
        assert run.log_metrics({"m": np.ones(2)})
    assert read_run(store_dir, "quiet")["arrays"]["m"]["values"][0][2] == [1.0, 1.0]


def test_a_pickled_run_keeps_its_grids():
    run = Run(mode="disabled")
    run._grid_defs["plate"] = ([[0.0, 1.0]], ["x"])
    run._metric_grids["T"] = "plate"
    copy = pickle.loads(pickle.dumps(run))
    assert copy._grid_defs == run._grid_defs and copy._metric_grids == {"T": "plate"}
    assert copy._grids_sent == set()  # a new process announces them again


def test_arrays_are_read_without_numpy_too(monkeypatch):
    expected = validation.tensor("m", np.array([[1.0, 2.0], [3.0, 4.5]]))
    monkeypatch.setitem(sys.modules, "numpy", None)  # import numpy now fails
    assert validation.tensor("m", [[1, 2], [3, 4.5]]) == expected
    with pytest.raises(SimvueTypeError, match="rectangular"):
        validation.tensor("m", [[1, 2], [3]])
    with pytest.raises(SimvueValueError, match="finite"):
        validation.tensor("m", [1.0, math.inf])
    with pytest.raises(SimvueValueError, match="3 axes"):
        validation.tensor("m", [[[1.0]]])
    shaped = [((2,), np.array([1.0, 5.0]).tobytes()), ((2,), np.array([3.0, -1.0]).tobytes())]
    assert np.frombuffer(combine_arrays("mean", shaped)[1]).tolist() == [2.0, 2.0]
    assert np.frombuffer(combine_arrays("max", shaped)[1]).tolist() == [3.0, 5.0]


@pytest.mark.parametrize("op, expected", [("mean", [2.0, 2.0]), ("min", [1.0, -1.0]), ("max", [3.0, 5.0]),
                                          ("sum", [4.0, 4.0])])
def test_arrays_reduce_element_by_element(op, expected):
    shaped = [((2,), np.array([1.0, 5.0]).tobytes()), ((2,), np.array([3.0, -1.0]).tobytes())]
    shape, data = combine_arrays(op, shaped)
    assert shape == (2,) and np.frombuffer(data, "<f8").tolist() == expected
    assert combine_arrays(op, [shaped[0], ((1, 2), shaped[1][1])]) is None  # shapes differ


def test_store_batches_with_arrays_spill_and_read_back(tmp_path):
    grid = grid_id("g", [[0.0, 1.0]], ["x"])
    batch = StoreBatch(
        tensors=[("a", 0, 0.5, 1e9, [2], np.array([1.0, 2.0]).tobytes())],
        grids={grid: ("g", [[0.0, 1.0]], ["x"])}, grid_metrics={"a": grid},
    )
    spill = tmp_path / "spill"
    spill.write_bytes(pack_batch("run-1", batch))
    [(run_id, back)] = list(read_spilled_batches(spill))
    assert run_id == "run-1" and back == batch
    assert [part.tensors or part.grids for part in batch.parts()] == [batch.grids, batch.tensors]
    assert "1 array value" in batch.describe() and batch.record_count == 3
    store = Store(tmp_path / "store")
    run_id = _new_run(store, "arrays")
    assert store.write(run_id, back)
    # a later value at the same step replaces the earlier one
    assert store.write(run_id, StoreBatch(tensors=[("a", 0, 0.6, 1e9, [2], np.array([7.0, 8.0]).tobytes())]))
    [value] = store.array_values(run_id, "a")
    assert (value["step"], value["time"], value["shape"], list(value["values"])) == (0, 0.6, [2], [7.0, 8.0])
    assert store.grid_metrics(run_id) == {"a": grid}
    assert store.grids(run_id) == [{"id": grid, "name": "g", "axes": [[0.0, 1.0]], "labels": ["x"]}]
    store.close()


def _new_run(store: Store, name: str) -> str:
    return store.create_run(name=name, folder="/", description=None, metadata={}, tags=[], status="running",
                            system={}, heartbeat_timeout_s=None)


# -- several senders, in the aggregator's state ---------------------------------------------------


def _grid(sim: Sim, sender: bytes, metric: str, axes, labels) -> None:
    sim.send(sender, MessageKind.DATA, [[RecordKind.GRID, metric, "g", axes, labels]])


def _array(sim: Sim, sender: bytes, metric: str, step: int, values) -> None:
    data = np.asarray(values, dtype="<f8")
    sim.send(sender, MessageKind.DATA, [[RecordKind.TENSOR, step, sim.clock.t, sim.clock.time(), metric,
                                         list(data.shape), data.tobytes()]])


def _collect(sim: Sim) -> StoreBatch:
    out = StoreBatch()
    sim.replies.extend(sim.state.tick())
    out.extend(sim.state.take_batch())
    return out


def test_each_rank_s_arrays_are_namespaced_and_the_grid_is_stored_once(tmp_path):
    sim = Sim(tmp_path, ranks=3)
    senders = [sim.hello(rank) for rank in (1, 2)]
    for rank, sender in enumerate(senders, start=1):
        _grid(sim, sender, "T", [[0, 1, 2]], ["x"])
        for step in range(3):
            _array(sim, sender, "T", step, [rank, step, rank * step])
    sim.state.local_records([[RecordKind.GRID, "T", "g", [[0, 1, 2]], ["x"]],
                             [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [3], np.zeros(3).tobytes()]])
    batch = _collect(sim)
    assert len(batch.grids) == 1
    (identity,) = batch.grids
    assert batch.grid_metrics == {"rank0/T": identity, "rank1/T": identity, "rank2/T": identity}
    stored = {(name, step): np.frombuffer(data).tolist() for name, step, _, _, _, data in batch.tensors}
    assert stored[("rank2/T", 2)] == [2.0, 2.0, 4.0] and stored[("rank0/T", 0)] == [0.0, 0.0, 0.0]
    assert len(stored) == 7


def test_reduced_arrays_are_combined_per_step_with_a_count(tmp_path):
    sim = Sim(tmp_path, ranks=3, reduce={"T": ("mean", "max", "namespace")})
    senders = [sim.hello(rank) for rank in (1, 2)]
    local = [[RecordKind.GRID, "T", "g", [[0, 1]], ["x"]]]
    for step in range(2):
        local.append([RecordKind.TENSOR, step, 0.0, 1.0, "T", [2], np.array([0.0, 3.0 * step]).tobytes()])
    sim.state.local_records(local)
    for rank, sender in enumerate(senders, start=1):
        _grid(sim, sender, "T", [[0, 1]], ["x"])
        for step in range(2):
            _array(sim, sender, "T", step, [rank, 3.0 * step])
    batch = _collect(sim)
    stored = {(name, step): np.frombuffer(data).tolist() for name, step, _, _, _, data in batch.tensors}
    assert stored[("T.mean", 1)] == [1.0, 3.0] and stored[("T.max", 0)] == [2.0, 0.0]
    assert stored[("rank1/T", 1)] == [1.0, 3.0]  # "namespace": each rank's too
    assert stored[("rank0/T", 1)] == [0.0, 3.0]
    assert list(batch.metrics["T.count"].values) == [3.0, 3.0]
    identity = next(iter(batch.grids))
    assert batch.grid_metrics["T.mean"] == batch.grid_metrics["T.max"] == identity


def test_arrays_of_different_shapes_are_not_reduced_but_counted(tmp_path):
    sim = Sim(tmp_path, ranks=2, reduce={"T": ("mean",)})
    sender = sim.hello(1)
    sim.state.local_records([[RecordKind.GRID, "T", "g", [[0, 1]], ["x"]],
                             [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [2], np.zeros(2).tobytes()]])
    _grid(sim, sender, "T", [[0, 1, 2]], ["x"])
    _array(sim, sender, "T", 0, [1.0, 2.0, 3.0])
    batch = _collect(sim)
    assert not [t for t in batch.tensors if t[0] == "T.mean"]
    assert list(batch.metrics["T.count"].values) == [2.0]
    assert sim.state.losses.snapshot().get("bad_record") == 1


@pytest.mark.parametrize("record", [
    [RecordKind.TENSOR, 0, 0.0, 1.0, "never-announced", [2], bytes(16)],
    [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [2], bytes(15)],  # data shorter than its shape
    [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [3], bytes(24)],  # does not fit the grid
    [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [2, 0], b""],
    [RecordKind.TENSOR, 0, 0.0, 1.0, "T", "2", bytes(16)],
    [RecordKind.TENSOR, 0, 0.0, 1.0, "T", [2], "text"],
    [RecordKind.TENSOR, -1, 0.0, 1.0, "T", [2], bytes(16)],
    [RecordKind.TENSOR, 2**64 - 1, 0.0, 1.0, "T", [2], bytes(16)],
    [RecordKind.TENSOR, 0, "now", 1.0, "T", [2], bytes(16)],
    [RecordKind.TENSOR, 0, 0.0, 1.0, 7, [2], bytes(16)],
    [RecordKind.TENSOR, 0],
    [RecordKind.GRID, "T", "g", [[0, float("nan")]], ["x"]],
    [RecordKind.GRID, "T", "g", [[1, 0, 1]], ["x"]],
    [RecordKind.GRID, "T", "g", [[0, 1]], ["x", "y"]],
    [RecordKind.GRID, "T", "g", "axes", ["x"]],
    [RecordKind.GRID, "bad\x00", "g", [[0, 1]], ["x"]],
    [RecordKind.GRID, "T", None, [[0, 1]], ["x"]],
])
def test_forged_array_records_are_dropped_and_counted(tmp_path, record):
    sim = Sim(tmp_path, ranks=2)
    sender = sim.hello(1)
    _grid(sim, sender, "T", [[0, 1]], ["x"])
    sim.send(sender, MessageKind.DATA, [record])
    _array(sim, sender, "T", 5, [1.0, 2.0])  # what comes after is kept
    batch = _collect(sim)
    assert sim.state.losses.snapshot().get("bad_record") == 1
    assert [(name, step) for name, step, *_ in batch.tensors] == [("rank1/T", 5)]
    store = Store(tmp_path / "store")
    run_id = _new_run(store, "forged")
    assert store.write(run_id, batch)  # nothing forged reaches a commit
    store.close()
