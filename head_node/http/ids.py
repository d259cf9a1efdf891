"""Short ids: every route that takes a job id or a provider id also takes a unique prefix of it
(at least ``MIN_PREFIX`` hex digits), as ``dcf jobs``, ``dcf nodes`` and the dashboard show
them. The prefix is resolved here, before the head is asked: against the live jobs and the job
store's rows, or the providers the head knows. An ambiguous prefix is a 409 that lists the
matches; a prefix that matches nothing is passed on, and the head answers 404 as for any id.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from typing import Annotated, Any

from fastapi import Depends, Path

from common.errors import Conflict
from common.ids import ID_RE

from .deps import HeadDep

log = logging.getLogger("dcf.head.api")

#: the fewest hex digits a prefix may have
MIN_PREFIX = 4
#: the most matches an ambiguous prefix's error lists
MAX_MATCHES = 10
PREFIX_RE = re.compile(f"[0-9a-f]{{{MIN_PREFIX},31}}")


def is_prefix(key: str) -> bool:
    """True for a short id (lowercase hex, MIN_PREFIX to 31 digits), not a full one."""
    return PREFIX_RE.fullmatch(key) is not None


def pick(what: str, key: str, found: Iterable[str]) -> str:
    """The one id in ``found`` (``key`` itself if none: the head then answers 404); an ambiguous
    prefix raises ``Conflict`` naming up to MAX_MATCHES of the matches."""
    matches = sorted(set(found))
    if not matches:
        return key
    if len(matches) == 1:
        return matches[0]
    shown = ", ".join(matches[:MAX_MATCHES]) + (", ..." if len(matches) > MAX_MATCHES else "")
    log.info("ambiguous %s id prefix %s: %d matches", what, key, len(matches))
    raise Conflict(f"{what} id prefix {key!r} is ambiguous: it matches {shown}; give more digits")


def job_matches(head: Any, prefix: str) -> set[str]:
    """Ids of the live jobs and stored jobs that start with ``prefix`` (at most MAX_MATCHES + 1
    from the store, enough to tell an ambiguous prefix)."""
    live = getattr(getattr(head, "state", None), "jobs", {})
    found = {job_id for job_id in live if job_id.startswith(prefix)}
    store = getattr(head, "store", None)
    if store is not None:
        found.update(store.ids_with_prefix(prefix, MAX_MATCHES + 1))
    return found


def resolve_job(head: Any, key: str) -> str:
    """The full job id for ``key``: a full id as it is, a unique prefix as the id it starts."""
    if ID_RE.fullmatch(key) or not is_prefix(key):
        return key
    return pick("job", key, job_matches(head, key))


def resolve_provider(head: Any, key: str) -> str:
    if ID_RE.fullmatch(key) or not is_prefix(key):
        return key
    providers = getattr(getattr(head, "state", None), "providers", {})
    return pick("provider", key, (pid for pid in providers if pid.startswith(key)))


async def job_id_param(head: HeadDep, job_id: Annotated[str, Path(
        description=f"the job id, or a unique prefix of it (at least {MIN_PREFIX} hex digits)")]) -> str:
    return resolve_job(head, job_id)


async def provider_id_param(head: HeadDep, provider_id: Annotated[str, Path(
        description=f"the provider id, or a unique prefix of it (at least {MIN_PREFIX} hex digits)")]) -> str:
    return resolve_provider(head, provider_id)


#: a route's ``{job_id}`` resolved to the full id
JobId = Annotated[str, Depends(job_id_param)]
#: a route's ``{provider_id}`` resolved to the full id
ProviderId = Annotated[str, Depends(provider_id_param)]
