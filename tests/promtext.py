"""A strict reader of the Prometheus text exposition format 0.0.4, for the tests."""

from __future__ import annotations

import re

METRIC_LINE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"(?:,|$)')
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}


def parse_prometheus(text: str) -> tuple[dict[str, str], dict[tuple[str, frozenset[tuple[str, str]]], float]]:
    """A strict reader of the text format 0.0.4: (metric family -> type, (name, labels) -> value).
    Fails on any line that does not follow the format."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    types: dict[str, str] = {}
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for line in text.splitlines():
        if not line:
            continue
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if parts[1] == "TYPE":
                assert parts[3] in TYPES, line
                assert parts[2] not in types, f"TYPE given twice: {line}"
                types[parts[2]] = parts[3]
            else:
                assert parts[1] == "HELP" and len(parts) >= 3, line
            continue
        m = METRIC_LINE.match(line)
        assert m, f"not a sample line: {line!r}"
        name, raw_labels, value = m.group(1), m.group(2), m.group(3)
        labels: list[tuple[str, str]] = []
        if raw_labels:
            pos = 0
            while pos < len(raw_labels):
                lm = LABEL.match(raw_labels, pos)
                assert lm, f"bad labels in {line!r}"
                labels.append((lm.group(1), lm.group(2)))
                pos = lm.end()
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in types else name
        assert family in types, f"sample before its TYPE: {line!r}"
        key = (name, frozenset(labels))
        assert key not in samples, f"duplicate sample {line!r}"
        samples[key] = float(value)  # float() takes NaN, +Inf, -Inf too
    return types, samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], metric: str, /, **labels: str) -> float:
    want = set(labels.items())
    found = [v for (n, ls), v in samples.items() if n == metric and want <= set(ls)]
    assert found, f"no sample {metric}{labels}"
    return sum(found)
