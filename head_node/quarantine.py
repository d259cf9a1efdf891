"""The quarantine list on disk: providers caught sending wrong results, so a head restart does not trust
them again. ``STATE_DIR/quarantine.json`` holds ``{"version": 1, "entries": {"id:<provider id>" or
"key:<CURVE key>": reason}}``, written whole (temporary file, then rename) whenever it changes; the state
machine holds the live copy (``ClusterState.quarantine``)."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

from .store import replace_file

log = logging.getLogger("dcf.head.quarantine")

FILE = "quarantine.json"
#: entries kept at most (a flood of liars under fresh ids must not grow the file without bound)
MAX_ENTRIES = 10_000
MAX_REASON = 300


def load(root: Path) -> dict[str, str]:
    """The stored entries; {} if there are none. A file that is not a valid list is logged and ignored
    (nothing is trusted less for it: the next wrong result quarantines again)."""
    path = root / FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.error("%s is unreadable (%s); starting with no provider quarantined", path, exc)
        return {}
    entries = doc.get("entries") if isinstance(doc, dict) and doc.get("version") == 1 else None
    if not isinstance(entries, dict):
        log.error("%s is not a quarantine list (version 1); starting with no provider quarantined", path)
        return {}
    out = {k: v[:MAX_REASON] for k, v in entries.items()
           if isinstance(k, str) and isinstance(v, str) and k.startswith(("id:", "key:")) and len(k) <= 200}
    if out:
        log.warning("%d providers stay quarantined from an earlier run (%s); `dcf clear PROVIDER` trusts one "
                    "again", sum(k.startswith("id:") for k in out), path)
    return dict(list(out.items())[-MAX_ENTRIES:])


def save(root: Path, entries: Mapping[str, str], fsync: bool) -> None:
    path = root / FILE
    tmp = path.with_name(f".{FILE}.tmp")
    kept = dict(list(entries.items())[-MAX_ENTRIES:])
    tmp.write_text(json.dumps({"version": 1, "entries": kept}, indent=1, sort_keys=True))
    replace_file(tmp, path, fsync)
