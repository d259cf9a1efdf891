"""Who can be a member of an ``--sync allreduce`` training group, from what providers report at
registration (PROTOCOL.md 5.1): the ``torch.distributed`` backends they list (``collectives``) and the
memory they offer (``memory_bytes``). The planner makes members only of providers that can join (and says
why the others were left out); a job that no ready provider can join is refused at submission
(``TrainTask.cannot_start``). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import ProviderSpec
from .optim import state_keys
from .shards import Shards

#: float32 vectors the size of the model every member holds besides the optimizer's state: the parameters,
#: their gradients, and the state a round hands over (received from the head, or sent back by rank 0)
VECTORS_PER_PARAMETER = 3
FLOAT32_BYTES = 4


def backend(members: Sequence[ProviderSpec]) -> str:
    """NCCL when every member is CUDA and has it, else gloo (mixed devices meet on the CPU)."""
    if members and all(w.device_kind == "cuda" and "nccl" in w.collectives for w in members):
        return "nccl"
    return "gloo"


def member_bytes(n_params: int, optimizer: str, momentum: float) -> int:
    """The least memory a member needs for a model of ``n_params`` parameters: the model-sized float32
    vectors it holds (``VECTORS_PER_PARAMETER`` plus one per optimizer state vector). Activations come on top."""
    vectors = VECTORS_PER_PARAMETER + len(state_keys(optimizer, momentum))
    return FLOAT32_BYTES * n_params * vectors


def joinable(providers: Sequence[ProviderSpec], need_bytes: int,
             group_backend: str | None = None) -> tuple[list[ProviderSpec], list[str]]:
    """The providers (in the order given) that can join a group of these providers, whose members need
    ``need_bytes`` each (``member_bytes``), and why the others cannot. The backend is that of them all (unless
    given): NCCL when they are all CUDA with it, else gloo, which a provider without ``gloo`` in its
    collectives lacks."""
    gloo = (group_backend or backend(providers)) == "gloo"
    able: list[ProviderSpec] = []
    lacking: list[str] = []
    small: list[str] = []
    for w in providers:
        if gloo and "gloo" not in w.collectives:
            lacking.append(w.provider_id[:8])
        elif need_bytes > w.memory_bytes:
            small.append(f"{w.provider_id[:8]} offers {_mb(w.memory_bytes)} of memory and the model needs at least "
                         f"{_mb(need_bytes)} on each member (parameters, gradients and optimizer state)")
        else:
            able.append(w)
    why = [f"torch.distributed is unavailable on {', '.join(lacking)}"] if lacking else []
    return able, why + small


def refusal(providers: Sequence[ProviderSpec], need_bytes: int, need_members: int,
            shards: Shards | None = None) -> str | None:
    """Why an allreduce job cannot start on the ready ``providers`` (those holding its dataset, for one on the
    providers' own ``shards``) because of who they are, or None. Refused: when there are ``need_members``
    (its start barrier) or more but fewer can join, and when a shard is held only by providers that cannot.
    Too few providers is no refusal: the job waits for more, as any job does."""
    able, why = joinable(providers, need_bytes)
    if not why:
        return None
    if len(able) < need_members <= len(providers):
        return (f"an allreduce job needs {need_members} provider{'s' if need_members > 1 else ''} that can join its "
                f"torch.distributed group; {len(providers)} ready, {len(able)} can: " + "; ".join(why))
    if shards is not None:
        ids = {w.provider_id for w in able}
        for shard, held in zip(shards.shards, shards.holders(providers), strict=True):
            if held and not any(w.provider_id in ids for w in held):
                why = joinable(held, need_bytes, backend(providers))[1]
                return (f"shard {shard.key[:8]} of dataset provider:{shards.name} is held only by providers that "
                        "cannot join an allreduce group: " + "; ".join(why))
    return None


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB" if n < 10**10 else f"{n / 1e9:,.1f} GB"
