"""The checkpoint files: two slots taking turns, overwritten in place, read back exactly."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from stages.checkpoint import SLOTS, Checkpoint, State, all_variables, host_array, write_variables


def _trained_model(seed: int = 0) -> keras.Model:
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Conv2D(3, 3, activation="relu")(inputs)
    x = keras.layers.BatchNormalization()(x)
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    _step(model, seed)
    return model


def _step(model: keras.Model, seed: int = 1) -> None:
    """One epoch (one batch) on data drawn from ``seed``: every variable moves."""
    rng = np.random.default_rng(seed)
    model.fit(rng.random((8, 6, 6, 1), dtype=np.float32), rng.integers(0, 2, 8), epochs=1, verbose=0)


def _saved(path) -> list[np.ndarray]:
    with np.load(path) as arrays:
        return [arrays[f"v{index}"] for index in range(len(arrays.files))]


def _values(model: keras.Model) -> list[np.ndarray]:
    return [np.array(keras.ops.convert_to_numpy(v)) for v in all_variables(model)]


def test_a_checkpoint_holds_every_variable_exactly(tmp_path):
    model = _trained_model()
    write_variables(all_variables(model), tmp_path / "v.npz")
    saved, values = _saved(tmp_path / "v.npz"), _values(model)
    assert len(saved) == len(values) > 6  # the optimizer's too (its iteration count is a 0-d array)
    for got, want in zip(saved, values):
        assert got.dtype == want.dtype and got.shape == want.shape and np.array_equal(got, want)


def test_overwriting_a_longer_file_in_place_leaves_nothing_of_it(tmp_path):
    path = tmp_path / "v.npz"
    path.write_bytes(b"x" * 10_000_000)
    model = _trained_model()
    write_variables(all_variables(model), path)
    assert path.stat().st_size < 1_000_000
    assert all(np.array_equal(a, b) for a, b in zip(_saved(path), _values(model)))


@pytest.mark.skipif(keras.backend.backend() not in ("tensorflow", "jax"), reason="zero-copy reads: TF and JAX")
def test_host_array_is_the_variables_own_memory_and_not_a_copy(tmp_path):
    """What keeps a checkpoint from allocating a second copy of the model."""
    model = _trained_model()
    kernel = model.layers[1].kernel
    first, second = host_array(kernel), host_array(kernel)
    assert np.shares_memory(first, second)
    before = first.copy()
    del first, second
    _step(model)  # the optimizer updates the variable in place once nothing views it
    assert not np.array_equal(before, host_array(kernel))


def test_checkpoints_take_turns_in_two_files_overwritten_in_place(tmp_path):
    model = _trained_model()
    checkpoint = Checkpoint(tmp_path / "ck", "fp")
    state = checkpoint.start("run")
    names, inodes = [], []
    for epoch in (1, 2, 3):
        state.epoch = epoch
        checkpoint.save(model, state)
        assert json.loads(checkpoint.path.read_text())["variables"] == state.variables
        assert all(np.array_equal(a, b) for a, b in zip(_saved(checkpoint.folder / state.variables), _values(model)))
        names.append(state.variables)
        inodes.append((checkpoint.folder / state.variables).stat().st_ino)
        _step(model)
    assert names == [SLOTS[0], SLOTS[1], SLOTS[0]]
    assert inodes[2] == inodes[0]  # the same file, rewritten
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == sorted([*SLOTS, "state.json"])
    state.epoch = 4
    checkpoint.save(model, state, keep_spare=False)  # the last one
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == ["state.json", SLOTS[1]]


def test_a_state_of_an_older_version_names_its_file_by_epoch_and_the_next_checkpoint_replaces_it(tmp_path):
    model = _trained_model()
    checkpoint = Checkpoint(tmp_path / "ck", "fp")
    checkpoint.folder.mkdir()
    write_variables(all_variables(model), checkpoint.folder / "variables-2.npz")
    checkpoint.write(State("fp", "run", epoch=2, variables="variables-2.npz"))
    state = checkpoint.read()
    fresh = _trained_model(seed=5)
    checkpoint.restore(fresh, state)
    assert all(np.array_equal(a, b) for a, b in zip(_values(fresh), _values(model)))
    state.epoch = 3
    checkpoint.save(fresh, state)
    assert sorted(p.name for p in checkpoint.folder.iterdir()) == ["state.json", SLOTS[0]]


def test_killed_while_overwriting_the_named_file_is_untouched(tmp_path, monkeypatch):
    """A kill in the middle of a checkpoint: state.json still names a complete file of the last one."""
    import stages.checkpoint as checkpoint_mod

    model = _trained_model()
    checkpoint = Checkpoint(tmp_path / "ck", "fp")
    state = checkpoint.start("run")
    state.epoch = 1
    checkpoint.save(model, state)
    state.epoch = 2
    checkpoint.save(model, state)
    kept = _values(model)
    _step(model)

    def killed(variables, path):
        path.write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_mod, "write_variables", killed)
    state.epoch = 3
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(model, state)
    on_disk = checkpoint.read()
    assert on_disk.epoch == 2 and on_disk.variables == SLOTS[1]
    assert all(np.array_equal(a, b) for a, b in zip(_saved(checkpoint.folder / SLOTS[1]), kept))
