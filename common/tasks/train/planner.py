"""The head's trainer: the planner of a ``train`` job (a parameter server).

Each round is a set of subtasks planned over the ready providers, shard sizes in proportion
to their measured speed. Strategies:
  sync       one round per global batch: shards of the batch -> summed gradients, in shard
             order, divided by the batch size -> one optimizer step on the head. The same
             arithmetic as one process on the whole batch, whatever the number of providers,
             their speeds or the order results arrive in (up to float32 summation order).
  async      up to one batch in flight per provider, each computed on the parameters of the
             moment; a gradient is applied when it arrives if it is at most ``max_staleness``
             versions old, else its batch is sent again with fresh parameters.
  local-sgd  each round, every provider runs ``local_steps`` plain SGD steps on its share of
             that many global batches from the same parameters; the head averages the
             resulting parameters weighted by samples.
  allreduce  the providers train as one torch.distributed process group (collective.py), in rounds
             of ``round_steps`` steps: each step they all-reduce their shards' summed gradients and
             take the same optimizer step, without the head. The head assigns ranks, serves the
             rendezvous, and keeps the parameters and optimizer state rank 0 returns after each round
             (checkpoints, evaluation). A round whose group loses a member is abandoned on every member
             (``abandoned``) and run again, from the last round's state, by whoever is left.
A start barrier holds the first round until ``min_providers`` eligible providers are ready (the job's
``waiting`` says "waiting for 3 providers, 2 ready"); it fails the job after ``start_timeout`` seconds.
After each epoch an eval round scores the test split. Checkpoints (model, optimizer, scheduler,
position) are asked of the head (a ``SaveFile`` effect it writes atomically) every
``checkpoint_every`` steps and at each epoch's end; a restarted head builds the planner anew and it
resumes from the last one. The data order is a pure function of (seed, epoch).
Like every planner it does no I/O after it is built and reads no clock: ``now`` comes in.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import TaskError, ValidationError, WaitTimeout
from ..base import Effect, JobContext, Metrics, Planner, ProviderSpec, SaveFile, SubtaskPlan, compare_arrays, tolerance
from ..rows import proportional_rows, provider_shares
from . import models
from .datasets import content_hash
from .members import backend, joinable, member_bytes
from .optim import export_state, import_state, make_optimizer, state_keys
from .params import train_params
from .shards import Shards, provider_dataset
from .task import TrainTask

log = logging.getLogger("dcf.head.training")

CHECKPOINT = "checkpoint.pt"
#: allreduce: rounds abandoned one after another (no round finished between them) before the job fails
MAX_ABANDONED_ROUNDS = 8
#: allreduce: seconds to wait after a round was abandoned before the group is formed again (the head learns
#: meanwhile which member is gone, and the survivors leave the broken group)
REGROUP_SETTLE_S = 1.0
#: allreduce: weight of the newest measurement in a member's samples-per-second average
RATE_WEIGHT = 0.5
#: ``--verify-rate``: the subtask kinds run on a second provider and compared (eval rounds only score the model)
VERIFIED_KINDS = ("grad", "local")
#: two honest results of one subtask may count this fraction of its samples (at least one) correct differently: a
#: near tie between two classes can go either way on another device
CORRECT_SLACK = 0.01
_EMPTY = np.zeros(0, dtype=np.float32)
_EMPTY.flags.writeable = False


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The permutation of the training set in ``epoch`` (what a reference run must use too)."""
    order = np.random.default_rng([seed, epoch]).permutation(n)
    order.flags.writeable = False
    return order


def make_scheduler(optimizer: Any, p: Mapping[str, Any], total_steps: int) -> Any:
    """``step``: lr x gamma every ``lr_step`` epochs; ``cosine``: cosine decay over all steps."""
    import torch

    if p["schedule"] == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=p["lr_step"], gamma=p["gamma"])
    if p["schedule"] == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, total_steps))
    return None


class TrainPlanner(Planner):
    """The planner of a ``train`` job: a parameter server. Its progress counts optimizer steps (of
    ``epochs x steps per epoch``); a running subtask adds none (``subtask_units`` 0)."""

    progress_unit = "steps"

    def __init__(self, job: JobContext) -> None:
        import torch

        torch.set_num_threads(1)  # the optimizer step is small; keep the cores for the providers
        self.job_id = job.job_id
        self.p = train_params(job.params)
        self.blob_ids = dict(job.blob_ids)
        self.job_dir = job.job_dir
        self.steps_per_epoch = self.total_steps = 0  # known once built (provider data: at the first plan)
        self.built = False
        self._reset_position()
        self._saved = self._load_checkpoint()  # a restarted head resumes from it
        # --dataset provider:NAME: the data stays on the providers; the shards are fixed at the first plan
        # (or by the checkpoint), and the model is built then
        self.local_name = provider_dataset(self.p)
        self.shards: Shards | None = None
        if self.local_name is None:
            self._build_on_blobs(job.operands)
        elif self._saved is not None and "shards" in self._saved:
            self.shards = Shards.from_record(self.local_name, json.loads(self._saved["shards"]))
        self._shard_wait_since: float | None = None
        self.round: dict[str, Any] | None = None
        self.ahead: dict[str, Any] | None = None  # allreduce: the round planned to run right after it
        self._rounds = 0  # rounds planned so far: the last round id given
        self.idx: dict[int, np.ndarray] = {}  # shard key -> sample indices of subtasks in flight
        self._async_queue: list[int] = []  # async: batch numbers of this epoch still to run
        self._async_out: dict[int, tuple[str, int, int]] = {}  # async: shard -> (provider, batch number, version)
        self._next_shard = 0
        # allreduce: the training group (provider ids in rank order), its generation (bumped whenever the
        # group is formed anew), the members holding the state of the current version, measured speeds
        self.rendezvous: Mapping[str, Any] | None = job.options.get("rendezvous")
        self._members: tuple[str, ...] = ()
        self._generation = 0
        self._warm: frozenset[str] = frozenset()
        self._rates: dict[str, float] = {}
        self._abandoned_in_a_row = 0
        self._regroup_after: float | None = None
        self.regroups = 0
        # the start barrier: nothing is planned until ``min_providers`` are ready (counted from this
        # planner's first plan: a restarted head waits for them again)
        self.barrier_met = self.p["min_providers"] <= 1
        self._barrier_since: float | None = None
        self._waiting: str | None = None

    def _reset_position(self) -> None:
        self.epoch = 0
        self.step_in_epoch = 0
        self.global_step = 0
        self.version = 0
        self.history: list[dict[str, float]] = []
        self.last: dict[str, float] = {}
        self.samples_done = 0
        self.started: float | None = None  # the `now` training started (the start barrier met)
        self.finished = False
        self.checkpoint_due = False
        self.pending: list[Effect] = []
        self.stale_dropped = 0
        self.step_seconds: list[float] = []  # time between optimizer steps (eval rounds excluded)
        self._last_step_at: float | None = None

    def _build_on_blobs(self, data: Mapping[str, np.ndarray]) -> None:
        labels = (int(min(data["y"].min(), data["y_test"].min())), int(max(data["y"].max(), data["y_test"].max())))
        self._build(int(data["x"].shape[0]), int(data["x_test"].shape[0]), [int(d) for d in data["x"].shape[1:]],
                    content_hash([data[n] for n in ("x", "y", "x_test", "y_test")]), labels,
                    np.array(data["x"][:2], dtype=np.float32))

    def _build_on_shards(self, shards: Shards) -> None:
        """The model of a job on the providers' data, once its shards are known (checked on zeros: no sample
        of the data is here)."""
        if self.p["batch_size"] > shards.samples:
            raise ValidationError(f"batch size {self.p['batch_size']} is larger than dataset provider:{shards.name} "
                                  f"({shards.samples} samples in {len(shards.shards)} shards)")
        self.shards = shards
        self._build(shards.samples, shards.test_samples, shards.shape, shards.key, shards.labels,
                    np.zeros((min(2, shards.samples), *shards.shape), dtype=np.float32))

    def _build(self, n_train: int, n_test: int, shape: list[int], key: str, labels: tuple[int, int],
               sample: np.ndarray) -> None:
        self.n_train, self.n_test, self.input_shape, self.data_key = n_train, n_test, shape, key
        self.classes = self._classes(*labels)
        self.model = self._model(sample)
        self.n_params = models.n_parameters(self.model)
        self.member_bytes = member_bytes(self.n_params, self.p["optimizer"], self.p["momentum"])
        self.steps_per_epoch = self.n_train // self.p["batch_size"]
        self.total_steps = self.p["epochs"] * self.steps_per_epoch
        # parameters and gradients are views into flat buffers: a step copies the gradient in once
        self.flat = models.FlatView(self.model)
        self.optimizer = make_optimizer(self.p["optimizer"], self.model.parameters(), self.p)
        self.scheduler = make_scheduler(self.optimizer, self.p, self.total_steps)
        if self._saved is not None:
            self._restore(self._saved)
            self._saved = None
        self.params = {self.version: self.flat.parameters_numpy()}
        self.built = True

    def _classes(self, low: int, top: int) -> int:
        classes = int(self.p["classes"] or top + 1)
        if low < 0 or top >= classes:
            raise ValidationError(f"labels out of range: they span {low}..{top}, the model has {classes} classes")
        return classes

    def _model(self, sample: np.ndarray) -> Any:
        """The job's model, built from its seed and checked against two samples of the data."""
        import torch

        model = models.build_model(self.p["model"], self.input_shape, self.classes, self.p["model_args"],
                                   seed=self.p["seed"])
        try:
            with torch.no_grad():
                out = model(torch.from_numpy(sample))
        except Exception as exc:
            raise ValidationError(f"the data (samples of shape {self.input_shape}) does not fit model "
                                  f"{self.p['model']}: {exc}") from None
        if tuple(out.shape) != (len(sample), self.classes):
            raise ValidationError(f"model {self.p['model']} gives outputs of shape {list(out.shape)}")
        return model

    # ---- planner interface ------------------------------------------------------------------
    def plan(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if self.local_name is not None:  # only the providers holding the dataset take part (and count)
            providers = [w for w in providers if any(d.name == self.local_name for d in w.datasets)]
        if not self._barrier(len(providers), now):
            return []
        if self.local_name is not None and not self._shards_ready(providers, now):
            return []
        if self.started is None:
            self.started = now
        if self.p["sync"] == "async":
            return self._plan_async(providers, outstanding, now)
        while self.round is not None and len(self.round["parts"]) >= self.round["expect"]:
            self._finish_round(now)
            self.round, self.ahead = self.ahead, None  # the round planned ahead is now the one in flight
        self._checkpoint_if_due()
        if self.round is not None:
            return self._plan_ahead(providers)  # nothing unless an allreduce round is in flight
        if self.finished:
            return []
        if self.step_in_epoch >= self.steps_per_epoch:
            return self._eval_round(providers)
        if self.global_step >= self.total_steps:
            self.finished = True
            return []
        if self.p["sync"] == "local-sgd":
            return self._local_round(providers)
        if self.p["sync"] == "allreduce":
            return self._allreduce_round(providers, now)
        return self._grad_round(providers)

    def waiting(self) -> str | None:
        return self._waiting

    def stalled(self, sub_params: Mapping[str, Any], waited: float) -> str:
        """A subtask on a provider's own shard whose provider was lost waits for a provider holding that shard
        (its data exists nowhere else), for at most ``start_timeout`` seconds (0: forever)."""
        key = sub_params.get("data", {}).get("local")
        if key is None or self.shards is None:
            return super().stalled(sub_params, waited)
        shard = next((d for d in self.shards.shards if d.key == key), None)
        why = (f"waiting for shard {key[:8]} of dataset {self.shards.name}"
               f"{f' ({shard.samples} samples)' if shard else ''}: no provider holding it is ready, and its data "
               "exists nowhere else")
        timeout = self.p["start_timeout"]
        if timeout and waited >= timeout:
            raise WaitTimeout(f"{why}; gave up after {timeout:g} s (--start-timeout)")
        return why

    def _shards_ready(self, providers: Sequence[ProviderSpec], now: float) -> bool:
        """Provider data: the shards known (the model built at the first call) and each held by a ready
        provider. Otherwise the job waits and says for which shard; after ``start_timeout`` seconds (0: never)
        of waiting it fails: a shard's data exists nowhere else, so it never trains on less."""
        assert self.local_name is not None
        why: str | None = f"waiting for a provider holding dataset {self.local_name}"
        if self.shards is None:
            found = Shards.found(self.local_name, providers)
            if found is not None:
                self._build_on_shards(found)
        elif not self.built:  # resumed: the shards the checkpoint recorded
            self._build_on_shards(self.shards)
        if self.shards is not None:
            why = self.shards.missing(providers)
        if why is None:
            self._shard_wait_since = self._waiting = None
            return True
        if self._shard_wait_since is None:
            self._shard_wait_since = now
        timeout = self.p["start_timeout"]
        if timeout and now - self._shard_wait_since >= timeout:
            raise WaitTimeout(f"{why}; gave up after {timeout:g} s (--start-timeout)")
        self._waiting = why
        return False


    def _barrier(self, ready: int, now: float) -> bool:
        """The start barrier: True once ``min_providers`` eligible providers were ready together (then
        training goes on with whoever is there). Until then the job waits and says so; after
        ``start_timeout`` seconds (0: never) of waiting it fails (WaitTimeout: the head fails the job)."""
        if self.barrier_met:
            return True
        need, timeout = self.p["min_providers"], self.p["start_timeout"]
        if ready >= need:
            self.barrier_met, self._waiting = True, None
            log.info("start barrier met: %d providers ready", ready, extra={"job_id": self.job_id})
            return True
        if self._barrier_since is None:
            self._barrier_since = now
        if timeout and now - self._barrier_since >= timeout:
            raise WaitTimeout(f"start barrier: needed {need} providers within {timeout:g} s, "
                              f"{ready} {'was' if ready == 1 else 'were'} ready")
        self._waiting = f"waiting for {need} providers, {ready} ready"
        return False

    def subtask_inputs(self, sub: Mapping[str, Any]) -> list[np.ndarray]:
        # every copy of a subtask gets the parameters it was planned on (``_new_version`` keeps the versions the
        # async batches out were computed on): a re-sent one, and one run on a second provider to verify the first
        if sub["kind"] == "allreduce":
            return self._allreduce_inputs(sub)
        params = self.params.get(sub["version"], self.params[self.version])
        if sub["kind"] == "eval":
            return [params]
        return [params, self.idx[sub["shard"]]]

    def check_result(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        TrainTask.check_result(sub_params, arrays)

    def verifiable(self, sub_params: Mapping[str, Any]) -> bool:
        """Gradients and local-SGD rounds, on the job's uploaded data (a shard of a provider's own data may exist on
        that provider only: its verification could wait for good)."""
        return sub_params["kind"] in VERIFIED_KINDS and "local" not in sub_params["data"]

    def compare(self, sub_params: Mapping[str, Any], a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> str | None:
        """The gradient (or parameter) vectors at float32's tolerance (``compare_arrays``), then their
        ``[loss, samples, correct]``: the samples equal, the loss sums at float32's tolerance (they are float32
        sums), the correct counts within ``CORRECT_SLACK``."""
        why = compare_arrays(a[:-1], b[:-1])
        if why is not None:
            return f"the {'gradient' if sub_params['kind'] == 'grad' else 'parameter'} vectors differ: {why}"
        return _compare_metrics(a[-1], b[-1])

    def merge(self, sub: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        loss_sum = float(arrays[-1][0])
        if not math.isfinite(loss_sum):
            raise ValidationError(f"non-finite loss at epoch {self.epoch + 1}, step {self.step_in_epoch + 1}: "
                                  "lower the learning rate or check the data")
        if self.p["sync"] == "async" and sub["kind"] == "grad":
            self._merge_async(sub, arrays, now)
            return
        rnd = self._open_round(sub["round"])
        if rnd is None:
            return  # a result of a round already closed (duplicate) or abandoned: ignore
        rnd["parts"][sub["shard"]] = arrays

    # ---- sync ---------------------------------------------------------------------------------
    def _shards(self, providers: Sequence[ProviderSpec], count: int) -> list[tuple[ProviderSpec, int]]:
        return provider_shares(count, providers)

    def _base(self, kind: str, round_id: int, shard: int, data: str, local: str | None = None) -> dict[str, Any]:
        """A subtask's common params; ``local``: the key of the provider's own dataset it works on."""
        if local is not None:
            ref = {"local": local, "split": data}
        else:
            xs, ys = ("x", "y") if data == "train" else ("x_test", "y_test")
            ref = {"x": self.blob_ids[xs], "y": self.blob_ids[ys], "key": f"{self.data_key}-{data}"}
        return {"kind": kind, "job_id": self.job_id, "round": round_id, "shard": shard, "version": self.version,
                "model": self.p["model"], "model_args": self.p["model_args"], "input_shape": self.input_shape,
                "classes": self.classes, "n_params": self.n_params, "data": ref}

    def _round_id(self) -> int:
        """A new round's id, never one given before by this planner: a late result of a dropped round can never be
        taken for one of a later round (a restarted head's planner starts again, but the head drops results of
        its previous run by their epoch)."""
        self._rounds += 1
        return self._rounds

    def _new_round(self, kind: str, expect: int) -> int:
        round_id = self._round_id()
        self.round = {"id": round_id, "kind": kind, "expect": expect, "parts": {}}
        self.idx.clear()
        return round_id

    def _grad_round(self, providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        b = self.p["batch_size"]
        order = epoch_order(self.p["seed"], self.epoch, self.n_train)
        batch = order[self.step_in_epoch * b:(self.step_in_epoch + 1) * b]
        if self.shards is not None:
            return self._shard_grad_round(self.shards, batch, providers)
        shards = self._shards(providers, b)
        rid = self._new_round("grad", len(shards))
        plans, start = [], 0
        for k, (w, n) in enumerate(shards):
            self.idx[k] = batch[start:start + n]
            start += n
            plans.append(SubtaskPlan(w.provider_id, self._base("grad", rid, k, "train"), self._flops(n, 3)))
        return plans

    def _local_round(self, providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        b, k_steps = self.p["batch_size"], min(self.p["local_steps"], self.steps_per_epoch - self.step_in_epoch)
        order = epoch_order(self.p["seed"], self.epoch, self.n_train)
        batches = order[self.step_in_epoch * b:(self.step_in_epoch + k_steps) * b].reshape(k_steps, b)
        shards = self._shards(providers, b)
        rid = self._new_round("local", len(shards))
        plans, start = [], 0
        for k, (w, n) in enumerate(shards):
            self.idx[k] = np.ascontiguousarray(batches[:, start:start + n]).reshape(-1)
            start += n
            sub = {**self._base("local", rid, k, "train"), "local_steps": k_steps,
                   "lr": self.optimizer.param_groups[0]["lr"]}
            plans.append(SubtaskPlan(w.provider_id, sub, self._flops(n * k_steps, 3)))
        assert self.round is not None  # set by _new_round above
        self.round["local_steps"] = k_steps
        return plans

    def _shard_grad_round(self, shards: Shards, batch: np.ndarray,
                          providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        """Each shard's part of the batch, to a ready provider holding it (``_shards_ready`` made sure of one);
        the gradients are summed in shard order."""
        parts = shards.split(batch)
        holders = shards.holders(providers)
        rid = self._new_round("grad", len(parts))
        plans = []
        for j, local in parts:
            self.idx[j] = local
            w = holders[j][0]
            plans.append(SubtaskPlan(w.provider_id, self._base("grad", rid, j, "train", shards.shards[j].key),
                                     self._flops(len(local), 3)))
        return plans

    def _shard_eval_round(self, shards: Shards, providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        """Each shard's test split, on a provider holding it."""
        holders = shards.holders(providers)
        tested = [j for j, d in enumerate(shards.shards) if d.test_samples]
        rid = self._new_round("eval", len(tested))
        return [SubtaskPlan(holders[j][0].provider_id,
                            {**self._base("eval", rid, j, "test", shards.shards[j].key), "row0": 0,
                             "rows": shards.shards[j].test_samples}, self._flops(shards.shards[j].test_samples, 1))
                for j in tested]

    def _eval_round(self, providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        if self.shards is not None:
            return self._shard_eval_round(self.shards, providers)
        shards = self._shards(providers, self.n_test)
        rid = self._new_round("eval", len(shards))
        plans, start = [], 0
        for k, (w, n) in enumerate(shards):
            plans.append(SubtaskPlan(w.provider_id, {**self._base("eval", rid, k, "test"), "row0": start,
                                                     "rows": n}, self._flops(n, 1)))
            start += n
        return plans

    def _flops(self, samples: int, passes: int) -> float:
        return 2.0 * passes * samples * self.n_params

    def _finish_round(self, now: float) -> None:
        rnd = self.round
        assert rnd is not None
        parts = [rnd["parts"][k] for k in sorted(rnd["parts"])]  # shard order: arrival order never matters
        loss_sum = sum(float(p[-1][0]) for p in parts)
        n = int(sum(float(p[-1][1]) for p in parts))
        correct = int(sum(float(p[-1][2]) for p in parts))
        if rnd["kind"] == "eval":
            self._end_epoch(loss_sum / max(1, n), correct / max(1, n), now)
        elif rnd["kind"] == "grad":
            total = np.zeros(self.n_params, dtype=np.float64)
            for part in parts:
                total += part[0]
            self._apply_gradient((total / self.p["batch_size"]).astype(np.float32))
            self._after_steps(1, loss_sum / n, correct / n, n, now)
        elif rnd["kind"] == "allreduce":
            self._finish_allreduce(parts, now)
            self._after_steps(rnd["steps"], loss_sum / n, correct / n, n, now)
        else:  # local-sgd: average the providers' parameters, weighted by their samples
            weights = np.array([float(p[-1][1]) for p in parts])
            avg = sum(w * p[0].astype(np.float64) for w, p in zip(weights, parts, strict=True)) / weights.sum()
            self._set_parameters(avg.astype(np.float32))
            self._after_steps(rnd["local_steps"], loss_sum / n, correct / n, n, now)
        self.round = None

    def _apply_gradient(self, grad: np.ndarray) -> None:
        import torch

        self.flat.grads.copy_(torch.from_numpy(grad))
        self.optimizer.step()
        if self.scheduler is not None and self.p["schedule"] == "cosine":
            self.scheduler.step()
        self._new_version()

    def _set_parameters(self, flat: np.ndarray) -> None:
        self.flat.load(flat)
        self._new_version()

    def _new_version(self) -> None:
        """A new version of the parameters; the last ``max_staleness + 2`` are kept, and (async) each one a batch out
        was computed on: a copy of it (re-sent, or run on a second provider to verify it) gets the same parameters."""
        self.version += 1
        self.params[self.version] = self.flat.parameters_numpy()
        keep = self.p["max_staleness"] + 2
        out = {version for _, _, version in self._async_out.values()}
        for v in [v for v in self.params if v < self.version - keep and v not in out]:
            del self.params[v]

    def _after_steps(self, steps: int, loss: float, acc: float, samples: int, now: float) -> None:
        if self._last_step_at is not None and self.step_in_epoch > 0:  # eval rounds are not steps
            self.step_seconds.append((now - self._last_step_at) / steps)
        self._last_step_at = now
        before = self.global_step
        self.global_step += steps
        self.step_in_epoch += steps
        self.samples_done += samples
        self.last = {"epoch": self.epoch + 1, "step": self.global_step, "loss": loss, "accuracy": acc,
                     "samples_per_s": self.samples_done / max(1e-9, now - (self.started or now)),
                     "lr": self.optimizer.param_groups[0]["lr"]}
        self.pending.append(Metrics("step", dict(self.last)))
        if self.global_step // self.p["checkpoint_every"] > before // self.p["checkpoint_every"]:
            self.checkpoint_due = True

    def _end_epoch(self, test_loss: float, test_acc: float, now: float) -> None:
        self.epoch += 1
        self.step_in_epoch = 0
        record = {"epoch": self.epoch, "step": self.global_step, "elapsed_s": round(now - (self.started or now), 4),
                  "train_loss": self.last.get("loss", float("nan")),
                  "train_accuracy": self.last.get("accuracy", float("nan")), "test_loss": test_loss,
                  "test_accuracy": test_acc}
        self.history.append(record)
        self.pending.append(Metrics("epoch", dict(record)))
        if self.scheduler is not None and self.p["schedule"] == "step":
            self.scheduler.step()
        self.checkpoint_due = True
        if self.epoch >= self.p["epochs"]:
            self.finished = True

    # ---- allreduce --------------------------------------------------------------------------------
    def _allreduce_round(self, providers: Sequence[ProviderSpec], now: float) -> list[SubtaskPlan]:
        """One round: ``round_steps`` global batches (never past the epoch), each split over the group by
        measured speed; the members run them together (collective.py) and rank 0 sends the state back. The
        round after it is planned at once (``_plan_ahead``)."""
        if self.rendezvous is None:
            raise ValidationError("allreduce needs the head's training rendezvous, and this head gave none")
        if self._regroup_after is not None:
            if now < self._regroup_after:
                self._waiting = "re-forming the training group (a member was lost or failed)"
                return []
            self._regroup_after = None
        self._waiting = None
        able, why = joinable(providers, self.member_bytes)
        if not able:  # asked while waiting, and nobody is ready (or can join a group)
            if why:
                self._waiting = "waiting for a provider that can join an allreduce group: " + "; ".join(why)
            return []
        if self.shards is not None:
            members, shard_of = self._shard_members(self.shards, able)
        else:
            members, shard_of = self._membership(able), None
        self.round, plans = self._allreduce_plan(members, shard_of, ahead=False)
        return [*plans, *self._plan_ahead(able)]

    def _plan_ahead(self, providers: Sequence[ProviderSpec]) -> list[SubtaskPlan]:
        """Pipelined rounds: while a round runs, the group's next round of the same epoch is already out. A
        provider runs its subtasks in order, so every member starts it the moment it ends the round before,
        from the state that round left it (``kept``): the head's merge of one round and its planning of the
        next are off the members' path. Not past an epoch's end (the eval round scores the parameters the
        last round of the epoch returns), and not when the group would change (a member not ready, or a
        provider ready to join: the next round forms the new group). Either round abandoned drops both
        (``abandoned``): the later one starts from the state the earlier one leaves."""
        rnd = self.round
        if self.ahead is not None or rnd is None or rnd["kind"] != "allreduce":
            return []
        step, in_epoch = self.global_step + rnd["steps"], self.step_in_epoch + rnd["steps"]
        if in_epoch >= self.steps_per_epoch or step >= self.total_steps:
            return []
        able = self._joinable(providers)
        try:
            wanted = self._holders(self.shards, able) if self.shards is not None else able[: self.p["batch_size"]]
        except (ValidationError, IndexError):  # a shard without a ready holder: the round in flight decides
            return []
        if {w.provider_id for w in wanted} != set(rnd["members"]):
            return []
        ready = {w.provider_id: w for w in wanted}
        members = [ready[pid] for pid in rnd["members"]]
        self.ahead, plans = self._allreduce_plan(members, rnd["shard_of"], ahead=True)
        return plans

    def _joinable(self, providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
        """The providers that can join this job's training group (members.py)."""
        return joinable(providers, self.member_bytes)[0]

    def _allreduce_plan(self, members: Sequence[ProviderSpec], shard_of: Sequence[int] | None,
                        ahead: bool) -> tuple[dict[str, Any], list[SubtaskPlan]]:
        """A round of the group ``members`` (rank order), starting where the round in flight ends (``ahead``)
        or where the head's state is. ``shard_of``: provider data, each member's shard (rank r computes the part
        of every global batch in shard ``shard_of[r]``, ``counts`` of them each step, often uneven, possibly 0;
        the sum over the group is the gradient of the whole batch, as in ``_grad_round``); else the job's
        uploaded data, each global batch split by measured speed."""
        assert self.rendezvous is not None  # checked by _allreduce_round
        skip = self.round["steps"] if ahead and self.round is not None else 0
        b, step, in_epoch = self.p["batch_size"], self.global_step + skip, self.step_in_epoch + skip
        k = min(self.p["round_steps"], self.steps_per_epoch - in_epoch, self.total_steps - step)
        order = epoch_order(self.p["seed"], self.epoch, self.n_train)
        batches = order[in_epoch * b:(in_epoch + k) * b].reshape(k, b)
        states = ["kept" if ahead or w.provider_id in self._warm else "sent" for w in members]
        rid = self._round_id()
        group = f"g{self._generation}.r{rid}"
        rnd: dict[str, Any] = {
            "id": rid, "kind": "allreduce", "expect": len(members), "parts": {}, "steps": k, "group": group,
            "members": tuple(w.provider_id for w in members), "shard_of": shard_of, "idx": {},
            "inputs": (self.flat.parameters_numpy(), export_state(self.optimizer, self.p["optimizer"],
                                                                  self.p["momentum"])) if "sent" in states else None}
        shared = {"world": len(members), "steps": k, "batch_size": b, "step": step,
                  "version": self.version + (1 if ahead else 0), "lrs": self._lr_plan(k, skip),
                  "optimizer": {"name": self.p["optimizer"], "momentum": self.p["momentum"],
                                "weight_decay": self.p["weight_decay"]},
                  "group": {"port": int(self.rendezvous["port"]), "prefix": self._prefix(),
                            "backend": backend(members), "timeout": float(self.p["collective_timeout"])}}
        if shard_of is None:
            known = [self._rates.get(w.provider_id) for w in members]
            weights = [r for r in known if r] if all(known) else [w.gflops for w in members]
            cuts = np.cumsum([0, *proportional_rows(b, weights)])
            parts = [[batch[cuts[r]:cuts[r + 1]] for batch in batches] for r in range(len(members))]
        else:
            assert self.shards is not None
            per_step = [dict(self.shards.split(batch)) for batch in batches]  # shard -> its local indices
            parts = [[s.get(shard_of[r], _NO_INDICES) for s in per_step] for r in range(len(members))]
        plans = []
        for rank, w in enumerate(members):
            rnd["idx"][rank] = np.ascontiguousarray(np.concatenate(parts[rank]))
            if shard_of is None:
                sub = self._base("allreduce", rid, rank, "train")
            else:
                assert self.shards is not None
                sub = {**self._base("allreduce", rid, rank, "train", self.shards.shards[shard_of[rank]].key),
                       "counts": [len(p) for p in parts[rank]]}
            sub.update(shared, rank=rank, state=states[rank])
            plans.append(SubtaskPlan(w.provider_id, sub, self._flops(int(rnd["idx"][rank].size), 3), group=group))
        return rnd, plans

    def _shard_members(self, shards: Shards, providers: Sequence[ProviderSpec]) -> tuple[list[ProviderSpec],
                                                                                        list[int]]:
        """Provider data: one member per shard (a ready provider holding it), and each member's shard."""
        chosen = self._holders(shards, providers)
        members = self._membership(chosen)
        shard_of = {w.provider_id: j for j, w in enumerate(chosen)}
        return members, [shard_of[w.provider_id] for w in members]

    @staticmethod
    def _holders(shards: Shards, providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
        """A ready provider holding each shard, in shard order."""
        chosen = [held[0] for held in shards.holders(providers)]  # _shards_ready made sure each shard has one
        if len({w.provider_id for w in chosen}) < len(chosen):
            raise ValidationError(f"dataset provider:{shards.name}: a provider holds two of its shards; allreduce "
                                  "needs one provider per shard")
        return chosen

    def _membership(self, providers: Sequence[ProviderSpec]) -> list[ProviderSpec]:
        """The group, in rank order: the same as last round while the same providers are ready (ranks keep,
        the formed process group is reused); anyone new or gone forms a new generation."""
        ready = {w.provider_id: w for w in list(providers)[: self.p["batch_size"]]}
        if not self._members or set(self._members) != set(ready):
            self._generation += 1
            self._members = tuple(ready)
            self._warm = frozenset()
        return [ready[pid] for pid in self._members]

    def _prefix(self) -> str:
        """The group's keys in the rendezvous: only the head and this generation's members know them."""
        assert self.rendezvous is not None
        seed = f"{self.rendezvous['secret']}:{self.job_id}:{self._generation}"
        return hashlib.sha256(seed.encode()).hexdigest()[:32]

    def _lr_plan(self, steps: int, skip: int = 0) -> list[float]:
        """The learning rate of each of ``steps`` steps, ``skip`` steps from now (the schedule is not moved on)."""
        groups = self.optimizer.param_groups
        if self.scheduler is None or self.p["schedule"] != "cosine":
            return [float(groups[0]["lr"])] * steps
        saved, lr0 = self.scheduler.state_dict(), [g["lr"] for g in groups]
        lrs = []
        for i in range(skip + steps):
            if i >= skip:
                lrs.append(float(groups[0]["lr"]))
            self._scheduler_step()
        self.scheduler.load_state_dict(saved)
        for g, lr in zip(groups, lr0, strict=True):
            g["lr"] = lr
        return lrs

    def _scheduler_step(self) -> None:
        with warnings.catch_warnings():  # the head's optimizer never steps in allreduce: the members' do
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()

    def _open_round(self, round_id: int) -> dict[str, Any] | None:
        """The round in flight (or the one planned ahead of it) with this id."""
        return next((r for r in (self.round, self.ahead) if r is not None and r["id"] == round_id), None)

    def _allreduce_inputs(self, sub: Mapping[str, Any]) -> list[np.ndarray]:
        rnd = self._open_round(sub["round"])
        if rnd is None:
            raise TaskError(f"allreduce round {sub['round']} is no longer open")
        idx = rnd["idx"][sub["shard"]]
        if sub["state"] == "kept":  # it holds them: only its sample indices travel
            return [_EMPTY, idx, *[_EMPTY for _ in state_keys(self.p["optimizer"], self.p["momentum"])]]
        assert rnd["inputs"] is not None  # a round with a member sent the state holds it
        params, state = rnd["inputs"]
        return [params, idx, *state]

    def _finish_allreduce(self, parts: Sequence[Sequence[np.ndarray]], now: float) -> None:
        """Rank 0's parameters and optimizer state become the head's; every member's speed is learned."""
        rank0 = parts[0]
        assert self.round is not None
        steps = self.round["steps"]
        self.flat.load(rank0[0])
        import_state(self.optimizer, self.p["optimizer"], self.p["momentum"], list(rank0[1:-1]),
                     self.global_step + steps)
        if self.scheduler is not None and self.p["schedule"] == "cosine":
            for _ in range(steps):
                self._scheduler_step()
        self._new_version()
        for pid, part in zip(self.round["members"], parts, strict=True):
            samples, busy = float(part[-1][1]), float(part[-1][3])
            if samples > 0 and busy > 0:
                rate = samples / busy
                old = self._rates.get(pid)
                self._rates[pid] = rate if old is None else RATE_WEIGHT * rate + (1 - RATE_WEIGHT) * old
        self._warm = frozenset(self.round["members"])
        self._abandoned_in_a_row = 0

    def abandoned(self, group: str, why: str, now: float) -> Sequence[str]:
        rounds = [r for r in (self.round, self.ahead) if r is not None]
        if not any(r.get("group") == group for r in rounds):
            return ()
        self.round = self.ahead = None  # the round ahead starts from the state the abandoned one leaves
        self._members, self._warm = (), frozenset()
        self.regroups += 1
        self._abandoned_in_a_row += 1
        if self._abandoned_in_a_row > MAX_ABANDONED_ROUNDS:
            raise TaskError(f"allreduce: {self._abandoned_in_a_row} rounds in a row were abandoned; last: {why}")
        self._regroup_after = now + REGROUP_SETTLE_S
        log.warning("allreduce round abandoned (%s); the group is formed again", why, extra={"job_id": self.job_id})
        return [r["group"] for r in rounds if r.get("group") not in (None, group)]

    # ---- async (bounded staleness) -----------------------------------------------------------
    def _plan_async(self, providers: Sequence[ProviderSpec], outstanding: int, now: float) -> list[SubtaskPlan]:
        if self.round is not None:  # an eval round between epochs
            if len(self.round["parts"]) < self.round["expect"]:
                return []
            self._finish_round(now)
        if not self._async_out:
            self._checkpoint_if_due()
        if self.finished:
            return []
        if self.step_in_epoch >= self.steps_per_epoch:
            return [] if self._async_out else self._eval_round(providers)
        if not self._async_queue and not self._async_out:
            self._async_queue = list(range(self.step_in_epoch, self.steps_per_epoch))
        busy = {pid for pid, _, _ in self._async_out.values()}
        plans = []
        for w in providers:  # one batch in flight per provider
            if not self._async_queue:
                break
            if w.provider_id not in busy:
                plans.append(self._async_plan(w, self._async_queue.pop(0)))
        return plans

    def _async_plan(self, w: ProviderSpec, batch_no: int) -> SubtaskPlan:
        b = self.p["batch_size"]
        order = epoch_order(self.p["seed"], self.epoch, self.n_train)
        self._next_shard += 1
        shard = self._next_shard
        self.idx[shard] = order[batch_no * b:(batch_no + 1) * b]
        self._async_out[shard] = (w.provider_id, batch_no, self.version)
        return SubtaskPlan(w.provider_id, {**self._base("grad", 0, shard, "train"), "batch": batch_no},
                           self._flops(b, 3))

    def _merge_async(self, sub: Mapping[str, Any], arrays: Sequence[np.ndarray], now: float) -> None:
        entry = self._async_out.pop(sub["shard"], None)
        if entry is None:
            return  # duplicate
        batch_no = entry[1]
        self.idx.pop(sub["shard"], None)
        if self.version - sub["version"] > self.p["max_staleness"]:
            self.stale_dropped += 1
            self._async_queue.insert(0, batch_no)  # too stale: run it again on fresh parameters
            return
        loss_sum, n, correct = (float(v) for v in arrays[-1])
        self._apply_gradient((arrays[0].astype(np.float64) / n).astype(np.float32))
        self._after_steps(1, loss_sum / n, correct / n, int(n), now)

    # ---- checkpoints and outputs ---------------------------------------------------------------
    def _checkpoint(self) -> SaveFile:
        """Model, optimizer, scheduler and position (at a round boundary), for the head to write."""
        import torch

        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
                 "epoch": self.epoch, "step_in_epoch": self.step_in_epoch, "global_step": self.global_step,
                 "version": self.version, "samples_done": self.samples_done,
                 "history": json.dumps(self.history), "last": json.dumps(self.last),
                 "torch_rng": torch.get_rng_state()}
        if self.shards is not None:  # a resumed job trains on the same shards
            state["shards"] = json.dumps(self.shards.record())
        return SaveFile(CHECKPOINT, _torch_bytes(state))

    def _checkpoint_if_due(self) -> None:
        """Called between rounds only: a checkpoint never holds half a step."""
        if self.checkpoint_due and not self.finished:
            self.pending.append(self._checkpoint())
            self.checkpoint_due = False

    def _load_checkpoint(self) -> dict[str, Any] | None:
        """Read when the planner is built (after a head restart): the job's last checkpoint, if any."""
        import torch

        path = self.job_dir / CHECKPOINT
        if not path.exists():
            return None
        state: dict[str, Any] = torch.load(path, weights_only=True)
        return state

    def _restore(self, state: Mapping[str, Any]) -> None:
        """Resume from the job's last checkpoint (read when the planner was built)."""
        import torch

        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"]:
            self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step_in_epoch = int(state["epoch"]), int(state["step_in_epoch"])
        self.global_step, self.version = int(state["global_step"]), int(state["version"])
        self.samples_done = int(state["samples_done"])
        self.history, self.last = json.loads(state["history"]), json.loads(state["last"])
        torch.set_rng_state(state["torch_rng"])
        self.finished = self.epoch >= self.p["epochs"]
        log.info("resumed from checkpoint at epoch %d step %d", self.epoch, self.global_step,
                 extra={"job_id": self.job_id})

    def effects(self) -> list[Effect]:
        out, self.pending = self.pending, []
        return out

    def summary(self) -> dict[str, Any]:
        final = self.history[-1] if self.history else {}
        times = sorted(self.step_seconds)
        return {"training": {
            "epoch": self.epoch, "step": self.global_step, "total_steps": self.total_steps,
            "last": self.last, "history": self.history, "stale_dropped": self.stale_dropped,
            **({"group": {"generation": self._generation, "world": len(self._members), "regroups": self.regroups}}
               if self.p["sync"] == "allreduce" else {}),
            "step_ms_median": round(1000 * times[len(times) // 2], 3) if times else None,
            "test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss")}}

    def progress(self) -> tuple[int, int]:
        return self.global_step, self.total_steps

    def finish(self, now: float) -> list[SaveFile]:
        final = self.history[-1] if self.history else {}
        meta = {"model": self.p["model"], "model_args": self.p["model_args"], "input_shape": self.input_shape,
                "classes": self.classes, "parameters": self.n_params, "training": self.p,
                "dataset_hash": self.data_key, "steps": self.global_step,
                "seconds": round(now - (self.started or now), 3),
                "metrics": {"test_accuracy": final.get("test_accuracy"), "test_loss": final.get("test_loss"),
                            "train_loss": final.get("train_loss"), "history": self.history,
                            "stale_gradients_dropped": self.stale_dropped}}
        return [SaveFile("model.pt", _torch_bytes(self.model.state_dict())),
                SaveFile("model.json", json.dumps(meta, indent=2).encode())]


_NO_INDICES = np.zeros(0, dtype=np.int64)


def _compare_metrics(a: np.ndarray, b: np.ndarray) -> str | None:
    """Two results' ``[loss sum, samples, correct]``: None if they agree."""
    (loss_a, n_a, correct_a), (loss_b, n_b, correct_b) = (float(v) for v in a), (float(v) for v in b)
    if n_a != n_b:
        return f"{n_a:g} samples against {n_b:g}"
    if math.isnan(loss_a) != math.isnan(loss_b):
        return f"loss sum {loss_a:g} against {loss_b:g}"
    rtol, _ = tolerance(np.dtype(np.float32))
    if not math.isnan(loss_a) and abs(loss_a - loss_b) > rtol * max(abs(loss_a), abs(loss_b), 1.0):
        return f"loss sum {loss_a:.9g} against {loss_b:.9g}"
    if abs(correct_a - correct_b) > max(1.0, CORRECT_SLACK * n_a):
        return f"{correct_a:g} of {n_a:g} samples right against {correct_b:g}"
    return None


def _torch_bytes(obj: Any) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()
