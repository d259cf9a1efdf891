"""The params each built-in task type's subtasks carry on the wire (docs/PROTOCOL.md §10), as
schemas of the wire module (common/protocol.py). A provider checks a subtask's params against its
task type's schema before it runs it (``TaskType.check_params``): a malformed subtask fails with a
clear ``bad_message`` instead of an error deep inside the computation."""

from __future__ import annotations

from collections.abc import Mapping

from ..protocol import Field

_INT = Field((int,))
_ID = Field((str,), is_id=True)

#: matmul §10 and any task cut by rows: the rows of the first input this subtask owns
ROWS = {"row0": _INT, "rows": _INT}

#: the model a subtask builds (train and predict)
MODEL = {"model": Field((str,), max_len=64), "model_args": Field((dict,)),
         "input_shape": Field((list,), items=(int,), max_len=8), "classes": _INT}

#: predict §10.2
PREDICT = {**ROWS, **MODEL}

#: train §10.1: the fields of every train subtask, then those of each kind
#: the data: two blobs of the head's state dir (x, y, key), or a provider's own dataset (local: its content key,
#: split: "train" or "test"; ``--dataset provider:NAME``)
TRAIN_DATA = {"x": Field((str,), is_id=True, required=False), "y": Field((str,), is_id=True, required=False),
              "key": Field((str,), max_len=128, required=False), "local": Field((str,), is_id=True, required=False),
              "split": Field((str,), choices=frozenset({"train", "test"}), required=False)}
TRAIN = {"kind": Field((str,), choices=frozenset({"grad", "eval", "local", "allreduce"})), "job_id": _ID,
         "round": _INT, "shard": _INT, "version": _INT, **MODEL, "n_params": _INT,
         "data": Field((dict,), fields=TRAIN_DATA)}
TRAIN_KIND: Mapping[str, Mapping[str, Field]] = {
    "grad": {"batch": Field((int,), required=False)},  # async rounds name their batch
    "local": {"local_steps": _INT, "lr": Field((int, float))},
    "eval": ROWS,
    "allreduce": {
        "rank": _INT, "world": _INT, "steps": _INT, "batch_size": _INT, "step": _INT,
        "counts": Field((list,), items=(int,), max_len=100_000, required=False),
        "lrs": Field((list,), items=(int, float), max_len=100_000),
        "state": Field((str,), choices=frozenset({"sent", "kept"})),
        "optimizer": Field((dict,), fields={"name": Field((str,), choices=frozenset({"sgd", "adam", "adadelta"})),
                                            "momentum": Field((int, float)), "weight_decay": Field((int, float))}),
        "group": Field((dict,), fields={"port": _INT, "prefix": Field((str,), max_len=64),
                                        "backend": Field((str,), choices=frozenset({"gloo", "nccl"})),
                                        "timeout": Field((int, float))}),
    },
}
