"""The task-type interface. It imports no task type: built-ins register the way a plugin does.

A task type is a stateless object; the head and every provider must have the same task types
installed: code never travels over the wire, only names, params and arrays.

Every job is driven by a ``Planner`` the head asks for work, round after round, until it says it
is finished. A split/run/merge task type (``SplitTask``: matmul, predict, the rowstats example)
gets the default single-round planner (``SplitPlanner``); a multi-round one (``train``, the power
iteration example in docs/TASKS.md) returns its own from ``TaskType.planner``.

Head side (a planner does no I/O and reads no clock: ``now`` is passed in; what it wants written
comes out of ``effects`` and the head writes it):
  ``validate``  check params and input arrays, return the output arrays' metadata
  ``eligible``  can this provider run subtasks of this job (device, dtype)?
  ``planner``   the job's planner: ``plan`` subtasks, ``subtask_inputs``, ``check_result``, ``merge``
                (and, for ``--verify-rate``, ``compare`` two providers' results of one subtask)
Provider side:
  ``run``       compute one subtask on a device, return its result arrays
  ``run_into``  (``SplitTask`` only) compute it in place, on a provider sharing the head's state dir
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from ..arrays import ArrayMeta
from ..errors import TaskError
from ..protocol import Field, LocalData, check_fields

__all__ = ["ArrayMeta", "Device", "Effect", "JobContext", "Metrics", "Planner", "SaveFile", "SplitPlanner",
           "SplitTask", "SubtaskCancelled", "SubtaskPlan", "TaskType", "ProviderSpec", "checkpoint", "compare_arrays",
           "tolerance"]

#: (relative, absolute) tolerance of ``compare_arrays`` per float dtype: two honest providers' results differ by
#: rounding (another BLAS, device or summation order), far less than this relative to the array's largest value
FLOAT_TOLERANCES: dict[str, tuple[float, float]] = {
    "float16": (1e-2, float(np.finfo(np.float16).tiny)),
    "float32": (1e-4, float(np.finfo(np.float32).tiny)),
    "float64": (1e-10, float(np.finfo(np.float64).tiny)),
}


@dataclass(frozen=True)
class ProviderSpec:
    """What a planner sees of a ready provider."""

    provider_id: str
    gflops: float
    memory_bytes: int
    device_kind: str
    dtypes: frozenset[str]
    datasets: tuple[LocalData, ...] = ()  # the datasets it holds on its own disk (``--data``)
    collectives: frozenset[str] = frozenset()  # torch.distributed backends it can join a process group with


@dataclass(frozen=True)
class SubtaskPlan:
    provider_id: str
    params: dict[str, Any]
    cost: float  # floating-point operations, for deadlines and load balancing
    #: subtasks with the same ``group`` run together, one per provider, as the members of one collective (a
    #: torch.distributed process group): none is moved to another provider or copied, and when one is lost,
    #: fails or misses its deadline the head stops them all and tells the planner (``Planner.abandoned``)
    group: str | None = None


class Device(Protocol):
    """What a provider hands to ``TaskType.run``: all that ``run`` may use."""

    kind: str  # "cpu", "cuda" or "mps"
    #: per-process cache for task types (built models), bounded by its users
    cache: MutableMapping[Any, Any]
    #: the host name or address this provider reaches the head at (services the head runs, such as the
    #: training rendezvous, listen there)
    head_host: str

    def torch_device(self) -> Any: ...

    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        """A blob of the head's state dir (a dataset), mapped or fetched once, cached by ``key``."""
        ...

    def local(self, key: str) -> Mapping[str, np.ndarray]:
        """A dataset this provider holds on its own disk (``--data``), by content key: ``x``, ``y``,
        ``x_test``, ``y_test``. KeyError if it holds none with that key."""
        ...


class SubtaskCancelled(Exception):  # noqa: N818 (not an error: the head asked the provider to stop)
    """Raised by ``checkpoint`` when the provider was told to stop the subtask (its job was cancelled)
    or is shutting down; ``run`` lets it through, and the provider answers ``cancelled``."""


def checkpoint(device: Device, done: int, total: int) -> None:
    """Call between blocks of a long subtask (matmul: every block of rows; training: every step):
    ``done`` of ``total`` units of this subtask are finished. The provider's device reports that to the
    head (at most every 0.25 s: the job's progress and its throughput move during the subtask) and raises
    ``SubtaskCancelled`` if it must stop here. A device without ``checkpoint`` (a test's) ignores it."""
    hook = getattr(device, "checkpoint", None)
    if hook is not None:
        hook(done, total)


@dataclass(frozen=True)
class JobContext:
    """What the head gives a task type to build a job's planner with."""

    job_id: str
    params: Mapping[str, Any]
    inputs: Mapping[str, ArrayMeta]
    outputs: Mapping[str, ArrayMeta]
    operands: Mapping[str, np.ndarray]  # the input arrays (read-only, memory-mapped)
    blob_ids: Mapping[str, str]  # input name -> blob id in the head's state dir
    results: Mapping[str, np.ndarray]  # the output arrays to merge into (writable)
    job_dir: Path  # where this job's files live: a planner may read its own saved files when built
    options: Mapping[str, Any] = field(default_factory=dict)  # head-wide settings (e.g. fsync)


# ---- effects: what a planner asks the head to do for it --------------------------------------
@dataclass(frozen=True)
class SaveFile:
    """Write ``data`` atomically as ``name`` in the job's folder (a checkpoint, a model file)."""

    name: str
    data: bytes


@dataclass(frozen=True)
class Metrics:
    """A metrics record of the job (``scope``: e.g. "step" or "epoch"), shown as a job event."""

    scope: str
    values: dict[str, Any]


Effect = SaveFile | Metrics


class Planner(ABC):
    """Hands out one job's subtasks and folds their results in. Pure: no I/O, no clock."""

    #: True once it will plan nothing more (the job is done when nothing is out either)
    finished: bool = False
    #: co-located providers may map this job's input blobs and write its outputs in place; such a
    #: provider builds a subtask's inputs with ``SplitTask.subtask_inputs``, so only a split task's
    #: planner (``SplitPlanner``) may say True
    shares_files: bool = False
    #: a result a co-located provider wrote in place (no arrays) is checked too: ``check_result(params, [])``,
    #: and the planner reads the block from ``JobContext.results`` (matmul: Freivalds' check)
    checks_in_place: bool = False
    #: ``check_result`` checks the values of a result, not only its shape (matmul: Freivalds' check). Subtasks of a
    #: planner that does not are the candidates of ``--verify-rate``: a fraction of them is run on a second provider
    #: and the two results compared (``compare``)
    checks_values: bool = False

    @abstractmethod
    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        """New subtasks for these workers (eligible, fastest first), given how many are still
        out; [] means nothing now."""

    @abstractmethod
    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        """The arrays sent with one subtask; views, not copies, where possible."""

    @abstractmethod
    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        """Raise ValidationError unless ``arrays`` is a valid result of this subtask."""

    @abstractmethod
    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        """Fold one checked result in (once per subtask). Raise a DcfError to fail the job."""

    #: the unit ``progress`` counts in: "rows", "steps" or "subtasks" (``common.jobs.PROGRESS_UNITS``)
    progress_unit: str = "subtasks"

    @abstractmethod
    def progress(self) -> tuple[int, int]:
        """(done, total) in the planner's own unit (``progress_unit``), counting merged results."""

    def subtask_units(self, sub_params: Mapping[str, Any]) -> float:
        """How many units of ``progress`` one subtask of these params is worth once merged: the head adds
        that times the fraction a provider reports done of a running subtask. 0 (the default): a running
        subtask adds nothing."""
        return 0.0

    def effects(self) -> list[Effect]:
        """What the head should do for the planner now (taken: a second call returns [])."""
        return []

    def stalled(self, sub_params: Mapping[str, Any], waited: float) -> str:
        """A planned subtask, taken back (its provider lost, a strike), has waited ``waited`` seconds for a ready
        provider it fits (``TaskType.fits``): why, shown as the job's ``waiting``; raise a DcfError to fail the
        job instead (a bound on that wait)."""
        return "waiting for a provider with enough memory for a subtask"

    def waiting(self) -> str | None:
        """Why the last ``plan`` gave nothing though providers were ready, if it is waiting for something
        (a start barrier: "waiting for 3 providers, 2 ready"); the head shows it as the job's ``waiting``.
        None (the default): not waiting. While it waits, the head asks ``plan`` again at every tick, even with
        no provider ready; to give up waiting (a timeout), ``plan`` raises a DcfError and the job fails."""
        return None

    def abandoned(self, group: str, why: str, now: float) -> Sequence[str]:
        """A member of subtask ``group`` (``SubtaskPlan.group``) was lost, failed or missed its deadline: the
        head has stopped every member and will merge none of their results; the planner plans the work again
        (``plan`` is asked next). It returns the other groups still out that it drops with this one (e.g. a
        round planned to start from this one's results): the head stops and abandons those too, without
        asking again. Raise a DcfError to fail the job instead. The default fails it."""
        raise TaskError(f"subtask group {group} abandoned: {why}")

    def summary(self) -> dict[str, Any]:
        """Entries for the job's stats (shown by `dcf status` and the API)."""
        return {}

    def verifiable(self, sub_params: Mapping[str, Any]) -> bool:
        """Whether this subtask may be run on a second provider to verify its result (``--verify-rate``; only
        asked when ``checks_values`` is False, never for a collective group's member). False for a subtask only
        one provider can run (e.g. on data only it holds): its verification would wait for good. Default True."""
        return True

    def compare(self, sub_params: Mapping[str, Any], a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> str | None:
        """Two providers' results of one subtask (both passed ``check_result``): None if they agree, else what
        differs, in a few words (it is logged, and names why a provider outvoted by two others was quarantined).
        Honest providers must always agree: allow for rounding, never for randomness. The default,
        ``compare_arrays``: the same arrays, NaN/Inf where the other has them, floats within ``FLOAT_TOLERANCES``
        of the array's largest magnitude, anything else equal."""
        return compare_arrays(a, b)

    def finish(self, now: float) -> list[SaveFile]:
        """Files the finished job leaves (e.g. a trained model), written before it counts as done."""
        return []


def tolerance(dtype: np.dtype[Any]) -> tuple[float, float]:
    """(relative, absolute) tolerance of ``compare_arrays`` for an array of ``dtype``: (0, 0) unless it is a float."""
    return FLOAT_TOLERANCES.get(np.dtype(dtype).name, (0.0, 0.0))


def compare_arrays(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> str | None:
    """None if two results agree: as many arrays, each pair of the same dtype and shape, NaN and each infinity in
    the same places, and the other elements within ``tolerance``: ``max|x - y| <= rtol * max(max|x|, max|y|) + atol``
    (integers and other dtypes: equal). Else what differs first, e.g. "array 0: 1 of 4096 elements differ, the first
    at 17, by up to 0.5 (tolerance 2.3e-06)"."""
    if len(a) != len(b):
        return f"{len(a)} arrays against {len(b)}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        why = _compare_array(np.asarray(x), np.asarray(y))
        if why is not None:
            return f"array {i}: {why}" if len(a) > 1 else why
    return None


def _compare_array(x: np.ndarray, y: np.ndarray) -> str | None:
    if x.dtype != y.dtype:
        return f"dtype {x.dtype} against {y.dtype}"
    if x.shape != y.shape:
        return f"shape {list(x.shape)} against {list(y.shape)}"
    if x.dtype.kind != "f":
        return _differing(x != y)
    nan_x = np.isnan(x)
    if not np.array_equal(nan_x, np.isnan(y)):
        return f"NaN where the other has a number: {_differing(nan_x != np.isnan(y))}"
    finite_x, finite_y = np.isfinite(x), np.isfinite(y)
    inf_off = (finite_x != finite_y) | (~finite_x & ~nan_x & (x != y))  # NaN in the same places: the rest is ±Inf
    if inf_off.any():
        return f"Inf where the other has another value: {_differing(inf_off)}"
    if not finite_x.any():
        return None
    fx, fy = x[finite_x], y[finite_x]
    rtol, atol = tolerance(x.dtype)
    allowed = rtol * max(float(np.abs(fx).max()), float(np.abs(fy).max())) + atol
    off = np.abs(fx.astype(np.float64) - fy.astype(np.float64))
    worst = float(off.max())
    if worst <= allowed:
        return None
    differing = _differing(off > allowed, np.flatnonzero(finite_x), x.size)
    return f"{differing}, by up to {worst:.3g} (tolerance {allowed:.3g})"


def _differing(differs: np.ndarray, where: np.ndarray | None = None, size: int | None = None) -> str | None:
    """How many elements differ and the flat index of the first (``where``: the flat index in the array of each
    entry of ``differs``, ``size`` the array's); None if none does."""
    flat = np.flatnonzero(differs)
    if not flat.size:
        return None
    first = int(flat[0] if where is None else where[flat[0]])
    return f"{flat.size} of {differs.size if size is None else size} elements differ, the first at {first}"


class TaskType(ABC):
    name: ClassVar[str]
    #: names of the input arrays a job must give, in order
    inputs: ClassVar[tuple[str, ...]]
    #: modules the head imports on a thread before it builds this task's first planner (slow imports)
    head_imports: ClassVar[tuple[str, ...]] = ()
    #: the pip extra of dcf that installs them (a head without them says ``pip install 'dcf[<extra>]'``)
    head_extra: ClassVar[str] = ""
    #: services the head runs for this task's jobs, started when its first job is built; what each gives
    #: lands in ``JobContext.options`` under its name ("rendezvous": the torch.distributed TCPStore that
    #: collective groups meet at, ``{"port": int, "secret": str}``)
    head_services: ClassVar[tuple[str, ...]] = ()
    #: the schema of a subtask's params on the wire (common/tasks/wire.py); None: not checked
    params_schema: ClassVar[Mapping[str, Field] | None] = None

    def needed_inputs(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        """The inputs a job with these params must give: ``inputs`` (the default), or fewer (a train job on
        the providers' own data gives none)."""
        return self.inputs

    @abstractmethod
    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        """Check a job; return name -> metadata of each output array. Raise ValidationError."""

    def eligible(self, provider: ProviderSpec, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        """None if the worker can run this job's subtasks, else the reason it cannot."""
        dtypes = {m.dtype for m in inputs.values()}
        missing = dtypes - provider.dtypes
        if missing:
            return f"{provider.device_kind} provider does not support {', '.join(sorted(missing))}"
        return None

    def cannot_start(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
                     providers: Sequence[ProviderSpec]) -> str | None:
        """Head side, at submission: why this job cannot start on ``providers`` (the ready ones eligible for it),
        so that it is refused (422) rather than accepted to wait; None (the default): accept it. A job that
        only waits for more providers to come is accepted: return a reason only when the providers there are
        the cause."""
        return None

    def check_params(self, sub_params: Mapping[str, Any]) -> None:
        """Provider side, before ``run``: raise ProtocolError unless the params of a subtask received
        over the wire fit this task type's ``params_schema``."""
        if self.params_schema is not None:
            check_fields(f"{self.name} subtask params", sub_params, self.params_schema)

    def available(self) -> bool:
        """Can this process run the task's subtasks (e.g. is torch installed)? Providers only
        advertise the task types they can run."""
        return True

    def fits(self, provider: ProviderSpec, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        """Can this worker hold one already-planned subtask (used when a subtask is re-assigned)?"""
        return True

    @abstractmethod
    def planner(self, job: JobContext) -> Planner:
        """The planner of one job (built by the head when the job is delivered)."""

    @abstractmethod
    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
            device: Device) -> list[np.ndarray]:
        """Provider side: compute one subtask."""


class SplitTask(TaskType):
    """A task type cut once into subtasks whose results are merged into the outputs."""

    #: what its job's progress counts: "subtasks" (each worth 1), or e.g. "rows" (``units`` overridden)
    progress_unit: ClassVar[str] = "subtasks"

    def units(self, sub_params: Mapping[str, Any]) -> int:
        """The units of ``progress_unit`` one subtask holds (a row-split task: its rows)."""
        return 1

    @abstractmethod
    def split(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
              providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        """Cut the job into subtasks over ``workers`` (all eligible, fastest first)."""

    @abstractmethod
    def subtask_inputs(self, sub_params: Mapping[str, Any],
                       inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """The arrays to send with one subtask; views, not copies, where possible."""

    @abstractmethod
    def check_result(self, sub_params: Mapping[str, Any], outputs: Mapping[str, ArrayMeta],
                     arrays: Sequence[np.ndarray]) -> None:
        """Raise ValidationError unless ``arrays`` is a valid result of this subtask."""

    @abstractmethod
    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
              outputs: Mapping[str, np.ndarray]) -> None:
        """Place a checked result into the job's output arrays."""

    def planner(self, job: JobContext) -> Planner:
        return SplitPlanner(self, job)

    def run_into(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray],
                 outputs: Mapping[str, np.ndarray], device: Device) -> list[np.ndarray]:
        """Provider side, co-located with the head (its planner shares files): compute one subtask
        straight into the job's output arrays (memory-mapped files of the head's state dir) and
        return what it wrote. The default runs ``run`` then ``merge``; override it to skip the copy."""
        results = self.run(sub_params, arrays, device)
        self.merge(sub_params, results, outputs)
        return results


class SplitPlanner(Planner):
    """The single-round planner: the task's split, once, over the workers ready at the start."""

    shares_files = True

    def __init__(self, task: SplitTask, job: JobContext) -> None:
        self.task = task
        self.job = job
        self.total = 0
        self.merged = 0
        self.progress_unit = task.progress_unit

    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if self.finished:
            return []
        plans = self.task.split(self.job.params, self.job.inputs, providers)
        self.finished = True
        self.total = sum(self.task.units(p.params) for p in plans)
        return plans

    def subtask_inputs(self, sub_params: Mapping[str, Any]) -> list[np.ndarray]:
        return self.task.subtask_inputs(sub_params, self.job.operands)

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        self.task.check_result(sub_params, self.job.outputs, arrays)

    def merge(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        if arrays:  # a co-located provider wrote its block in place (nothing to copy)
            self.task.merge(sub_params, arrays, self.job.results)
        self.merged += self.task.units(sub_params)

    def progress(self) -> tuple[int, int]:
        return self.merged, self.total

    def subtask_units(self, sub_params: Mapping[str, Any]) -> float:
        return float(self.task.units(sub_params))
