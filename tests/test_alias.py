"""sgdjax/_alias.py: sgd and sgdw against torch.optim.SGD's algorithm written out in
float64 numpy, and optax.sgd where the rules agree.
"""

import chex
import jax
import numpy as np
import optax
from absl.testing import parameterized
from helpers import NUM_STEPS, check_against_reference, random_tree, run_transform, sgd_reference

import sgdjax


class TestAliases(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.named_parameters(
        ("plain", dict()),
        ("momentum", dict(momentum=0.9)),
        ("dampening", dict(momentum=0.9, dampening=0.2)),
        ("nesterov_decay", dict(momentum=0.9, nesterov=True, weight_decay=1e-2)),
        ("maximize", dict(momentum=0.5, weight_decay=1e-2, maximize=True)),
    )
    def test_sgd(self, options):
        reference = sgd_reference(
            0.05,
            mu=options.get("momentum", 0.0),
            tau=options.get("dampening", 0.0),
            nesterov=options.get("nesterov", False),
            wd=options.get("weight_decay", 0.0),
            maximize=options.get("maximize", False),
        )
        check_against_reference(sgdjax.sgd(0.05, **options), reference, variant=self.variant)

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgd_with_schedule(self):
        def schedule(count):
            return 0.1 * 0.9**count

        check_against_reference(
            sgdjax.sgd(schedule, momentum=0.9),
            sgd_reference(lambda t: 0.1 * 0.9**t, mu=0.9),
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgdw(self):
        check_against_reference(
            sgdjax.sgdw(0.05, momentum=0.9, nesterov=True, weight_decay=0.1),
            sgd_reference(0.05, mu=0.9, nesterov=True, decoupled=0.1),
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_sgd_equals_optax_sgd_where_the_rules_agree(self):
        rng = np.random.default_rng(5)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(NUM_STEPS)]
        ours = run_transform(
            sgdjax.sgd(0.1, momentum=0.9, nesterov=True), params, grads, variant=self.variant
        )
        theirs = run_transform(
            optax.sgd(0.1, momentum=0.9, nesterov=True), params, grads, variant=self.variant
        )
        chex.assert_trees_all_close(ours, theirs, rtol=1e-6, atol=1e-7)

    def test_sgdw_without_decay_equals_sgd(self):
        rng = np.random.default_rng(6)
        params = random_tree(rng)
        grads = [random_tree(rng) for _ in range(4)]
        ours = run_transform(sgdjax.sgdw(0.1, momentum=0.9), params, grads, variant=jax.jit)
        theirs = run_transform(sgdjax.sgd(0.1, momentum=0.9), params, grads, variant=jax.jit)
        chex.assert_trees_all_equal(ours, theirs)
