"""Read-only views of the head's state for the API, the dashboard and /metrics.

One view per job, built from its ``JobRecord`` (common/jobs.py) whether it is live in the
scheduler or only in the job store: ``GET /v1/jobs`` and ``GET /v1/jobs/{id}`` agree.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.jobs import ACTIVE_NAMES, JobRecord

from .entities import Job, Provider

QUEUE_DOWN = ("RabbitMQ unreachable: the head is reconnecting (the job stays accepted: it goes on or "
              "waits; its outcome is kept and acknowledged once the broker is back)")


def provider_names(providers: Mapping[str, Provider]) -> dict[str, str]:
    return {pid: p.info.name for pid, p in providers.items()}


def live_job_view(record: JobRecord, job: Job, names: Mapping[str, str]) -> dict[str, Any]:
    """A job the scheduler holds: progress from its planner (``Job.progress``), shares from its subtasks."""
    shares = {names.get(pid, pid): round(f, 4) for pid, f in job.shares().items()}
    return record.view(progress=job.progress(), shares=shares, waiting=job.waiting)


def with_queue_state(view: dict[str, Any], queue_connected: bool) -> dict[str, Any]:
    """While the broker is away, an active job says so in its ``waiting``."""
    if not queue_connected and view["state"] in ACTIVE_NAMES:
        view["waiting"] = QUEUE_DOWN + (f"; {view['waiting']}" if view.get("waiting") else "")
    return view


def provider_row(prov: Provider, now: float) -> dict[str, Any]:
    info = prov.info
    shown = prov.gflops(prov.last_learned) if prov.last_learned else info.gflops
    return {
        "provider_id": info.provider_id, "name": info.name, "host": info.host, "os": info.os,
        "device": info.device_kind, "device_name": info.device_name,
        "memory_bytes": info.memory_bytes, "cores": info.cores,
        "gflops": round(shown, 2), "benchmark_gflops": round(info.gflops, 2),
        "task_types": sorted(info.task_types), "dtypes": sorted(info.dtypes),
        "version": info.version, "state": prov.state, "quarantined": prov.quarantined, "shares_state_dir": prov.local,
        "assigned": len(prov.assigned), "queued": prov.queued,
        "subtasks_done": prov.subtasks_done, "last_heartbeat_s": round(now - prov.last_seen, 3),
    }


def provider_rows(providers: Mapping[str, Provider], now: float) -> list[dict[str, Any]]:
    return [provider_row(p, now) for p in providers.values()]
