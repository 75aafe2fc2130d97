"""docs/params.md is generated from the params schema and must stay current."""

import subprocess
import sys
from pathlib import Path

from stages import params_doc
from stages.experiment_params import Experiment
from stages.params import Params

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs/params.md"
REGENERATE = "python -m stages.params_doc --out docs/params.md"


def _models(root) -> dict[str, type]:
    """Every pydantic model reachable from ``root``, by class name."""
    found, todo = {}, [root]
    while todo:
        model = todo.pop()
        if model.__name__ in found:
            continue
        found[model.__name__] = model
        for field in model.model_fields.values():
            nested: list = []
            params_doc._describe(field.annotation, "x", nested)
            todo += [m for _, m in nested]
    return found


def test_the_committed_page_is_the_generated_one():
    assert PAGE.read_text(encoding="utf-8") == params_doc.render(), (
        f"docs/params.md is out of date with stages/params.py or stages/experiment_params.py: run {REGENERATE}")


def test_every_key_of_every_model_is_in_the_page():
    text = params_doc.render()
    models = _models(Params)
    assert {"Limits", "Download", "Dataset", "Source", "Gaussian", "Colorize", "Experiment", "Training",
            "ResNet", "Block", "Promotion"} <= set(models)
    missing = [f"{name}.{key}" for name, model in models.items() for key in model.model_fields
               if f"| `{key}` |" not in text and f"## `{key}`" not in text]
    assert not missing, missing


def test_every_note_names_a_field_or_model_that_exists():
    models = _models(Params)
    stale = [key for key in params_doc.NOTES
             if key.split(".")[0] not in models or key.split(".")[1] not in models[key.split(".")[0]].model_fields]
    stale += [name for name in params_doc.CLASS_NOTES if name not in models]
    assert not stale, stale


def test_every_experiment_key_says_what_it_does():
    """Each key of an experiment has a comment in the source or a note."""
    undocumented = []
    for name, model in _models(Experiment).items():
        comments = params_doc._comments(model)
        undocumented += [f"{name}.{key}" for key in model.model_fields
                         if key != "kind" and key not in comments and f"{name}.{key}" not in params_doc.NOTES]
    assert not undocumented, undocumented


def test_the_module_writes_the_page_to_stdout_and_to_a_file(tmp_path):
    out = tmp_path / "params.md"
    run = [sys.executable, "-m", "stages.params_doc"]
    printed = subprocess.run(run, cwd=REPO, capture_output=True, text=True, check=True).stdout
    written = subprocess.run(run + ["--out", str(out)], cwd=REPO, capture_output=True, text=True, check=True)
    assert printed == out.read_text(encoding="utf-8") == params_doc.render()
    assert written.stdout == ""
