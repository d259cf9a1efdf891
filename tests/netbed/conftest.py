"""The network test bed's pytest wiring: its marker, when it runs, and the figures it prints.

The bed needs root, ``ip netns``, ``tc`` and ``iptables`` and takes a minute or two, so the plain test
command skips it; ``.ci/run``'s netbed stage runs it with ``DCF_NETBED_REQUIRED=1`` (a bed that cannot
be built is then a failure), and ``DCF_NETBED=1`` runs it here when it can be built."""

from __future__ import annotations

import os

import pytest

from tests.netbed import harness

ENABLED = harness.REQUIRED or os.environ.get("DCF_NETBED", "") not in ("", "0")
#: lines every test adds to the summary: what the bed measured (detection times, shares, bytes)
FIGURES: list[str] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "netbed: hosts in network namespaces (tests/netbed; root, DCF_NETBED=1)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if ENABLED:
        return
    skip = pytest.mark.skip(reason="the namespace test bed runs with DCF_NETBED=1 (.ci/run's netbed stage)")
    for item in items:
        if item.get_closest_marker("netbed") is not None:
            item.add_marker(skip)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FIGURES:
        terminalreporter.section("network test bed figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture
def figures() -> list[str]:
    return FIGURES
