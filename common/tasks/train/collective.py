"""Provider side of ``--sync allreduce``: the members of a training group run rounds of k steps as one
torch.distributed process group (gloo; NCCL when every member is CUDA), without the head in the loop.

A round is one ``allreduce`` subtask per member (rank r of W). Each step every rank computes the summed
per-sample gradients of its part of the global batch (uneven parts for uneven speeds, possibly empty), the
group all-reduces them (one flat buffer, SUM), divides by the global batch size and takes the same
optimizer step, so every rank holds the same parameters: those of one process on the whole batch.

The group meets at the head's rendezvous (a TCPStore on ``Device.head_host``) under the round's key prefix.
Joining is polled, so a member told to stop while it waits for the others stops at once; a collective
blocks at most ``timeout`` seconds (a member that died breaks its connections at once; a hung one is
bounded by the timeout). A formed group is kept for the next round of the same generation; so is the
member's optimizer, which lets the head send a member that holds the state of the round's start version
nothing but its sample indices (``state: "kept"``).
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Mapping, Sequence
from datetime import timedelta
from typing import Any

import numpy as np

from ...errors import TaskError
from ..base import Device, checkpoint
from .optim import export_state, import_state, make_optimizer
from .params import metrics_array
from .runner import ModelRunner

log = logging.getLogger("dcf.provider.allreduce")

#: how often a member waiting for the others to join looks again (and for a stop)
JOIN_POLL_S = 0.002


def run_round(sub: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device) -> list[np.ndarray]:
    """One member's round of ``steps`` steps: rank 0 returns [parameters, *optimizer state, metrics], the
    others [metrics]; metrics are [loss_sum, samples, correct, compute seconds]."""
    flat = ModelRunner.model(sub, device)
    optimizer = _optimizer(sub, arrays, device, flat)
    idx = _step_indices(sub, np.asarray(arrays[1], dtype=np.int64))
    data = sub["data"]
    x_all, y_all = ModelRunner.data(device, data, "x"), ModelRunner.data(device, data, "y")
    group = _group(sub, device)
    try:
        return _steps(sub, idx, device, flat, optimizer, group, (x_all, y_all))
    except BaseException:
        # stopped, failed or timed out: the group is dropped, which closes its connections, so a peer
        # still in a collective with this member fails at once instead of at its timeout
        device.cache.pop(("allreduce-group", sub["job_id"]), None)
        device.cache.pop(("allreduce-state", sub["job_id"]), None)
        raise


def _step_indices(sub: Mapping[str, Any], flat: np.ndarray) -> list[np.ndarray]:
    """This rank's sample indices, step by step: ``counts`` of them each (provider data: however many of each
    global batch live in this member's shard), else the same number each step."""
    steps = int(sub["steps"])
    counts = sub.get("counts")
    if counts is None:
        return list(flat.reshape(steps, -1))
    if len(counts) != steps or sum(counts) != flat.size or min(counts, default=0) < 0:
        raise TaskError(f"allreduce: counts {counts[:8]}... do not cut {flat.size} indices into {steps} steps")
    return np.split(flat, np.cumsum(counts)[:-1])


def _steps(sub: Mapping[str, Any], idx: Sequence[np.ndarray], device: Device, flat: Any, optimizer: Any,
           group: Group,
           data: tuple[np.ndarray, np.ndarray]) -> list[np.ndarray]:
    import torch
    import torch.nn.functional as F

    steps, batch = int(sub["steps"]), int(sub["batch_size"])
    x_all, y_all = data
    net = flat.model
    loss_sum, correct, busy = 0.0, 0, 0.0
    for k in range(steps):
        checkpoint(device, k, steps)  # a stopped round stops between steps
        t0 = time.perf_counter()
        flat.zero_grad()
        if len(idx[k]):
            x, y = ModelRunner.tensors(device, x_all[idx[k]], y_all[idx[k]])
            out = net(x)
            loss = F.cross_entropy(out, y, reduction="sum")
            loss.backward()  # type: ignore[no-untyped-call]  # torch leaves Tensor.backward unannotated
            loss_sum += float(loss.detach())
            correct += int((out.argmax(1) == y).sum())
        busy += time.perf_counter() - t0
        group.allreduce(flat.grads)
        flat.grads.div_(batch)
        for g in optimizer.param_groups:
            g["lr"] = float(sub["lrs"][k])
        with torch.no_grad():
            optimizer.step()
    device.cache[("allreduce-state", sub["job_id"])] = (int(sub["version"]) + 1, optimizer, flat)
    metrics = np.append(metrics_array(loss_sum, sum(len(i) for i in idx), correct), busy)
    if sub["rank"] != 0:
        return [metrics]
    opt = sub["optimizer"]
    return [flat.parameters_numpy(), *export_state(optimizer, opt["name"], opt["momentum"]), metrics]


def _optimizer(sub: Mapping[str, Any], arrays: Sequence[np.ndarray], device: Device, flat: Any) -> Any:
    """The round's starting point: the state this member kept from the last round (``kept``), or the
    parameters and optimizer state the head sent."""
    opt = sub["optimizer"]
    key = ("allreduce-state", sub["job_id"])
    if sub["state"] == "kept":
        kept = device.cache.get(key)
        if kept is None or kept[0] != sub["version"] or kept[2] is not flat:
            raise TaskError(f"this member does not hold the state of version {sub['version']} (it restarted or "
                            "missed a round); the head sends it in full next round")
        return kept[1]
    flat.load(arrays[0])
    optimizer = make_optimizer(opt["name"], flat.model.parameters(), {**opt, "lr": float(sub["lrs"][0])})
    import_state(optimizer, opt["name"], opt["momentum"], arrays[2:], int(sub["step"]))
    return optimizer


# ---- the process group ---------------------------------------------------------------------------
class Group:
    """One formed process group: ``allreduce`` sums a flat tensor across the members, in place."""

    def __init__(self, pg: Any, backend: str, ident: tuple[Any, ...]) -> None:
        self.pg = pg
        self.backend = backend
        self.ident = ident

    def allreduce(self, tensor: Any) -> None:
        import torch.distributed as dist

        if self.backend == "gloo" and tensor.device.type != "cpu":  # mixed devices meet on the CPU
            buf = tensor.cpu()
            self.pg.allreduce([buf], dist.AllreduceOptions()).wait()
            tensor.copy_(buf)
            return
        self.pg.allreduce([tensor], dist.AllreduceOptions()).wait()


def _group(sub: Mapping[str, Any], device: Device) -> Group:
    """The round's process group: the one this member formed for the same generation, or a new one (the
    old one of this job is dropped, which closes its connections)."""
    g = sub["group"]
    ident = (device.head_host, g["port"], g["prefix"], sub["rank"], sub["world"], g["backend"])
    key = ("allreduce-group", sub["job_id"])
    held = device.cache.get(key)
    if held is not None and held.ident == ident:
        return held  # type: ignore[no-any-return]  # the device's cache holds any task type's values
    device.cache.pop(key, None)
    t0 = time.perf_counter()
    group = _form(sub, device, ident)
    device.cache[key] = group
    log.info("joined training group %s as rank %d of %d (%s) in %.3f s", sub["group"]["prefix"][:8], sub["rank"],
             sub["world"], sub["group"]["backend"], time.perf_counter() - t0, extra={"job_id": sub["job_id"]})
    return group


def _form(sub: Mapping[str, Any], device: Device, ident: tuple[Any, ...]) -> Group:
    import torch.distributed as dist

    g = sub["group"]
    rank, world, timeout = int(sub["rank"]), int(sub["world"]), float(g["timeout"])
    try:
        store = dist.TCPStore(device.head_host, int(g["port"]), is_master=False, use_libuv=True,
                              timeout=timedelta(seconds=timeout))
    except Exception as exc:
        raise TaskError(f"cannot reach the head's training rendezvous at {device.head_host}:{g['port']}: "
                        f"{exc}") from None
    prefixed = dist.PrefixStore(f"{g['prefix']}/", store)
    prefixed.set(f"joined/{rank}", "1")
    everyone = [f"joined/{r}" for r in range(world)]
    deadline = time.monotonic() + timeout
    while not prefixed.check(everyone):
        checkpoint(device, 0, int(sub["steps"]))  # told to stop while waiting: stop now
        if time.monotonic() > deadline:
            raise TaskError(f"the training group did not form within {timeout:g} s (rank {rank} of {world})")
        time.sleep(JOIN_POLL_S)
    pg: Any
    if g["backend"] == "nccl":
        import torch

        torch.cuda.set_device(device.torch_device())
        nccl_opts = dist.ProcessGroupNCCL.Options()
        nccl_opts._timeout = timedelta(seconds=timeout)
        pg = dist.ProcessGroupNCCL(prefixed, rank, world, nccl_opts)
    else:
        gloo_opts = getattr(dist.ProcessGroupGloo, "_Options")()  # noqa: B009 (private in torch's stubs)
        gloo_opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_address(device.head_host))]
        gloo_opts._timeout = timedelta(seconds=timeout)
        pg = dist.ProcessGroupGloo(prefixed, rank, world, gloo_opts)
    return Group(pg, g["backend"], ident)


def local_address(head_host: str) -> str:
    """This machine's address on the route to the head: the address the other members reach it at (gloo
    would otherwise pick the address its host name resolves to, which may be on another network)."""
    family = socket.AF_INET6 if ":" in head_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((head_host, 9))  # a UDP "connect" sends nothing: it only picks the route
            return str(probe.getsockname()[0])
        except OSError as exc:
            raise TaskError(f"no route to the head {head_host}: {exc}") from None
