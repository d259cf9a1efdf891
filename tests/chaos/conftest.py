"""Chaos suite: faults injected into real head, provider and RabbitMQ processes, with seeded randomness
(DCF_CHAOS_SEED) and bounded time. Every test records what it did in the session's ``figures``, printed
as a table at the end of the session (and written as JSON to $DCF_CHAOS_FIGURES if set)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator

import numpy as np
import pytest

from tests.chaos.harness import SEED, Figures, management_problem, private_vhost
from tests.conftest import IN_CI

_FIGURES = Figures()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos: fault injection with real processes (tests/chaos; ~4 min)")
    config.addinivalue_line("markers", "runs_last: moved to the end of the session (it stops RabbitMQ)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked runs_last go after every other test of the session, in their own order."""
    items.sort(key=lambda item: item.get_closest_marker("runs_last") is not None)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FIGURES.empty:
        return
    terminalreporter.write_sep("=", "chaos figures")
    for line in _FIGURES.lines():
        terminalreporter.write_line(line)
    _FIGURES.dump()


@pytest.fixture(scope="session")
def figures() -> Figures:
    """The session's chaos figures: jobs run, faults injected, jobs lost, wrong results, detection times."""
    return _FIGURES


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> random.Random:
    """Seeded per test (seed and test id), so one test replays the same choices when run alone."""
    return random.Random(f"{SEED}:{request.node.nodeid}")


@pytest.fixture
def nprng(rng: random.Random) -> np.random.Generator:
    return np.random.default_rng(rng.randrange(2**32))


@pytest.fixture(scope="session")
def chaos_amqp_url(amqp_url: str) -> Iterator[str]:
    """RabbitMQ on a vhost of this session's own: heads of other test runs on the same broker consume the
    default vhost's dcf.jobs and would take (and fail) jobs whose operands live in our state dirs."""
    problem = management_problem()
    if problem:
        if IN_CI:
            pytest.fail(problem)
        pytest.skip(problem)
    with private_vhost(amqp_url, f"dcf-chaos-{os.getpid()}") as url:
        yield url


_REFERENCES: dict[int, dict] = {}


@pytest.fixture(scope="session")
def reference_params() -> Iterator:
    """reference(epochs) from tests/integration/test_training.py, computed once per epoch count."""
    from tests.integration.test_training import DIGITS, reference

    def get(epochs: int) -> dict:
        if epochs not in _REFERENCES:
            _REFERENCES[epochs] = reference(DIGITS, epochs)
        return _REFERENCES[epochs]

    yield get
