"""The driver's MLflow writer against a real server that goes away and comes back: nothing is lost."""
from __future__ import annotations

import logging
import threading
import time

from mlflow.tracking import MlflowClient

from services import start_mlflow
from sweep.tracking import Tracker


def test_outage_is_buffered_and_retried_until_the_server_returns(tmp_path, caplog):
    server = start_mlflow(tmp_path / "mlflow")
    tracker = None
    try:
        tracker = Tracker(server.uri, retry_s=120)
        exp = tracker.experiment_id("outage-unit")
        parent = tracker.create_parent(exp, "parent", {"sweep.id": "x"})
        server.stop()  # the server goes away before the trial's run even exists
        caplog.set_level(logging.WARNING, logger="sweep.tracking")
        handle = tracker.start_child(exp, parent, "trial", {"trial.key": "k"}, {"optimizer.lr": "0.1"})
        steps = range(0, 2500)  # 2 keys x 2500 steps = 5 log_batch chunks of <= 1000
        tracker.log_metrics(handle, [(k, float(s), s) for s in steps for k in ("train_loss", "test_loss")])
        tracker.set_tags(handle, {"status": "finished"})
        tracker.end(handle, "FINISHED")
        assert not tracker.flush(timeout=4), "nothing can be written while the server is down"
        server.start().wait_ready()  # back on the same port
        assert tracker.flush(timeout=120)
        assert tracker.errors == []
        assert any("retrying" in r.getMessage() for r in caplog.records)
        client = MlflowClient(server.uri)
        run = client.get_run(handle.run_id)
        assert run.info.status == "FINISHED" and run.data.tags["status"] == "finished"
        assert run.data.tags["mlflow.parentRunId"] == parent and run.data.params == {"optimizer.lr": "0.1"}
        for key in ("train_loss", "test_loss"):
            history = client.get_metric_history(handle.run_id, key)
            assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in steps]
        children = tracker.children(exp, parent)
        assert [c.info.run_id for c in children] == [handle.run_id], "a retried create made no duplicate"
    finally:
        if tracker is not None:
            tracker.close(timeout=5)
        server.stop()


def test_an_attempt_dropped_before_its_run_existed_is_still_visible_as_deleted(mlflow_server):
    """Issue 13 item 3: a worker died while its attempt's create call still waited in the queue. The
    attempt is created all the same, tagged, then deleted: visible with its attempt and node id."""
    from mlflow.entities import ViewType

    tracker = Tracker(mlflow_server.uri, retry_s=120)
    try:
        exp = tracker.experiment_id(f"dropped-{time.time_ns()}")
        parent = tracker.create_parent(exp, "parent", {"sweep.id": "x"})
        gate = threading.Event()
        tracker._put("held", gate.wait)  # the writer is busy: what follows stays queued
        handle = tracker.start_child(exp, parent, "trial", {"trial.key": "k", "attempt": "1", "node.id": "n1"},
                                     {"optimizer.lr": "0.1"})
        tracker.log_metrics(handle, [("train_loss", 1.0, 0)])
        tracker.delete(handle, {"status": "retried", "error": "worker died: RayActorError"})
        assert handle.run_id is None, "the create had not gone out when the attempt was dropped"
        gate.set()
        assert tracker.flush(timeout=60) and tracker.errors == []
        client = MlflowClient(mlflow_server.uri)
        lost = client.search_runs([exp], "", run_view_type=ViewType.DELETED_ONLY)
        assert [r.info.run_id for r in lost] == [handle.run_id]
        tags = lost[0].data.tags
        assert (tags["attempt"], tags["node.id"], tags["trial.key"]) == ("1", "n1", "k")
        assert (tags["status"], tags["error"]) == ("retried", "worker died: RayActorError")
        assert tags["mlflow.parentRunId"] == parent and lost[0].data.metrics == {}, "its queued metrics skipped"
        assert tracker.children(exp, parent) == [], "nothing of it is visible"
    finally:
        tracker.close(timeout=5)


def test_a_request_the_server_rejects_is_not_retried_forever(mlflow_server):
    tracker = Tracker(mlflow_server.uri, retry_s=120)
    try:
        t0 = time.monotonic()
        try:
            tracker.call(tracker.client.get_run, "0" * 32)
        except Exception as e:  # noqa: BLE001
            assert "RESOURCE_DOES_NOT_EXIST" in str(getattr(e, "error_code", "")) or "not found" in str(e).lower()
        else:
            raise AssertionError("get_run of a missing run must raise")
        assert time.monotonic() - t0 < 10
    finally:
        tracker.close(timeout=5)


def test_queued_records_go_out_merged_per_run_in_each_runs_order(mlflow_server):
    """What is queued when the writer gets to it goes out as one log_batch per run between its create and
    its end (within MLflow's limits: 1000 metrics, 100 params, 100 tags a call), runs interleaved in the
    queue included; what the server holds afterwards is exactly what was logged."""
    tracker = Tracker(mlflow_server.uri, retry_s=120)
    calls = []
    real = tracker.client.log_batch
    tracker.client.log_batch = lambda run_id, **kw: (calls.append((run_id, {k: len(v) for k, v in kw.items()})),
                                                     real(run_id, **kw))[1]
    try:
        exp = tracker.experiment_id(f"merged-{time.time_ns()}")
        parent = tracker.create_parent(exp, "parent", {"sweep.id": "x"})
        gate = threading.Event()
        tracker._put("held", gate.wait)  # the writer is busy: everything below is queued together
        params = {f"p{i:03d}": str(i) for i in range(150)}   # > 100: two calls' worth
        a = tracker.start_child(exp, parent, "a", {"trial.key": "a"}, params)
        b = tracker.start_child(exp, parent, "b", {"trial.key": "b"}, {"optimizer.lr": "0.1"})
        for s in range(0, 1200, 100):                       # two runs' records interleaved, as two workers do
            tracker.log_metrics(a, [("loss", float(s), s), ("acc", s / 1e4, s)])
            tracker.log_metrics(b, [("loss", -float(s), s)])
        tracker.log_metrics(a, [(f"m{i}", float(i), 0) for i in range(1500)])   # > 1000 in one record
        tracker.set_tags(a, {"status": "running"})
        tracker.set_tags(a, {"status": "finished"})          # the later value wins, as two calls would
        tracker.set_tags(b, {"status": "finished"})
        tracker.end(a, "FINISHED")
        tracker.end(b, "FINISHED")
        gate.set()
        assert tracker.flush(timeout=60) and tracker.errors == []
        # a: 150 params + 24 + 1500 metrics + 1 tag -> 1000-entity calls: (100 p, 1 t, 899 m), (50 p, 625 m) ...
        sent_a = [c for r, c in calls if r == a.run_id]
        assert sum(c["params"] for c in sent_a) == 150 and sum(c["metrics"] for c in sent_a) == 1524
        assert all(c["params"] <= 100 and c["tags"] <= 100 and sum(c.values()) <= 1000 for c in sent_a)
        assert len(sent_a) == 2, sent_a                       # 1675 entities: the fewest calls the limits allow
        assert [c for r, c in calls if r == b.run_id] == [{"metrics": 12, "params": 1, "tags": 1}]
        client = MlflowClient(mlflow_server.uri)
        run_a, run_b = client.get_run(a.run_id), client.get_run(b.run_id)
        assert run_a.data.params == params and run_a.data.tags["status"] == "finished"
        assert run_a.info.status == run_b.info.status == "FINISHED"
        assert sorted((m.step, m.value) for m in client.get_metric_history(a.run_id, "loss")) == \
            [(s, float(s)) for s in range(0, 1200, 100)]
        assert sorted((m.step, m.value) for m in client.get_metric_history(b.run_id, "loss")) == \
            [(s, -float(s)) for s in range(0, 1200, 100)]
        assert run_a.data.metrics["m1499"] == 1499.0 and len(run_a.data.metrics) == 1502
    finally:
        tracker.close(timeout=5)
