"""The promotion gate: each evaluated model is a version of a registered model
named after its experiment, and becomes ``@champion`` only when it beats the
current champion on the experiment's primary metric (test PSNR for an
autoencoder, test accuracy for a classifier) by more than the margin in
``params.yaml``'s ``promotion`` section; otherwise it is ``@challenger``.

:func:`decide` is the rule, pure; :func:`promote` applies it to MLflow's
model registry. Evaluating the same model again reuses its version, so a
re-run with the same result never moves an alias.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

log = logging.getLogger("stages.evaluate")

CHAMPION, CHALLENGER = "champion", "challenger"
# the metric each task is judged on, and the promotion section's margin for it
PRIMARY = {"autoencoder": ("psnr", "psnr_db"), "classifier": ("accuracy", "accuracy")}


@dataclass(frozen=True)
class Decision:
    model: str  # the registered model's name (the experiment's)
    version: str  # this model's version
    alias: str  # CHAMPION or CHALLENGER: the alias this version now has
    metric: str  # test_<primary metric>
    value: float  # this version's
    champion_version: str | None  # the champion it was compared with (None: there was none)
    champion_value: float | None
    margin: float
    reason: str

    def as_tags(self) -> dict[str, str]:
        return {f"promotion.{key}": "" if value is None else str(value) for key, value in asdict(self).items()}


def decide(value: float, champion: float | None, margin: float) -> tuple[bool, str]:
    """Whether a model scoring ``value`` replaces a champion scoring
    ``champion`` (None: no champion, or one whose score is lost), and why."""
    if champion is None:
        return True, "no champion to beat"
    if value > champion + margin:
        return True, f"beats the champion by {value - champion:.4g}, more than the margin {margin:g}"
    return False, f"does not beat the champion by more than the margin {margin:g} ({value - champion:+.4g})"


def _version_of(client, name: str, model_id: str):
    """The registered version of LoggedModel ``model_id``, registered now if it has none."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description=f"The models of experiment {name}, "
                                                          "promoted by the evaluate stage's gate.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    source = f"models:/{model_id}"
    for version in client.search_model_versions(f"name = '{name}'"):
        if version.source == source:
            return version
    return mlflow.register_model(source, name)


def _champion(client, name: str, metric: str):
    """(version, its ``metric``) of the current champion: (None, None) when
    there is none, (version, None) when its run (deleted, or gone from the
    store) or metric is."""
    from mlflow.exceptions import MlflowException

    try:
        version = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None, None
    try:
        run = client.get_run(version.run_id)
    except MlflowException:
        return version, None
    return version, None if run.info.lifecycle_stage == "deleted" else run.data.metrics.get(metric)


def promote(name: str, model_id: str, task: str, results: dict, margins: dict[str, float]) -> Decision:
    """Register LoggedModel ``model_id`` (whose test metrics are ``results``)
    as a version of ``name`` and give it the alias the gate decides;
    ``margins``: the promotion section (``{"psnr_db": .., "accuracy": ..}``)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    key, margin_key = PRIMARY[task]
    metric, value, margin = f"test_{key}", float(results[key]), float(margins[margin_key])
    version = _version_of(client, name, model_id)
    champion, champion_value = _champion(client, name, metric)
    if champion is not None and str(champion.version) == str(version.version):
        alias, reason = CHAMPION, "is the champion already"
    else:
        promoted, reason = decide(value, champion_value, margin)
        if champion is not None and champion_value is None:
            reason = f"the champion (version {champion.version}) has no {metric}: its run is gone"
        alias = CHAMPION if promoted else CHALLENGER
        client.set_registered_model_alias(name, alias, version.version)
    return Decision(name, str(version.version), alias, metric, value,
                    None if champion is None else str(champion.version), champion_value, margin, reason)


def describe(decision: Decision) -> str:
    """The decision in one line, both figures included."""
    against = ("no champion" if decision.champion_version is None else
               f"champion version {decision.champion_version} "
               f"{'(no figure)' if decision.champion_value is None else f'{decision.champion_value:.6g}'}")
    return (f"{decision.model} version {decision.version} is @{decision.alias}: {decision.metric} "
            f"{decision.value:.6g} against {against}; {decision.reason}")
