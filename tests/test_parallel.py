"""Every parallel mode equals the single-device run on the whole batch (8 fake CPU devices)."""

import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_image_folder

import sgdjax
from sgdjax import data, parallel, training

BATCH = 16


def _batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [
        {
            "image": rng.integers(0, 256, (BATCH, 8, 8, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
        }
        for _ in range(count)
    ]


class _TinyNet(training.ConvNet):
    """The ConvNet on 8x8 inputs (two pools leave 2x2): fast enough for 20 steps x 5 modes."""


def _state(bn_axis_name=None):
    model = _TinyNet(bn_axis_name=bn_axis_name)
    tx = sgdjax.sgd(0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return training.TrainState.create(
        model=model, tx=tx, rng=jax.random.key(0), sample_input=jnp.zeros((1, 8, 8, 3))
    )


def _run(mode, batches, **options):
    parallel_step = training.make_parallel_train_step(mode, num_devices=8, **options)
    state = parallel_step.place_state(_state("data" if training.needs_bn_axis(mode) else None))
    for batch in batches:
        state, metrics = parallel_step.step(state, parallel_step.place_batch(batch))
    return parallel_step.gather_state(state), metrics, state


def _comparable(state):
    return jax.tree.map(np.asarray, (state.step, state.params, state.model_state, state.opt_state))


@pytest.fixture(scope="module")
def reference():
    batches = _batches(20)
    return {
        count: _run("none", batches[:count], augment_fn=data.augment) for count in (1, 20)
    }, batches


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "zero"])
@pytest.mark.parametrize("count", [1, 20])
def test_mode_equals_single_device(reference, mode, count):
    expected, batches = reference
    state, metrics, _ = _run(mode, batches[:count], augment_fn=data.augment)
    chex.assert_trees_all_close(
        _comparable(state), _comparable(expected[count][0]), rtol=1e-5, atol=1e-5
    )
    expected_metrics = expected[count][1]
    for key in ("loss", "accuracy"):
        np.testing.assert_allclose(np.ravel(metrics[key])[0], expected_metrics[key], rtol=1e-5)


@pytest.mark.parametrize("mode", ["pmap", "sharded"])
def test_sam_under_data_parallelism_equals_single_device(reference, mode):
    _, batches = reference
    expected, _, _ = _run("none", batches[:3], sam_rho=0.05)
    state, _, _ = _run(mode, batches[:3], sam_rho=0.05)
    chex.assert_trees_all_close(_comparable(state), _comparable(expected), rtol=1e-5, atol=1e-5)


def test_zero_partitions_optimizer_state():
    _, _, placed = _run("zero", _batches(1))
    _, _, replicated = _run("sharded", _batches(1))
    zero_bytes = parallel.bytes_per_device(placed.opt_state)
    full_bytes = parallel.bytes_per_device(replicated.opt_state)
    assert len(zero_bytes) == 8
    ratio = max(zero_bytes.values()) / max(full_bytes.values())
    assert ratio < 0.2, ratio  # about 1/8, plus the few leaves too small to split
    assert any(not leaf.sharding.is_fully_replicated for leaf in jax.tree.leaves(placed.opt_state))


def test_accumulation_equals_one_large_batch():
    """Without BatchNorm, k micro-batches per update equal one k-times-larger batch."""
    import flax.linen as nn

    class NoNorm(nn.Module):
        @nn.compact
        def __call__(self, x, *, train):
            x = nn.relu(nn.Conv(8, (3, 3))(x))
            return nn.Dense(10)(x.reshape(x.shape[0], -1))

    def fresh():
        return training.TrainState.create(
            model=NoNorm(), tx=sgdjax.sgd(0.05, momentum=0.9), rng=jax.random.key(1),
            sample_input=jnp.zeros((1, 8, 8, 3)),
        )  # fmt: skip

    batches = _batches(3)
    whole = training.make_train_step()
    accumulated = training.make_train_step(accumulate=4)
    state_a, state_b = fresh(), fresh()
    for batch in batches:
        state_a, _ = whole(state_a, batch)
        state_b, _ = accumulated(state_b, batch)
    chex.assert_trees_all_close(state_a.params, state_b.params, rtol=1e-5, atol=1e-6)


def test_clear_errors():
    with pytest.raises(ValueError, match="only 8 cpu device"):
        training.make_parallel_train_step("sharded", num_devices=9)
    with pytest.raises(ValueError, match="mode must be one of"):
        training.make_parallel_train_step("ring")
    step = training.make_parallel_train_step("pmap", num_devices=8)
    with pytest.raises(ValueError, match="batch size 12 is not divisible by the device count 8"):
        step.place_batch({"image": np.zeros((12, 8, 8, 3), np.uint8), "label": np.zeros(12)})


def test_initialize_distributed_is_a_no_op_for_one_process(monkeypatch):
    for name in (
        "SGDJAX_COORDINATOR",
        "SGDJAX_NUM_PROCESSES",
        "SGDJAX_PROCESS_ID",
        "SLURM_JOB_ID",
        "TPU_WORKER_HOSTNAMES",
        "OMPI_COMM_WORLD_SIZE",
    ):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False
    with pytest.raises(ValueError, match="SGDJAX_PROCESS_ID"):
        parallel.initialize_distributed(coordinator_address="localhost:1234", num_processes=2)


def test_use_cpu_devices_checks_its_argument_and_the_start_up_order():
    from sgdjax.parallel import use_cpu_devices

    with pytest.raises(ValueError, match="positive integer"):
        use_cpu_devices(0)
    jax.devices()  # the backends are up in the test process
    with pytest.raises(RuntimeError, match="before JAX's first computation"):
        use_cpu_devices(2)


# ---------------------------------------------------------------- the engine, every mode


def _engine_rows(tmp_path, name, **overrides):
    rng = np.random.default_rng(3)
    dataset = data.Dataset(
        rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 64),
        rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 24),
        tuple(str(i) for i in range(10)),
    )  # fmt: skip
    values = dict(widths=(4, 8), epochs=2, batch_size=16, eval_batch_size=16, crop_padding=2,
                  tensorboard=False, checkpoint_every=0)  # fmt: skip
    values.update(overrides)
    config = training.Config(**values)
    training.train_and_evaluate(config, tmp_path / name, progress=False, dataset=dataset,
                                log=lambda line: None)  # fmt: skip
    rows = [
        json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    ]
    keys = ("step", "train_loss", "train_accuracy", "test_loss", "test_accuracy")
    return [[row[key] for key in keys] for row in rows]


@pytest.fixture(scope="module")
def engine_reference(tmp_path_factory):
    return _engine_rows(tmp_path_factory.mktemp("engine"), "none")


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "zero"])
def test_engine_in_every_mode_equals_one_device(engine_reference, tmp_path, mode):
    rows = _engine_rows(tmp_path, mode, parallel=mode, num_devices=8)
    np.testing.assert_allclose(rows, engine_reference, rtol=1e-5)


def test_host_fed_batches_equal_device_resident_data(engine_reference, tmp_path):
    rows = _engine_rows(tmp_path, "host", data_placement="host")
    np.testing.assert_allclose(rows, engine_reference, rtol=1e-6)


def test_engine_step_options_in_a_mode(tmp_path):
    """EMA, SAM and accumulation run sharded to the same numbers as on one device."""
    for options in (dict(ema_decay=0.9, sam_rho=0.05), dict(accumulate=2)):
        one = _engine_rows(tmp_path, "one", epochs=1, **options)
        sharded = _engine_rows(tmp_path, "sharded", epochs=1, parallel="sharded", num_devices=4,
                               **options)  # fmt: skip
        np.testing.assert_allclose(sharded, one, rtol=1e-4)  # EMA + SAM: float32 sums reordered
        for name in ("one", "sharded"):
            import shutil

            shutil.rmtree(tmp_path / name)


def test_one_step_per_program_on_cpu_is_decided_in_one_place():
    assert jax.default_backend() == "cpu"
    assert training.steps_per_program(None, 390) == 1
    assert training.steps_per_program(8, 390) == 8
    assert training.steps_per_program(1000, 390) == 390


# ---------------------------------------------------------------- data split over devices


def _gathered_batches(mode, shard_data, images, labels, order):
    """Every device's share of each batch of ``order``, as one global batch per step."""
    placement = training.make_placement(mode, 4, shard_data=shard_data)
    kind = placement.data_kind()
    placed = (placement.place(images, kind), placement.place(labels, kind))
    state = placement.place_state(_state())  # the jit modes compile after it

    def body(state, images, labels, order, *, axis_name, constrain):
        taken = [placement.take(images, labels, batch, axis_name) for batch in order]
        if axis_name is not None:  # the shares, gathered in device order
            taken = jax.lax.all_gather(taken, axis_name, tiled=True)
        return state, taken

    kinds = (kind, kind, "replicated")
    program = placement.compile(body, kinds, donate=False)
    _, taken = program(state, *placed, placement.place(order, "replicated"))
    return jax.tree.map(np.asarray, placement.first(taken)), placed


@pytest.mark.parametrize("mode", ["pmap", "sharded", "shard_map", "zero"])
def test_a_data_set_split_over_the_devices_gives_the_batches_of_a_replicated_one(mode):
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (40, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 40).astype(np.int32)
    order = rng.permutation(40)[:32].reshape(4, 8).astype(np.int32)
    split, placed = _gathered_batches(mode, True, images, labels, order)
    whole, placed_whole = _gathered_batches(mode, False, images, labels, order)
    for step, batch in enumerate(order):  # the reference: numpy's own gather
        for got in (split, whole):
            np.testing.assert_array_equal(got[step][0], images[batch])
            np.testing.assert_array_equal(got[step][1], labels[batch])
            np.testing.assert_array_equal(got[step][2], batch)
    # Each device holds a quarter of the rows instead of all of them.
    held = parallel.bytes_per_device(placed)
    assert sorted(held.values()) == [10 * (4 * 4 * 3 + 4)] * 4
    assert sorted(parallel.bytes_per_device(placed_whole).values()) == [40 * (4 * 4 * 3 + 4)] * 4


def test_the_data_is_split_exactly_when_the_data_axis_has_several_devices():
    assert training.make_placement("sharded", 4).shard_data
    assert training.make_placement("pmap", 2).data_kind(stacked=True) == "steps_batch"
    assert not training.make_placement("sharded", 1).shard_data
    assert training.make_placement("none").data_kind() == "replicated"
    with pytest.raises(ValueError, match="shard_data needs a data axis"):
        training.make_placement("none", shard_data=True)


def test_a_lazy_load_reads_only_the_rows_indexed(tmp_path, monkeypatch):
    """What each process of a multi-process run reads: the image folder's files it
    indexes (decoded on demand), or the cache's rows (memory-mapped)."""
    from sgdjax.data import _cifar

    write_image_folder(tmp_path / "data", ("a", "b"), train_per_class=3, test_per_class=1, seed=1)
    cache = tmp_path / "cache"
    decoded = []
    original = _cifar._decode
    monkeypatch.setattr(_cifar, "_decode", lambda file: decoded.append(file.name) or original(file))
    lazy = data.load_cifar10(tmp_path / "data", cache_dir=cache, lazy=True)
    assert decoded == [] and not cache.exists()  # nothing decoded, no cache written
    rows = np.asarray([1, 4])
    np.testing.assert_array_equal(lazy.train_labels, [0, 0, 0, 1, 1, 1])
    picked = lazy.train_images[rows]
    assert decoded == ["0001.png", "0001.png"]  # a/0001.png and b/0001.png only
    eager = data.load_cifar10(tmp_path / "data", cache_dir=cache)  # decodes all, writes the cache
    np.testing.assert_array_equal(picked, eager.train_images[rows])
    np.testing.assert_array_equal(np.asarray(lazy.test_images), eager.test_images)
    mapped = data.load_cifar10(tmp_path / "data", cache_dir=cache, lazy=True)
    assert isinstance(mapped.train_images, np.memmap)
    np.testing.assert_array_equal(mapped.train_images[rows], eager.train_images[rows])
