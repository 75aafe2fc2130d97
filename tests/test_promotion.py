"""stages/promotion.py: the promotion gate, as a rule and against MLflow's
model registry in a real store (a SQLite file, and a real ``mlflow server``)."""

from __future__ import annotations

import numpy as np
import pytest

from mlflow_server import MlflowServer
from stages import promotion
from stages.mlflow_run import log_keras_model
from stages.mlflow_store import use_store

MARGINS = {"psnr_db": 0.5, "accuracy": 0.02}


@pytest.mark.parametrize("value, champion, promoted", [
    (20.0, None, True),  # first version
    (20.6, 20.0, True),  # better by more than the margin
    (20.5, 20.0, False),  # better by the margin exactly: noise
    (20.0, 20.0, False),  # tie
    (19.0, 20.0, False),  # worse
])
def test_a_model_replaces_the_champion_only_beyond_the_margin(value, champion, promoted):
    assert promotion.decide(value, champion, 0.5)[0] is promoted


@pytest.fixture(params=["sqlite", "server"])
def store(request, tmp_path, monkeypatch):
    """A real store: a SQLite file, or a real ``mlflow server`` over HTTP."""
    if request.param == "sqlite":
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
        use_store()  # MLflow's own setting, which another test in this process may have changed
        yield
        return
    server = MlflowServer(tmp_path / "server").start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
    use_store()
    try:
        yield
    finally:
        server.stop()


def _trained(psnr: float):
    """A run with a (tiny) LoggedModel and its test PSNR: (model id, run id)."""
    import keras
    import mlflow

    mlflow.set_experiment("autoencoders")
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(4)(inputs))
    with mlflow.start_run() as run:
        model_id = log_keras_model(model, np.zeros((2, 4), np.float32), "ae")
        mlflow.log_metric("test_psnr", psnr)
    return model_id, run.info.run_id


def _gate(model_id, run_id, psnr):
    return promotion.promote("ae", model_id, "autoencoder", {"psnr": psnr}, MARGINS)


def test_the_gate_in_a_real_registry(store):
    from mlflow import MlflowClient

    client = MlflowClient()
    first = _trained(20.0)
    decision = _gate(*first, 20.0)
    assert (decision.version, decision.alias, decision.champion_version) == ("1", "champion", None)
    assert decision.reason == "no champion to beat"

    better = _trained(21.0)
    decision = _gate(*better, 21.0)
    assert (decision.version, decision.alias, decision.champion_version, decision.champion_value) == \
        ("2", "champion", "1", 20.0)
    assert str(client.get_model_version_by_alias("ae", "champion").version) == "2"

    worse = _trained(20.8)
    decision = _gate(*worse, 20.8)
    assert (decision.version, decision.alias, decision.champion_version) == ("3", "challenger", "2")
    tie = _trained(21.0)
    decision = _gate(*tie, 21.0)
    assert (decision.version, decision.alias, decision.champion_version) == ("4", "challenger", "2")
    assert "version 4 is @challenger: test_psnr 21 against champion version 2 21;" in promotion.describe(decision)
    assert str(client.get_model_version_by_alias("ae", "champion").version) == "2"

    # evaluated again with the same results: the same versions, no alias moves
    assert (_gate(*better, 21.0).version, _gate(*better, 21.0).alias) == ("2", "champion")
    assert (_gate(*tie, 21.0).version, _gate(*tie, 21.0).alias) == ("4", "challenger")
    assert str(client.get_model_version_by_alias("ae", "champion").version) == "2"
    assert str(client.get_model_version_by_alias("ae", "challenger").version) == "4"
    assert len(client.search_model_versions("name = 'ae'")) == 4

    # the champion's run deleted: its figure is gone, and the next model takes its place
    client.delete_run(better[1])
    decision = _gate(*_trained(19.0), 19.0)
    assert (decision.alias, decision.champion_version, decision.champion_value) == ("champion", "2", None)
    assert "has no test_psnr: its run is gone" in decision.reason
    assert str(client.get_model_version_by_alias("ae", "champion").version) == decision.version == "5"
