"""Each alias solves the shared problem set to the tolerance the problem states."""

import pytest
from helpers import complex_quadratic, logistic_regression, minimise, quadratic, rosenbrock

import sgdjax

# (optimizer, steps) per problem; learning rates chosen for each problem's curvature.
CASES = {
    "quadratic": (
        quadratic,
        [
            ("sgd", sgdjax.sgd(0.03), 600),
            ("momentum", sgdjax.sgd(0.01, momentum=0.9), 600),
            ("nesterov", sgdjax.sgd(0.01, momentum=0.9, nesterov=True), 600),
            ("dampening", sgdjax.sgd(0.01, momentum=0.9, dampening=0.5), 800),
            ("sgdw", sgdjax.sgdw(0.01, momentum=0.9, weight_decay=1e-6), 600),
            (
                "clipped",
                sgdjax.chain(sgdjax.clip_by_global_norm(10.0), sgdjax.sgd(0.01, momentum=0.9)),
                600,
            ),
        ],
    ),
    "rosenbrock": (
        rosenbrock,
        [
            ("momentum", sgdjax.sgd(1e-3, momentum=0.9), 20_000),
            ("nesterov", sgdjax.sgd(1e-3, momentum=0.9, nesterov=True), 20_000),
            (
                "clipped",
                sgdjax.chain(sgdjax.clip_by_global_norm(1.0), sgdjax.sgd(1e-3, momentum=0.9)),
                20_000,
            ),
        ],
    ),
    "logistic_regression": (
        logistic_regression,
        [
            ("sgd", sgdjax.sgd(1.0), 500),
            ("nesterov", sgdjax.sgd(0.5, momentum=0.9, nesterov=True), 300),
            ("weight_decay", sgdjax.sgd(0.5, momentum=0.9, weight_decay=1e-4), 300),
            ("sgdw", sgdjax.sgdw(0.5, momentum=0.9, weight_decay=1e-4), 300),
        ],
    ),
    "complex_quadratic": (
        complex_quadratic,
        [
            ("sgd", sgdjax.sgd(0.05), 600),
            ("nesterov", sgdjax.sgd(0.02, momentum=0.9, nesterov=True), 600),
            ("dampening", sgdjax.sgd(0.02, momentum=0.9, dampening=0.5), 800),
            (
                "clipped",
                sgdjax.chain(sgdjax.clip_by_global_norm(10.0), sgdjax.sgd(0.02, momentum=0.9)),
                600,
            ),
            (
                "lars",
                sgdjax.lars(
                    sgdjax.schedules.cosine_annealing(0.5, t_max=600), trust_coefficient=0.1
                ),
                600,
            ),
            ("schedule_free", sgdjax.schedule_free_sgd(0.08), 1500),
        ],
    ),
}

PARAMS = [
    pytest.param(make, tx, steps, id=f"{problem}-{name}")
    for problem, (make, runs) in CASES.items()
    for name, tx, steps in runs
]


@pytest.mark.parametrize("make_problem, tx, num_steps", PARAMS)
def test_alias_solves_problem(make_problem, tx, num_steps):
    problem = make_problem()
    params = minimise(tx, problem, num_steps)
    assert problem.solved(params), (problem.name, params, float(problem.loss(params)))
