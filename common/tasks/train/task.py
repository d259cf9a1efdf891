"""Training and inference task types: ``train`` (data-parallel, driven round by round by the
head's trainer, planner.py) and ``predict`` (split rows, run the model, merge by offset).

Provider side of ``train``, one subtask kind per round kind:
  grad   params vector + sample indices -> [sum of per-sample gradients (float32), [loss_sum, n, correct]]
  eval   params vector + index range of the test split -> [[loss_sum, n, correct]]
  local  params vector + K batches of indices -> [params after K local SGD steps, [loss_sum, n, correct]]
  allreduce  params vector, this rank's indices of K batches, optimizer state vectors (empty when ``kept``)
         -> rank 0: [params, *optimizer state, [loss_sum, n, correct, seconds]]; other ranks: [metrics]
         (the members run the K steps together as one process group: collective.py)
Datasets are not sent with subtasks: they are blobs the provider maps (co-located) or fetches once
and keeps by content hash. Models come from models.py (this package) by name.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ...errors import ProtocolError, ValidationError
from ...protocol import check_fields
from .. import wire
from ..base import ArrayMeta, Device, JobContext, Planner, ProviderSpec, TaskType, checkpoint
from ..registry import register
from .optim import state_keys
from .params import check_dataset, metrics_array, train_params
from .runner import ModelRunner, has_torch
from .shards import Shards, check_name, provider_dataset


class TrainTask(TaskType):
    """Data-parallel training. Its planner (planner.py) plans each round."""

    name = "train"
    inputs = ("x", "y", "x_test", "y_test")
    head_imports = ("torch", "torch.distributed")  # slow (seconds): on a thread, not the head's event loop
    head_extra = "torch"
    head_services = ("rendezvous",)  # allreduce groups meet at the head's TCPStore

    def check_params(self, sub_params: Mapping[str, Any]) -> None:
        """The fields of every train subtask (PROTOCOL.md §10.1), then those of its kind."""
        check_fields("train subtask params", sub_params, wire.TRAIN)
        check_fields(f"train {sub_params['kind']} subtask params", sub_params, wire.TRAIN_KIND[sub_params["kind"]])
        data = sub_params["data"]
        if not ({"x", "y", "key"} <= set(data) or {"local", "split"} <= set(data)):
            raise ProtocolError("train subtask params: data needs x, y and key, or local and split")

    def needed_inputs(self, params: Mapping[str, Any]) -> tuple[str, ...]:
        return () if provider_dataset(params) is not None else self.inputs

    def available(self) -> bool:
        return has_torch()

    def validate(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> dict[str, ArrayMeta]:
        local = provider_dataset(params)
        if local is not None:  # the data stays on the providers: checked when the job starts
            p = train_params(params)
            check_name(local)
            if inputs:
                raise ValidationError(f"a train job on dataset provider:{local} takes no inputs")
            if p["sync"] not in ("sync", "allreduce"):
                raise ValidationError(f"dataset provider:{local} trains with --sync sync (the parameter server) or "
                                      f"allreduce; {p['sync']} is not supported on the providers' own data yet")
            return {}
        if set(inputs) != set(self.inputs):
            raise ValidationError(f"train needs inputs {list(self.inputs)}")
        p = train_params(params)
        check_dataset(inputs, (("x", "y"), ("x_test", "y_test")))
        n = inputs["x"].shape[0]
        if p["batch_size"] > n:
            raise ValidationError(f"batch size {p['batch_size']} is larger than the training set ({n} samples)")
        return {}

    def eligible(self, provider: ProviderSpec, params: Mapping[str, Any],
                 inputs: Mapping[str, ArrayMeta]) -> str | None:
        # float32 everywhere, gradients come back as CPU float32; on the providers' own data, the planner picks
        # the providers holding it (and says what it waits for when none does: a start timeout applies)
        return None

    def cannot_start(self, params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta],
                     providers: Sequence[ProviderSpec]) -> str | None:
        """An allreduce job none of whose ready providers can join its group (members.py): without
        torch.distributed, or without the memory its model needs on each member (sized on torch's meta device,
        with at least 2 classes when ``classes`` is not given: the labels are not read at submission)."""
        p = train_params(params)
        local = provider_dataset(p)
        if local is not None:
            providers = [w for w in providers if any(d.name == local for d in w.datasets)]
        if p["sync"] != "allreduce" or not providers:
            return None
        from .members import member_bytes, refusal

        shards = None
        try:
            shards = Shards.found(local, providers) if local is not None else None
            shape = shards.shape if shards is not None else list(inputs["x"].shape[1:])
        except (ValidationError, KeyError):  # shards that do not fit together fail the job when it starts
            return refusal(providers, 0, p["min_providers"], shards)
        from .models import count_parameters

        n_params = count_parameters(p["model"], shape, p["classes"] or 2, p["model_args"])
        return refusal(providers, member_bytes(n_params, p["optimizer"], p["momentum"]), p["min_providers"], shards)

    def fits(self, provider: ProviderSpec, sub_params: Mapping[str, Any], inputs: Mapping[str, ArrayMeta]) -> bool:
        """A subtask on a provider's own data goes only to a provider holding that data (a replica)."""
        local = sub_params.get("data", {}).get("local")
        return local is None or any(d.key == local for d in provider.datasets)

    def planner(self, job: JobContext) -> Planner:
        from .planner import TrainPlanner  # torch: imported on the head only when a train job runs

        return TrainPlanner(job)

    @staticmethod
    def check_result(sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
        kind = sub_params["kind"]
        if kind == "allreduce":
            check_allreduce_result(sub_params, arrays)
            return
        want = 1 if kind == "eval" else 2
        if len(arrays) != want or arrays[-1].shape != (3,) or arrays[-1].dtype != np.float64:
            raise ValidationError(f"train {kind} result must be {want} arrays ending with [loss, n, correct]")
        if kind != "eval" and (arrays[0].dtype != np.float32 or arrays[0].shape != (sub_params["n_params"],)):
            raise ValidationError(f"train {kind} result vector must be float32 of {sub_params['n_params']} values")

    def run(self, sub_params: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
        import torch
        import torch.nn.functional as F

        if sub_params["kind"] == "allreduce":
            from .collective import run_round

            return run_round(sub_params, arrays, device)
        flat = ModelRunner.model(sub_params, device)
        flat.load(arrays[0])
        net = flat.model
        kind = sub_params["kind"]
        data = sub_params["data"]
        x_all = ModelRunner.data(device, data, "x")
        y_all = ModelRunner.data(device, data, "y")
        if kind == "eval":
            r0, rows = sub_params["row0"], sub_params["rows"]
            x, y = ModelRunner.tensors(device, x_all[r0:r0 + rows], y_all[r0:r0 + rows])
            with torch.no_grad():
                out = net(x)
                loss = F.cross_entropy(out, y, reduction="sum")
            return [metrics_array(float(loss), rows, int((out.argmax(1) == y).sum()))]
        idx = np.asarray(arrays[1], dtype=np.int64)
        if kind == "grad":
            x, y = ModelRunner.tensors(device, x_all[idx], y_all[idx])
            flat.zero_grad()
            out = net(x)
            loss = F.cross_entropy(out, y, reduction="sum")
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            correct = int((out.argmax(1) == y).sum())
            return [flat.gradients_numpy(), metrics_array(float(loss.detach()), len(idx), correct)]
        if kind == "local":
            steps = idx.reshape(sub_params["local_steps"], -1)
            opt = torch.optim.SGD(net.parameters(), lr=sub_params["lr"])
            loss_sum, correct = 0.0, 0
            for k, batch in enumerate(steps):
                checkpoint(device, k, len(steps))  # a cancelled job stops between steps
                x, y = ModelRunner.tensors(device, x_all[batch], y_all[batch])
                flat.zero_grad()
                out = net(x)
                loss = F.cross_entropy(out, y)
                loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
                opt.step()
                loss_sum += float(loss.detach()) * len(batch)
                correct += int((out.argmax(1) == y).sum())
            return [flat.parameters_numpy(), metrics_array(loss_sum, idx.size, correct)]
        raise ValidationError(f"unknown train subtask kind {kind!r}")


def check_allreduce_result(sub: Mapping[str, Any], arrays: Sequence[np.ndarray]) -> None:
    """Rank 0: [parameters, *optimizer state, metrics]; any other rank: [metrics]; metrics are 4 float64."""
    opt = sub["optimizer"]
    vectors = 1 + len(state_keys(opt["name"], opt["momentum"])) if sub["rank"] == 0 else 0
    if len(arrays) != vectors + 1 or arrays[-1].shape != (4,) or arrays[-1].dtype != np.float64:
        raise ValidationError(f"train allreduce result of rank {sub['rank']} must be {vectors + 1} arrays ending "
                              "with [loss, n, correct, seconds]")
    for vec in arrays[:-1]:
        if vec.dtype != np.float32 or vec.shape != (sub["n_params"],):
            raise ValidationError(f"train allreduce vectors must be float32 of {sub['n_params']} values")


register(TrainTask())
