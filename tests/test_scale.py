"""sgdjax/_scale.py: scale and scale_by_learning_rate against a float64 numpy reference."""

import chex
from helpers import check_against_reference

import sgdjax


class TestScaling(chex.TestCase):
    @chex.variants(with_jit=True, without_jit=True)
    def test_scale(self):
        check_against_reference(
            sgdjax.scale(-0.3),
            lambda g, p, t: {k: -0.3 * v for k, v in g.items()},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_learning_rate_constant(self):
        check_against_reference(
            sgdjax.scale_by_learning_rate(0.05),
            lambda g, p, t: {k: -0.05 * v for k, v in g.items()},
            variant=self.variant,
        )

    @chex.variants(with_jit=True, without_jit=True)
    def test_scale_by_learning_rate_schedule_is_evaluated_at_the_update_count(self):
        def schedule(count):
            return 0.1 * 0.5 ** (count // 3)

        check_against_reference(
            sgdjax.scale_by_learning_rate(schedule),
            lambda g, p, t: {k: -0.1 * 0.5 ** (t // 3) * v for k, v in g.items()},
            variant=self.variant,
        )
