"""stages/feeder.py: the batches fit trains on."""

import numpy as np

from stages.distribution import Placement
from stages.experiment_data import Arrays
from stages.feeder import ScaledBatches, on_device
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


def test_fit_trains_each_epoch_on_its_own_order_from_any_start_and_validates_in_order():
    """In a real ``fit`` (the backend's own iterators and prefetching), epoch
    *e* draws exactly the batches of the order seeded from (seed, e), also
    when it starts at a later epoch (a resumed run); the validation batches
    keep their order."""
    import keras

    from stages.feeder import EpochOrder

    x = np.arange(12, dtype=np.uint8).reshape(12, 1, 1, 1)
    labels = np.arange(12) % 2
    drawn = []

    class Seen(ScaledBatches):
        def __getitem__(self, index):
            batch = super().__getitem__(index)
            drawn.append((self.seed, self.epoch, tuple(np.asarray(batch[0]).ravel())))
            return batch

    class Epoch(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            drawn.append(("fit", epoch))

    inputs = keras.Input((1, 1, 1))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax")(keras.layers.Flatten()(inputs)))
    model.compile("sgd", "sparse_categorical_crossentropy")
    for start in (0, 3):
        drawn.clear()
        batches, validation = Seen(Arrays(x, labels), 5, False, seed=3, epoch=start), Seen(Arrays(x, labels), 5, False)
        model.fit(batches, epochs=5, initial_epoch=start, validation_data=validation,
                  callbacks=[EpochOrder(batches), Epoch()], shuffle=False, verbose=0)
        batches.release(), validation.release()  # TensorFlow keeps the datasets fit was given
        epoch = None
        for entry in drawn:
            if entry[0] == "fit":
                epoch = entry[1]
                continue
            if epoch is None:  # Keras reading batches for their shapes before the first epoch
                continue
            seed, order_epoch, pixels = entry
            if seed is None:
                continue
            assert order_epoch == epoch
        for epoch in range(start, 5):  # every training batch of the epoch, in the epoch's order
            at = drawn.index(("fit", epoch))
            following = [e for e in drawn[at + 1:at + 1 + 6] if e[0] == 3][:3]
            pixels = np.concatenate([np.array(e[2]) for e in following])
            np.testing.assert_array_equal(pixels, to_unit_float(x[_order(3, epoch, 12)]).ravel())
        validation = [np.array(e[2]) for e in drawn if e[0] is None][-3:]
        np.testing.assert_array_equal(np.concatenate(validation), to_unit_float(x).ravel())


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
