"""The REST API's bodies as pydantic models, so that ``/openapi.json`` (and ``/docs``) shows them.

Response models describe what the head returns today, key for key and in its order, so that a
response serialised through them is the one clients already read. They allow extra keys: a key the
head adds is passed on, never dropped (after the declared ones). ``Number`` keeps an int an int
and a float a float (a plain ``float`` field would write ``5`` as ``5.0``).
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, with_config
from typing_extensions import TypedDict

from common.jobs import JobState
from common.protocol.batch import MAX_PARAMS_BYTES, MAX_PARAMS_DEPTH, json_depth

#: a JSON number as the head wrote it: int or float, never converted
Number = Annotated[int | float, WithJsonSchema({"type": "number"})]



class Reply(BaseModel):
    """Base of the response models: extra keys pass through unchanged."""

    model_config = ConfigDict(extra="allow")


# ---- requests ---------------------------------------------------------------------------------
class JobSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = Field(min_length=1, max_length=64, description="task type, e.g. matmul")
    inputs: dict[str, str] = Field(default_factory=dict, description="input name -> blob id")
    params: dict[str, Any] = Field(default_factory=dict)
    nodes: int | None = Field(default=None, ge=1, le=100_000, description="at most this many providers")

    @field_validator("params")
    @classmethod
    def small_and_shallow(cls, params: dict[str, Any]) -> dict[str, Any]:
        """Params are stored and echoed with the job: keep them small and shallow."""
        if json_depth(params) > MAX_PARAMS_DEPTH:
            raise ValueError(f"params nest deeper than {MAX_PARAMS_DEPTH} levels")
        if len(json.dumps(params)) > MAX_PARAMS_BYTES:
            raise ValueError(f"params exceed {MAX_PARAMS_BYTES} bytes as JSON")
        return params


class Adopt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    upload_id: str = Field(pattern="^[0-9a-f]{32}$")


# ---- errors -----------------------------------------------------------------------------------
class ErrorDetail(BaseModel):
    code: str = Field(description="machine-readable, e.g. not_found, invalid, unauthorized")
    message: str


class ErrorBody(BaseModel):
    """Every 4xx and 5xx answer."""

    error: ErrorDetail


# ---- jobs -------------------------------------------------------------------------------------
# (the small shapes a job view repeats are TypedDicts: they validate in about half the time of models)
@with_config(ConfigDict(extra="allow"))
class ArrayInfo(TypedDict):
    """An array's numpy dtype name (e.g. float64) and shape."""

    dtype: str
    shape: list[int]


@with_config(ConfigDict(extra="allow"))
class Progress(TypedDict):
    """How far a job has got: ``done`` of ``total`` ``unit``s (``rows`` for matmul and predict, rows of
    running subtasks included as providers report them; ``steps`` for training; ``subtasks`` otherwise).
    The same in the job list, the job view, the ``job.progress`` events and a finished job's record."""

    done: int
    total: int
    unit: str


class JobView(Reply):
    """One job, the same from ``GET /v1/jobs`` and ``GET /v1/jobs/{job_id}``."""

    job_id: str
    type: str = Field(description="task type")
    state: JobState
    params: dict[str, Any]
    inputs: dict[str, ArrayInfo]
    outputs: dict[str, ArrayInfo]
    nodes: int | None = Field(description="at most this many providers (null: any)")
    created_at: float = Field(description="unix seconds")
    started_at: float | None
    finished_at: float | None
    error: str | None
    waiting: str | None = Field(description="why an active job is not making progress, if it is not")
    progress: Progress
    shares: dict[str, Number] = Field(description="provider name -> its share of the work")
    stats: dict[str, Any]


class Event(Reply):
    """A head event (``seq``, ``ts``, ``kind``, then the kind's own fields)."""

    seq: int
    ts: float = Field(description="unix seconds")
    kind: str = Field(description="e.g. job.accepted, job.progress, job.done, node.lost")


# ---- blobs and the head -----------------------------------------------------------------------
class BlobInfo(Reply):
    blob_id: str
    dtype: str
    shape: list[int]
    bytes: int


class Health(Reply):
    status: str = Field(description='"ok"; "fenced": this head lost the broker\'s leader lock and stops (it '
                                    'comes back as a standby); a standby head answers "standby"')
    role: str = Field("active", description='"active" or "fenced" (a standby answers "standby", with "active": '
                                            'the active head\'s URL)')
    fenced: str | None = Field(None, description="why the head was fenced")
    version: str
    epoch: str | None = Field(None, description="this head process's run id; only to a request with the API "
                                                "token (or from a head without one)")
    queue: str = Field(description="the job queue: embedded, or RabbitMQ")
    queue_connected: bool
    task_types: list[str]


class Info(Reply):
    epoch: str
    state_dir: str = Field(description="absolute path of the head's state dir")
    fsync: bool


# ---- providers --------------------------------------------------------------------------------
class NodeView(Reply):
    provider_id: str
    name: str
    host: str
    os: str
    device: str = Field(description="device kind: cpu, cuda, mps")
    device_name: str
    memory_bytes: int
    cores: int
    gflops: Number = Field(description="measured GFLOP/s")
    benchmark_gflops: Number
    task_types: list[str]
    dtypes: list[str]
    version: str
    state: str = Field(description="ready, connecting, draining, unhealthy (acks missed: no new work, told to "
                             "reconnect), stuck (compute hung: no new work), quarantined (sent a wrong result: "
                             "no work until cleared) or dead")
    quarantined: str | None = Field(None, description="why it is quarantined; null: trusted")
    shares_state_dir: bool
    assigned: int = Field(description="subtasks assigned and not finished")
    subtasks_done: int
    last_heartbeat_s: float = Field(description="seconds since the last heartbeat")


# ---- metrics ----------------------------------------------------------------------------------
class Cursor(Reply):
    sample: int
    seq: int


class ProviderSeries(Reply):
    name: str
    gflops: list[Number | None] = Field(description="GFLOP/s per sample; null where it was absent")


class Series(Reply):
    n: list[int] = Field(description="sample numbers")
    t: list[float] = Field(description="unix seconds")
    throughput_gflops: list[Number]
    providers: dict[str, ProviderSeries] = Field(description="provider id -> its column")


class Share(Reply):
    provider_id: str
    name: str
    flops_done: Number
    subtasks_done: int
    share: Number


class TrainingPoint(Reply):
    """One point of a training curve: ``seq`` and ``ts``, then only the metrics its event carried,
    of epoch, step, loss, accuracy, test_loss and test_accuracy."""

    seq: int
    ts: float | None
    __pydantic_extra__: dict[str, Number]


class Alert(Reply):
    seq: int
    ts: float | None
    kind: str
    level: str = Field(description="error, warning or info")
    title: str
    message: str
    data: dict[str, Any]


class MetricsView(Reply):
    """Counters, providers, live jobs, and the observer's time series, shares, curves and alerts."""

    time: float
    uptime_s: float
    counters: dict[str, Number]
    nodes: list[NodeView]
    jobs: list[JobView]
    cursor: Cursor
    series: Series
    shares: list[Share]
    training: dict[str, list[TrainingPoint]] = Field(description="job id -> its points")
    alerts: list[Alert]
