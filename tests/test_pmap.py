"""The update under pmap and under jit with a sharded mesh equals the unmapped update."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import sgdjax

NUM_STEPS = 5


def _problem():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(64, 6)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 2)), jnp.float32)
    params = {"w": jnp.asarray(rng.normal(size=(6, 2)), jnp.float32), "b": jnp.zeros(2)}
    return x, y, params


def _loss(params, x, y):
    return jnp.mean((x @ params["w"] + params["b"][None, :] - y) ** 2)


def _tx():
    return sgdjax.chain(
        sgdjax.clip_by_global_norm(0.5),
        sgdjax.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    )


def _single_device_run(tx, x, y, params):
    state = tx.init(params)

    @jax.jit
    def step(params, state):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    for _ in range(NUM_STEPS):
        params, state = step(params, state)
    return params, state


def test_eight_devices():
    assert jax.device_count() == 8


def test_pmap_update_equals_unmapped_update():
    x, y, params = _problem()
    tx = _tx()
    expected_params, expected_state = _single_device_run(tx, x, y, params)

    def step(params, state, x, y):
        grads = jax.lax.pmean(jax.grad(_loss)(params, x, y), "devices")
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    pstep = jax.pmap(step, axis_name="devices")
    replicate = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * 8), tree)  # noqa: E731
    p_params, p_state = replicate(params), replicate(tx.init(params))
    xs, ys = x.reshape(8, 8, 6), y.reshape(8, 8, 2)
    for _ in range(NUM_STEPS):
        p_params, p_state = pstep(p_params, p_state, xs, ys)
    for device in range(8):
        on_device = jax.tree.map(lambda a, d=device: a[d], (p_params, p_state))
        chex.assert_trees_all_close(
            on_device, (expected_params, expected_state), rtol=1e-5, atol=1e-6
        )


def test_jit_with_sharded_batch_equals_unmapped_update():
    x, y, params = _problem()
    tx = _tx()
    expected_params, _ = _single_device_run(tx, x, y, params)

    mesh = Mesh(np.asarray(jax.devices()), ("data",))
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec("data"))
    x_s, y_s = jax.device_put(x, sharded), jax.device_put(y, sharded)
    params_r = jax.device_put(params, replicated)
    state = jax.device_put(tx.init(params), replicated)

    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return sgdjax.apply_updates(params, updates), state

    for _ in range(NUM_STEPS):
        params_r, state = step(params_r, state, x_s, y_s)
    chex.assert_trees_all_close(params_r, expected_params, rtol=1e-5, atol=1e-6)
    assert params_r["w"].sharding.is_fully_replicated
