"""A job as every role sees it: one set of state names, one record type with its row and its view.

The head stores a ``JobRecord`` (a row of the job store), publishes its ``message`` on the durable
queue, and answers the API with its ``view``; the client and the CLI read views back with
``JobRecord.from_view``. Live progress, shares and waiting reasons are passed in by the head.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any


class JobState(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobState.DONE, JobState.FAILED, JobState.CANCELLED})
#: the state names, in lifecycle order (CLI choices, metrics labels)
STATE_NAMES = tuple(s.value for s in JobState)
TERMINAL_NAMES = frozenset(s.value for s in TERMINAL)
ACTIVE_NAMES = frozenset({JobState.QUEUED.value, JobState.RUNNING.value})


#: the units a job's progress is counted in (``Progress.unit``): a matmul's rows, a training's
#: optimizer steps, or (any other task type) its subtasks
PROGRESS_UNITS = ("rows", "steps", "subtasks")


@dataclass(frozen=True)
class Progress:
    """How far a job has got: ``done`` of ``total`` ``unit``s. One definition (its planner's, plus the rows
    providers report of running subtasks), the same in every view, event and stored outcome."""

    done: int = 0
    total: int = 0
    unit: str = "subtasks"

    def to_dict(self) -> dict[str, Any]:
        return {"done": self.done, "total": self.total, "unit": self.unit}

    @classmethod
    def of(cls, data: object) -> Progress:
        if isinstance(data, Mapping):
            unit = data.get("unit")
            return cls(int(data.get("done", 0)), int(data.get("total", 0)),
                       unit if isinstance(unit, str) and unit else "subtasks")
        return cls()


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    type: str
    params: dict[str, Any]
    #: input name -> {"blob": id, "dtype": ..., "shape": [...]} (views omit the blob id); an inline
    #: input has no "blob": its bytes are in ``inline``
    inputs: dict[str, dict[str, Any]]
    outputs: dict[str, dict[str, Any]]
    nodes: int | None
    created_at: float
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    error: str | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: input name -> the raw bytes (C order, little-endian) of a small input sent with the job
    inline: dict[str, bytes] = field(default_factory=dict)

    # ---- the queue message: what a job is before it runs ---------------------------------------
    def message(self) -> dict[str, Any]:
        msg = {"job_id": self.job_id, "type": self.type, "params": self.params, "inputs": self.inputs,
               "outputs": self.outputs, "nodes": self.nodes, "created_at": self.created_at}
        if self.inline:
            msg["inline"] = self.inline
        return msg

    @classmethod
    def from_message(cls, msg: Mapping[str, Any]) -> JobRecord:
        return cls(job_id=msg["job_id"], type=msg["type"], params=dict(msg["params"]),
                   inputs=dict(msg["inputs"]), outputs=dict(msg["outputs"]), nodes=msg.get("nodes"),
                   created_at=float(msg["created_at"]), inline=dict(msg.get("inline") or {}))

    # ---- the job store's row ----------------------------------------------------------------------
    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRecord:
        return replace(cls.from_message(row), state=JobState(row["state"]), started_at=row.get("started_at"),
                       finished_at=row.get("finished_at"), error=row.get("error"), stats=dict(row.get("stats") or {}))

    def blob_ids(self) -> dict[str, str]:
        """The inputs held as blobs in the state dir (inline ones are not)."""
        return {name: ref["blob"] for name, ref in self.inputs.items() if "blob" in ref}

    # ---- the API's view ---------------------------------------------------------------------------
    def view(self, *, progress: Progress | None = None, shares: Mapping[str, float] | None = None,
             waiting: str | None = None) -> dict[str, Any]:
        """The one view of a job (GET /v1/jobs and /v1/jobs/{id} alike). ``progress`` and ``shares``
        default to what the record's stats kept when the job ended."""
        if waiting is None and self.state is JobState.QUEUED:
            waiting = "waiting for the head to schedule it"
        return {
            "job_id": self.job_id, "type": self.type, "state": self.state.value, "params": self.params,
            "inputs": {k: {"dtype": v["dtype"], "shape": list(v["shape"])} for k, v in self.inputs.items()},
            "outputs": self.outputs, "nodes": self.nodes, "created_at": self.created_at,
            "started_at": self.started_at, "finished_at": self.finished_at, "error": self.error,
            "waiting": waiting if self.state.value in ACTIVE_NAMES else None,
            "progress": (progress or Progress.of(self.stats.get("progress"))).to_dict(),
            "shares": dict(shares if shares is not None else self.stats.get("shares", {})),
            "stats": self.stats,
        }

    @classmethod
    def from_view(cls, view: Mapping[str, Any]) -> JobRecord:
        """A client's copy of a job from the API's view (inputs carry no blob ids there)."""
        return replace(cls.from_message(view), state=JobState(view["state"]), started_at=view.get("started_at"),
                       finished_at=view.get("finished_at"), error=view.get("error"),
                       stats=dict(view.get("stats") or {}))
