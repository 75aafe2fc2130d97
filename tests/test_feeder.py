"""stages/feeder.py: the batches fit trains on."""

import numpy as np
import pytest

from stages.distribution import Placement
from stages.experiment_data import Arrays
from stages.feeder import ScaledBatches, for_fit, on_device, tf_batches
from stages.images import to_unit_float


def _order(seed, epoch, count):
    return np.random.default_rng([seed, epoch]).permutation(count)


def test_batches_are_scaled_one_at_a_time_in_the_epochs_order():
    """An epoch's images stay uint8: each batch is gathered in the epoch's
    order, seeded from (seed, epoch), and scaled when asked for, the last one
    short; labels stay labels."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = np.arange(10) % 3
    order = _order(7, 2, 10)
    batches = ScaledBatches(Arrays(x, labels), 4, image_targets=False, seed=7, epoch=2)
    assert len(batches) == 3
    got = [batches[i] for i in range(len(batches))]
    assert [len(b[0]) for b in got] == [4, 4, 2]
    np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), to_unit_float(x[order]))
    np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), labels[order])
    assert got[0][0].dtype == np.float32 and got[0][1].dtype == labels.dtype

    targets = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    x_b, y_b = ScaledBatches(Arrays(x, targets), 4, image_targets=True, seed=7, epoch=2)[2]
    np.testing.assert_array_equal(y_b, to_unit_float(targets[order[8:]]))
    x_b, y_b = ScaledBatches(Arrays(x, x), 4, image_targets=True, seed=7, epoch=2)[1]
    assert y_b is x_b  # one array reconstructing itself is gathered and scaled once


def test_batches_are_endless_and_each_index_falls_in_its_epoch():
    """Training batches never run out: index i is batch i % 3 of epoch
    start + i // 3, whatever was asked before (prefetching jumps ahead);
    validation batches are one epoch. Released, a prefetch past the last
    epoch gets a spare batch; validation raises."""
    x = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1)
    labels = np.arange(10)
    batches = ScaledBatches(Arrays(x, labels), 4, image_targets=False, seed=7, epoch=2)
    assert batches.num_batches is None and batches.per_epoch == len(batches) == 3
    later = batches[7]  # epoch 4, second batch, before anything of epoch 3
    np.testing.assert_array_equal(batches[3][1], _order(7, 3, 10)[:4])
    np.testing.assert_array_equal(later[1], _order(7, 4, 10)[4:8])
    np.testing.assert_array_equal(batches[2][1], _order(7, 2, 10)[8:])
    validation = ScaledBatches(Arrays(x, labels), 4, image_targets=False)
    assert validation.num_batches == 3
    np.testing.assert_array_equal(np.concatenate([validation[i][1] for i in range(3)]), labels)
    first = batches[0]
    batches.release(), validation.release()
    assert np.array_equal(batches[12][1], first[1])
    with pytest.raises(RuntimeError, match="released"):
        validation[0]


def test_calls_into_the_backend_end_on_an_epochs_end():
    """The batches per call divide an epoch's: the largest up to the wanted
    number, or the smallest above it where that is under half (MNIST's 54,000
    training images in batches of 256 make 211 batches, a prime)."""
    from stages.training import execution_steps

    cases = {(16, 20): 10, (16, 100): 10, (16, 196): 14, (16, 47): 47, (16, 235): 47, (16, 211): 211,
             (16, 3): 3, (1, 47): 1, (1, 211): 1, (25, 4167): 463, (25, 4500): 25, (4, 6): 3, (16, 391): 17}
    for (wanted, per_epoch), steps in cases.items():
        assert execution_steps(wanted, per_epoch) == steps, (wanted, per_epoch)
        assert per_epoch % steps == 0


@pytest.mark.parametrize("feeder", ["PyDataset", "for_fit"])
@pytest.mark.parametrize("start", [0, 3])
def test_fit_trains_each_epoch_on_its_own_order_from_any_start_and_validates_in_order(start, feeder):
    """In a real ``fit`` (one iterator for all epochs, the backend
    prefetching across their ends, calls of 3 batches), epoch *e* trains on
    exactly the batches of the order seeded from (seed, e), each once, also
    when it starts at a later epoch (a resumed run); the validation batches
    keep their order. The model itself records what it is given: through
    the PyDataset and through what the stage gives ``fit`` on this backend."""
    import keras

    from stages.training import execution_steps

    x = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    labels = np.arange(12) % 2
    seen = []

    class Record(keras.layers.Layer):
        def call(self, inputs, training=None):  # eager: real batches
            seen.append(("train" if training else "val", np.asarray(inputs).ravel()))
            return inputs

        def compute_output_shape(self, shape):
            return shape

    class Epoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            seen.append(("epoch", epoch))

    inputs = keras.Input((1, 1, 1))
    outputs = keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(Record()(inputs)))
    model = keras.Model(inputs, outputs)
    per_epoch = 6
    if feeder == "PyDataset":
        batches, validation = ScaledBatches(Arrays(x, labels), 2, False, seed=3, epoch=start), \
            ScaledBatches(Arrays(x, labels), 5, False)
        assert batches.per_epoch == per_epoch
    else:
        batches, validation = for_fit(Arrays(x, labels), 2, False, seed=3, epoch=start, epochs=5), \
            for_fit(Arrays(x, labels), 5, False)
    assert execution_steps(4, per_epoch) == 3  # 6 batches an epoch: calls of 3, not 4
    model.compile("sgd", "sparse_categorical_crossentropy", run_eagerly=True,
                  steps_per_execution=execution_steps(4, per_epoch))
    model.fit(batches, epochs=5, initial_epoch=start, steps_per_epoch=per_epoch, validation_data=validation,
              callbacks=[Epoch()], shuffle=False, verbose=0)
    if feeder == "PyDataset":
        batches.release(), validation.release()  # TensorFlow keeps the datasets fit was given
    marks = [at for at, entry in enumerate(seen) if entry[0] == "epoch"]
    assert [seen[at][1] for at in marks] == list(range(start, 5))
    for at, end in zip(marks, [*marks[1:], len(seen)]):
        epoch = seen[at][1]
        trained = np.concatenate([pixels for kind, pixels in seen[at + 1:end] if kind == "train"])
        np.testing.assert_array_equal(trained, to_unit_float(x[_order(3, epoch, 12)]).ravel())
        validated = np.concatenate([pixels for kind, pixels in seen[at + 1:end] if kind == "val"])
        np.testing.assert_array_equal(validated, to_unit_float(x).ravel())


@pytest.mark.parametrize("targets", ["labels", "images", "itself"])
@pytest.mark.parametrize("start", [0, 2])
def test_tensorflow_pipeline_makes_the_pydatasets_batches_bit_for_bit(targets, start):
    """tf_batches: every batch of every epoch from ``start`` on (the last
    of each short), then the validation batches, equal to ScaledBatches'
    bit for bit, with the same dtypes; nothing after the last epoch."""
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (11, 3, 2, 3), dtype=np.uint8)
    y = {"labels": np.arange(11) % 4, "images": rng.integers(0, 256, (11, 3, 2, 3), dtype=np.uint8),
         "itself": x}[targets]
    arrays, image_targets = Arrays(x, y), targets != "labels"
    reference = ScaledBatches(arrays, 4, image_targets, seed=5, epoch=start)
    made = [tuple(np.asarray(part) for part in batch)
            for batch in tf_batches(arrays, 4, image_targets, seed=5, epoch=start, epochs=4)]
    assert len(made) == (4 - start) * reference.per_epoch == (4 - start) * 3
    for index, (got, wanted) in enumerate(zip(made, (reference[i] for i in range(len(made))))):
        for part_got, part_wanted in zip(got, wanted):
            assert part_got.dtype == part_wanted.dtype, index
            np.testing.assert_array_equal(part_got, part_wanted, err_msg=f"batch {index}")
    validation = ScaledBatches(arrays, 4, image_targets)
    dataset = tf_batches(arrays, 4, image_targets)
    assert int(dataset.cardinality()) == 3  # counted: Keras' evaluate knows where it ends (no "ran out of data")
    made = list(dataset)
    assert len(made) == len(validation) == 3
    for got, wanted in zip(made, (validation[i] for i in range(3))):
        for part_got, part_wanted in zip(got, wanted):
            np.testing.assert_array_equal(np.asarray(part_got), part_wanted)


def test_data_parallel_batches_split_evenly_and_each_process_gets_its_share():
    """On JAX every batch is sharded over the devices: the epoch's last batch
    is cut to a multiple of them (never below), and each of several processes
    gets its own contiguous share of every batch; the shares put side by side
    are the one-process batch."""
    assert [Placement(4, batch_multiple=4).usable_rows(n, 8) for n in (32, 33, 35, 36, 39)] == [32, 32, 32, 36, 36]
    assert Placement(4).usable_rows(13, 8) == 13  # TensorFlow splits uneven batches itself
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (23, 3, 3, 1), dtype=np.uint8)
    labels = np.arange(23)
    whole = ScaledBatches(Arrays(x, labels), 8, False, 1, 0, Placement(4, 1, 0, 4))
    assert len(whole) == 3 and [len(whole[i][1]) for i in range(3)] == [8, 8, 4]  # 7 cut to 4: 3 left out
    shares = [ScaledBatches(Arrays(x, labels), 8, False, 1, 0, Placement(4, 2, index, 4)) for index in (0, 1)]
    for i in range(3):
        parts = [share[i] for share in shares]
        assert len(parts[0][1]) == len(parts[1][1]) == len(whole[i][1]) // 2
        np.testing.assert_array_equal(np.concatenate([part[1] for part in parts]), whole[i][1])
        np.testing.assert_array_equal(np.concatenate([part[0] for part in parts]), whole[i][0])
    np.testing.assert_array_equal(whole[2][1], _order(1, 0, 23)[16:20])


def test_batches_made_on_the_device_are_the_host_batches_bit_for_bit():
    """``data_on_device``: the uint8 arrays become backend tensors once; each
    batch gathered and scaled there equals the NumPy one exactly (every pixel
    value 0-255 occurs), labels included, and an autoencoder's one array is
    still gathered once."""
    import keras

    rng = np.random.default_rng(1)
    x = rng.permutation(np.resize(np.arange(256, dtype=np.uint8), 11 * 5 * 5 * 3)).reshape(11, 5, 5, 3)
    labels = np.arange(11) % 4
    for arrays, image_targets in ((Arrays(x, labels), False), (Arrays(x, x[::-1].copy()), True)):
        host = ScaledBatches(arrays, 4, image_targets, seed=2)
        device_arrays = on_device(arrays)
        assert not isinstance(device_arrays.x, np.ndarray) and keras.ops.dtype(device_arrays.x) == "uint8"
        device = ScaledBatches(device_arrays, 4, image_targets, seed=2)
        assert len(device) == len(host) == 3
        for i in range(len(host)):
            for want, got in zip(host[i], device[i]):
                assert not isinstance(got, np.ndarray)
                got = keras.ops.convert_to_numpy(got)
                assert got.dtype == want.dtype and got.shape == want.shape
                assert np.array_equal(got, want)  # bit for bit, not approximately
    same = on_device(Arrays(x, x))
    assert same.y is same.x
    x_b, y_b = ScaledBatches(same, 4, image_targets=True, seed=2)[0]
    assert y_b is x_b
