"""The ``dcf`` command line: submit jobs, follow them, fetch results, run a local cluster.

Exit codes: 0 ok, 1 the job failed or was cancelled, 2 bad input or usage, 3 head unreachable.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from common import config
from common.errors import ConfigError, DcfError, HeadUnreachable, TaskError, ValidationError
from common.jobs import ACTIVE_NAMES, STATE_NAMES, TERMINAL_NAMES, JobState
from common.tasks.train.defaults import TRAIN_DEFAULTS

from . import keys_cli

if TYPE_CHECKING:  # numpy and the client (httpx) load only for the commands that use them
    import numpy as np

    from .client import Client

TERMINAL = TERMINAL_NAMES

TRAIN = TRAIN_DEFAULTS


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dcf", description="dcf: distributed matrix multiplication and "
                                "training on a pool of machines.")
    config.add_options(p, config.CLIENT_OPTIONS)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_submit(sub)
    _add_job_commands(sub)
    _add_local_commands(sub)
    return p


Subparsers = Any  # argparse's _SubParsersAction


def _add_submit(sub: Subparsers) -> None:
    s = sub.add_parser("submit", help="submit a job")
    kinds = s.add_subparsers(dest="task", required=True, metavar="TASK")
    m = kinds.add_parser("matmul", help="C = A @ B over the providers")
    m.add_argument("--a", help="A as a .npy file")
    m.add_argument("--b", help="B as a .npy file")
    m.add_argument("--size", type=int, help="random square operands of this size instead of files")
    m.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", help="write C here (.npy)")
    m.add_argument("--nodes", type=int, help="use at most this many providers")
    m.add_argument("--no-wait", action="store_true", help="print the job id and return")
    m.add_argument("--check", action="store_true", help="compare the result with numpy locally")
    _add_train(kinds)
    pr = kinds.add_parser("predict", help="inference across providers with a trained model")
    pr.add_argument("--model", required=True, help="model.pt written by `dcf submit train` (model.json beside it)")
    pr.add_argument("--data", required=True, help="samples as a .npy file")
    pr.add_argument("-o", "--output", required=True, help="predicted classes (.npy, int64, input order)")
    pr.add_argument("--nodes", type=int)


def _add_train(kinds: Subparsers) -> None:
    t = kinds.add_parser("train", help="data-parallel training of a registry model")
    t.add_argument("--model", default=TRAIN["model"], help="logreg, mlp, cnn or a plugin model")
    t.add_argument("--model-args", default="{}", help="model arguments as JSON, e.g. '{\"hidden\": [64]}'")
    t.add_argument("--dataset", default="digits", help="digits or synthetic")
    t.add_argument("--dataset-file", help="a .npz with X, y (and optionally X_test, y_test)")
    t.add_argument("--synthetic-size", type=int, default=2000)
    t.add_argument("--synthetic-features", type=int, default=20)
    t.add_argument("--synthetic-classes", type=int, default=4)
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--momentum", float),
                       ("--weight-decay", float), ("--lr-step", int), ("--gamma", float), ("--seed", int),
                       ("--max-staleness", int), ("--local-steps", int), ("--checkpoint-every", int)):
        t.add_argument(flag, type=kind, default=TRAIN[flag[2:].replace("-", "_")])
    t.add_argument("--optimizer", default=TRAIN["optimizer"], help="sgd, adam or adadelta")
    t.add_argument("--schedule", default=TRAIN["schedule"],
                   help="none, step (lr x gamma every --lr-step epochs) or cosine")
    t.add_argument("--sync", default=TRAIN["sync"], help="sync (default), async or local-sgd")
    t.add_argument("--nodes", type=int)
    t.add_argument("-o", "--output", default="model.pt", help="model file; its metadata goes beside it (.json)")
    t.add_argument("--no-wait", action="store_true")


def _add_job_commands(sub: Subparsers) -> None:
    for name, help_ in (("status", "show a job"), ("cancel", "cancel a job"), ("delete", "delete a job")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("job_id")
        if name == "status":
            c.add_argument("--wait", action="store_true", help="follow the job until it ends")
    r = sub.add_parser("result", help="download a finished job's result")
    r.add_argument("job_id")
    r.add_argument("-o", "--output", required=True, help="output .npy file")
    r.add_argument("--name", help="which output (default: the first)")
    j = sub.add_parser("jobs", help="list jobs")
    j.add_argument("--state", choices=STATE_NAMES)
    j.add_argument("--limit", type=int, default=50)
    sub.add_parser("nodes", help="list providers")


def _add_local_commands(sub: Subparsers) -> None:
    up = sub.add_parser("up", help="run a head and N local providers in the foreground (Ctrl-C stops)")
    up.add_argument("--providers", type=int, default=2)
    up.add_argument("--http-port", type=int, default=config.option(config.HEAD_OPTIONS, "http_port").default)
    up.add_argument("--state-dir", default=None, help="default: a temporary directory")
    up.add_argument("--amqp-url", default=config.option(config.HEAD_OPTIONS, "amqp_url").default,
                    help="RabbitMQ URL (default: embedded store)")
    up.add_argument("--curve", action="store_true", help="CURVE keys for the head and each provider "
                    "(generated in the state dir)")
    keys_cli.add_parser(sub)
    d = sub.add_parser("demo", help="start a local head + providers, multiply, check, report, stop")
    d.add_argument("--providers", type=int, default=2)
    d.add_argument("--size", type=int, default=2048)
    d.add_argument("--dtype", choices=("float32", "float64"), default="float64")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.settings = config.ClientSettings.from_namespace(args)  # checked before any command runs
        return COMMANDS[args.command](args)
    except HeadUnreachable as exc:
        return _fail(exc.message, 3)
    except TaskError as exc:
        return _fail(exc.message, 1)
    except DcfError as exc:
        return _fail(exc.message, 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"dcf: error: {message}", file=sys.stderr)
    return code


def _client(args: argparse.Namespace) -> Client:
    from .client import Client

    client = Client(settings=args.settings)
    told: list[bool] = []

    def waiting(message: str, left: float) -> None:
        if not told:  # once: the wait ends in an accepted job or in exit code 3
            print(f"dcf: {message}; waiting up to {left:.0f}s more for the head to take the job "
                  "(--queue-wait; Ctrl-C gives up)", file=sys.stderr, flush=True)
            told.append(True)

    client.on_queue_wait = waiting
    return client


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    print(json.dumps(obj, indent=2, default=str) if args.json else text)


# ---- progress ------------------------------------------------------------------------------
class Bars:
    """tqdm bars on stderr for upload, compute and download; silent when --json or not a TTY."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def bytes(self, name: str, total_hint: int = 0) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            bar = self._bar(name, total or total_hint, unit="B", unit_scale=True)
            if bar is not None:
                bar.update(done - bar.n)
        return update

    def _bar(self, name: str, total: int, **kw: Any) -> Any:
        if not self.enabled:
            return None
        if name not in self.bars:
            from tqdm import tqdm

            self.bars[name] = tqdm(total=total, desc=f"{name:<9}", file=sys.stderr, leave=True,
                                   dynamic_ncols=True, **kw)
        bar = self.bars[name]
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        return bar

    def job(self, view: dict[str, Any]) -> None:
        prog = view["progress"]
        bar = self._bar("compute", prog["total"], unit="subtask")
        if bar is None:
            return
        bar.update(prog["done"] - bar.n)
        waiting = view.get("waiting") if view["state"] in ACTIVE_NAMES else None
        bar.set_postfix_str(waiting or view["state"], refresh=True)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def _follow(client: Client, job_id: str, bars: Bars) -> dict[str, Any]:
    """Wait for the job with a live compute bar (polls every 0.25 s)."""
    told = False
    while True:
        view = client.status(job_id, wait=0.25)
        bars.job(view)
        if view.get("waiting") and not bars.enabled and not told:
            print(f"dcf: job {job_id} {view['waiting']}", file=sys.stderr)
            told = True
        if view["state"] in TERMINAL:
            return view


# ---- commands ------------------------------------------------------------------------------
def cmd_submit(args: argparse.Namespace) -> int:
    if args.task == "train":
        from .train_cli import submit_train

        return submit_train(args, _client(args), _emit)
    if args.task == "predict":
        from .train_cli import submit_predict

        return submit_predict(args, _client(args), _emit)
    return submit_matmul(args)


def submit_matmul(args: argparse.Namespace) -> int:
    a, b = _operands(args)
    bars = Bars(not args.json and sys.stderr.isatty())
    with _client(args) as client:
        t0 = time.perf_counter()
        try:
            up = bars.bytes("upload", a.nbytes + b.nbytes)
            sent = [0]

            def both(done: int, total: int) -> None:
                up(sent[0] + done, a.nbytes + b.nbytes)
            blob_a = client.upload(a, both)["blob_id"]
            sent[0] = a.nbytes
            blob_b = client.upload(b, both)["blob_id"]
            job_id = client.submit("matmul", {"a": blob_a, "b": blob_b}, nodes=args.nodes)
            if args.no_wait:
                bars.close()
                _emit(args, {"job_id": job_id, "state": JobState.QUEUED.value}, job_id)
                return 0
            view = _follow(client, job_id, bars)
            if view["state"] != JobState.DONE:
                bars.close()
                raise TaskError(f"job {job_id} {view['state']}: {view.get('error') or ''}")
            c = client.result(job_id, out=args.output, progress=bars.bytes("download"))
        finally:
            bars.close()
        elapsed = time.perf_counter() - t0
    report = _report(job_id, view, a, b, c, elapsed, args.check)
    text = _report_text(report) + (f"\nwrote {args.output}" if args.output else "")
    _emit(args, report, text)
    return 0 if report.get("check", True) is not False else 1


def _operands(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    from .arrays import load_npy

    if args.size is not None:
        if args.a or args.b:
            raise ConfigError("give either --a/--b files or --size, not both")
        if args.size < 1:
            raise ConfigError("--size must be positive")
        rng = np.random.default_rng(args.seed)
        dtype = np.dtype(args.dtype)
        return (rng.standard_normal((args.size, args.size), dtype=dtype),
                rng.standard_normal((args.size, args.size), dtype=dtype))
    if not (args.a and args.b):
        raise ConfigError("matmul needs --a A.npy and --b B.npy, or --size N")
    a, b = load_npy(args.a), load_npy(args.b)
    for name, arr in (("A", a), ("B", b)):
        if arr.ndim != 2:
            raise ValidationError(f"{name} must be 2-D, got shape {list(arr.shape)}")
    if a.shape[1] != b.shape[0]:
        raise ValidationError(f"shape mismatch: A is {list(a.shape)}, B is {list(b.shape)} "
                              f"({a.shape[1]} != {b.shape[0]})")
    for name, arr in (("A", a), ("B", b)):
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            print(f"dcf: warning: {name} holds {bad} NaN/Inf values; the result will too", file=sys.stderr)
    if a.dtype != b.dtype:
        common = np.result_type(a, b)
        a, b = a.astype(common), b.astype(common)
    return a, b


def _report(job_id: str, view: dict[str, Any], a: np.ndarray, b: np.ndarray, c: np.ndarray,
            elapsed: float, check: bool) -> dict[str, Any]:
    import numpy as np

    flops = 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
    report: dict[str, Any] = {
        "job_id": job_id, "state": view["state"], "shape": list(c.shape), "dtype": c.dtype.name,
        "seconds": round(elapsed, 4), "gflops": round(flops / elapsed / 1e9, 2),
        "shares": view.get("shares", {}), "result_nonfinite": view.get("stats", {}).get("result_nonfinite", 0),
    }
    if check:
        ref = np.matmul(a, b)
        tol = 1e-3 if c.dtype == np.float32 else 1e-9
        err = float(np.max(np.abs(c - ref)) / max(1.0, float(np.max(np.abs(ref)))))
        report["check"] = bool(np.allclose(c, ref, rtol=tol, atol=tol * max(1.0, float(np.max(np.abs(ref))))))
        report["max_rel_error"] = err
    return report


def _report_text(r: dict[str, Any]) -> str:
    lines = [f"job {r['job_id']}: {r['state']}, C {r['shape'][0]}x{r['shape'][1]} {r['dtype']}",
             f"time {r['seconds']:.3f} s, {r['gflops']:.1f} GFLOP/s"]
    for name, share in sorted(r["shares"].items()):
        lines.append(f"  provider {name}: {share * 100:.1f}% of the rows")
    if r.get("result_nonfinite"):
        lines.append(f"note: the result holds {r['result_nonfinite']} NaN/Inf values")
    if "check" in r:
        lines.append(f"check against numpy: {'OK' if r['check'] else 'MISMATCH'} "
                     f"(max relative error {r['max_rel_error']:.2e})")
    return "\n".join(lines)


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.wait:
            bars = Bars(not args.json and sys.stderr.isatty())
            try:
                view = _follow(client, args.job_id, bars)
            finally:
                bars.close()
        else:
            view = client.status(args.job_id)
    prog = view["progress"]
    text = f"{view['job_id']}  {view['type']}  {view['state']}  {prog['done']}/{prog['total']} subtasks"
    if view.get("waiting") and view["state"] in ACTIVE_NAMES:
        text += f"\n  {view['waiting']}"
    if view.get("error"):
        text += f"\n  error: {view['error']}"
    for name, share in sorted(view.get("shares", {}).items()):
        text += f"\n  {name}: {share * 100:.1f}%"
    _emit(args, view, text)
    return 0


def cmd_result(args: argparse.Namespace) -> int:
    bars = Bars(not args.json and sys.stderr.isatty())
    with _client(args) as client:
        try:
            c = client.result(args.job_id, name=args.name, out=args.output, progress=bars.bytes("download"))
        finally:
            bars.close()
    _emit(args, {"job_id": args.job_id, "output": args.output, "shape": list(c.shape), "dtype": c.dtype.name},
          f"wrote {args.output} ({c.shape[0]}x{c.shape[1]} {c.dtype.name})" if c.ndim == 2
          else f"wrote {args.output}")
    return 0


def _warn_if_queue_down(client: Client) -> None:
    try:
        down = client.health().get("queue_connected") is False
    except DcfError:  # a hint only: never turn an answered command into a failure
        return
    if down:
        print("dcf: the head's job queue (RabbitMQ) is unreachable; the head is reconnecting: running jobs go "
              "on, new submissions wait (--queue-wait)", file=sys.stderr)


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        jobs = client.jobs(args.state, args.limit)
        _warn_if_queue_down(client)
    rows = [(j["job_id"], j["type"], j["state"], f"{j['progress']['done']}/{j['progress']['total']}",
             time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j["created_at"]))) for j in jobs]
    _emit(args, jobs, _table(("JOB", "TYPE", "STATE", "PROGRESS", "CREATED"), rows))
    return 0


def cmd_nodes(args: argparse.Namespace) -> int:
    with _client(args) as client:
        nodes = client.nodes()
        _warn_if_queue_down(client)
    rows = [(n["name"], n["provider_id"][:8], n["state"], n["device"], n["device_name"][:28],
             f"{n['gflops']:.1f}", f"{n['memory_bytes'] / 2**30:.1f}", str(n["cores"]), str(n["assigned"]),
             str(n["subtasks_done"]), f"{n['last_heartbeat_s']:.1f}s") for n in nodes]
    header = ("NAME", "ID", "STATE", "DEVICE", "DEVICE NAME", "GFLOP/S", "MEM GiB", "CORES", "ASSIGNED",
              "DONE", "HEARTBEAT")
    _emit(args, nodes, _table(header, rows) if rows else "no providers connected")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        view = client.cancel(args.job_id)
    _emit(args, view, f"{view['job_id']} {view['state']}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with _client(args) as client:
        client.delete(args.job_id)
    _emit(args, {"job_id": args.job_id, "deleted": True}, f"deleted {args.job_id}")
    return 0


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=False)]
    lines = ["  ".join(str(x).ljust(w) for x, w in zip(row, widths, strict=False)).rstrip()
             for row in (header, *rows)]
    return "\n".join(lines)


def cmd_up(args: argparse.Namespace) -> int:
    from .local import LocalCluster

    cluster = LocalCluster(args.providers, http_port=args.http_port, state_dir=args.state_dir,
                           amqp_url=args.amqp_url, quiet=False, curve=args.curve)
    cluster.start()
    print(f"dcf: head at {cluster.url} with {args.providers} providers; Ctrl-C stops them all", flush=True)
    try:
        while cluster.head is not None and cluster.head.poll() is None:
            time.sleep(0.5)
        return _fail("the head exited", 1)
    except KeyboardInterrupt:
        print("dcf: stopping", file=sys.stderr)
        return 0
    finally:
        cluster.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    import numpy as np

    from .client import Client
    from .local import LocalCluster

    print(f"dcf demo: starting a local head and {args.providers} providers (no Docker, no RabbitMQ)...")
    with LocalCluster(args.providers) as cluster, Client(cluster.url) as client:
        for n in client.nodes():
            print(f"  provider {n['name']}: {n['device']} {n['device_name']}, {n['gflops']:.1f} GFLOP/s")
        rng = np.random.default_rng(0)
        dtype = np.dtype(args.dtype)
        a = rng.standard_normal((args.size, args.size), dtype=dtype)
        b = rng.standard_normal((args.size, args.size), dtype=dtype)
        print(f"multiplying two {args.size}x{args.size} {args.dtype} matrices...")
        t0 = time.perf_counter()
        job_id = client.submit_matmul(a, b)
        view = client.wait(job_id)
        c = client.result(job_id)
        elapsed = time.perf_counter() - t0
        report = _report(job_id, view, a, b, c, elapsed, check=True)
        print(_report_text(report))
    print("stopped the local head and providers")
    return 0 if report["check"] else 1


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "result": cmd_result, "jobs": cmd_jobs,
            "nodes": cmd_nodes, "cancel": cmd_cancel, "delete": cmd_delete, "up": cmd_up, "demo": cmd_demo,
            "keys": lambda args: keys_cli.cmd_keys(args, _emit)}
