"""The ``dcf`` command line: submit jobs, follow them, fetch results, run a local cluster.

Options shared by every command (``--json`` and the client options of ``common.config.CLIENT_OPTIONS``:
``--head``, ``--token``, ``--queue-wait``, ``--reconnect-wait``, ``--shared-files``) go before or after
the command: ``dcf --json nodes`` and ``dcf nodes --json`` are the same. Plain ``dcf`` prints this
help (exit 0).

Exit codes: 0 ok (``dcf status``: the job is done, or still queued or running without ``--wait``);
1 the job failed or was cancelled (``submit``, ``status`` with or without ``--wait``, ``result``);
2 bad input or usage (also: a missing optional dependency, an ``-o`` that cannot be written);
3 the head is unreachable (a wait keeps reconnecting for ``--reconnect-wait`` seconds first);
130 interrupted (Ctrl-C; a job already accepted goes on); 141 stdout was closed (e.g. ``| head``) before the
answer, by a command with no other outcome (``dcf up``): an answer cut short keeps the command's own code.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from common import config
from common.errors import ConfigError, DcfError, HeadUnreachable, TaskError, ValidationError
from common.jobs import ACTIVE_NAMES, STATE_NAMES, TERMINAL_NAMES, JobState
from common.tasks.train.defaults import TRAIN_DEFAULTS

from . import keys_cli

if TYPE_CHECKING:  # numpy and the client (httpx) load only for the commands that use them
    import numpy as np

    from .client import Client
    from .local import LocalCluster

TERMINAL = TERMINAL_NAMES
#: states ``dcf status`` exits 1 for
UNSUCCESSFUL = frozenset({JobState.FAILED.value, JobState.CANCELLED.value})

TRAIN = TRAIN_DEFAULTS
#: signals that stop ``dcf up`` and ``dcf demo`` cleanly, as Ctrl-C does (SIGHUP: the terminal closed)
STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))
#: ``--size`` from which ``dcf submit matmul`` says that it is making the operands
SAY_MAKING_FROM = 1024


class Detached(Exception):  # noqa: N818 (not an error: the CLI stops following, the job goes on)
    """Ctrl-C while following an accepted job: the job goes on without the CLI."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


class Stopped(KeyboardInterrupt):
    """A stop signal (SIGTERM, SIGHUP) turned into a clean stop, as Ctrl-C is."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


# ---- parser ---------------------------------------------------------------------------------
class _Version(argparse.Action):
    """``--version``: the installed package's version (read only when asked: start-up time counts)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kw: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print dcf's version and exit")

    def __call__(self, parser: argparse.ArgumentParser, ns: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        print(f"dcf {version()}")
        parser.exit()


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("dcf")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from common import __version__

        return __version__


def _add_shared(p: argparse.ArgumentParser, default: Any) -> None:
    """The options every command takes; ``default`` SUPPRESS on the commands' copies, so that an option
    given before the command is not overwritten by the command's default."""
    config.add_options(p, config.CLIENT_OPTIONS, default=default)
    p.add_argument("--json", action="store_true", default=default if default is argparse.SUPPRESS else False,
                   help="print JSON instead of text")


def build_parser() -> argparse.ArgumentParser:
    shared = argparse.ArgumentParser(add_help=False)
    _add_shared(shared, argparse.SUPPRESS)
    p = argparse.ArgumentParser(prog="dcf", description="dcf: distributed matrix multiplication and "
                                "training on a pool of machines.", epilog="Exit codes: 0 ok, 1 the job failed "
                                "or was cancelled, 2 bad input, 3 head unreachable, 130 interrupted.")
    p.add_argument("--version", action=_Version)
    _add_shared(p, None)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_submit(sub, shared)
    _add_job_commands(sub, shared)
    _add_local_commands(sub, shared)
    return p


Subparsers = Any  # argparse's _SubParsersAction


def _add_submit(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    s = sub.add_parser("submit", help="submit a job", parents=[shared])
    kinds = s.add_subparsers(dest="task", required=True, metavar="TASK")
    m = kinds.add_parser("matmul", help="C = A @ B over the providers", parents=[shared])
    m.add_argument("--a", help="A as a .npy file")
    m.add_argument("--b", help="B as a .npy file")
    m.add_argument("--size", type=int, help="random square operands of this size instead of files "
                   "(standard normal, from --seed)")
    m.add_argument("--dtype", choices=("float32", "float64"), default="float64")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("-o", "--output", help="write C to exactly this file (.npy format)")
    m.add_argument("--nodes", type=int, help="use at most this many providers")
    m.add_argument("--no-wait", action="store_true", help="print the job id and return")
    m.add_argument("--check", action="store_true", help="compare the result with numpy locally")
    _add_train(kinds, shared)
    pr = kinds.add_parser("predict", help="inference across providers with a trained model", parents=[shared])
    pr.add_argument("--model", required=True, help="model.pt written by `dcf submit train` (model.json beside it)")
    pr.add_argument("--data", required=True, help="samples as a .npy file")
    pr.add_argument("-o", "--output", required=True, help="predicted classes (.npy format, int64, input order)")
    pr.add_argument("--nodes", type=int)


def _add_train(kinds: Subparsers, shared: argparse.ArgumentParser) -> None:
    t = kinds.add_parser("train", help="data-parallel training of a registry model", parents=[shared])
    t.add_argument("--model", default=TRAIN["model"], help="logreg, mlp, cnn or a plugin model")
    t.add_argument("--model-args", default="{}", help="model arguments as JSON, e.g. '{\"hidden\": [64]}'")
    t.add_argument("--dataset", default="digits",
                   help="digits (needs scikit-learn), synthetic, or provider:NAME (data the providers hold: "
                        "dcf-provider --data NAME=PATH.npz; nothing is uploaded)")
    t.add_argument("--dataset-file", help="a .npz with X, y (and optionally X_test, y_test)")
    t.add_argument("--synthetic-size", type=int, default=2000)
    t.add_argument("--synthetic-features", type=int, default=20)
    t.add_argument("--synthetic-classes", type=int, default=4)
    for flag, kind in (("--epochs", int), ("--batch-size", int), ("--lr", float), ("--momentum", float),
                       ("--weight-decay", float), ("--lr-step", int), ("--gamma", float), ("--seed", int),
                       ("--max-staleness", int), ("--local-steps", int), ("--checkpoint-every", int),
                       ("--round-steps", int), ("--collective-timeout", float)):
        t.add_argument(flag, type=kind, default=TRAIN[flag[2:].replace("-", "_")])
    t.add_argument("--optimizer", default=TRAIN["optimizer"], help="sgd, adam or adadelta")
    t.add_argument("--schedule", default=TRAIN["schedule"],
                   help="none, step (lr x gamma every --lr-step epochs) or cosine")
    t.add_argument("--sync", default=TRAIN["sync"],
                   help="sync (default: a parameter server), async, local-sgd or allreduce (the providers train as "
                        "one torch.distributed group, in rounds of --round-steps steps)")
    t.add_argument("--nodes", type=int)
    t.add_argument("--min-providers", type=int, default=TRAIN["min_providers"], metavar="K",
                   help="start barrier: wait until K eligible providers are ready before the first step")
    t.add_argument("--start-timeout", type=float, default=TRAIN["start_timeout"], metavar="S",
                   help=f"fail the job if the barrier is not met within S seconds (default "
                        f"{TRAIN['start_timeout']:g}, as torchrun's rendezvous; 0: wait forever)")
    t.add_argument("-o", "--output", default="model.pt", help="model file; its metadata goes beside it (.json)")
    t.add_argument("--no-wait", action="store_true")


def _add_job_commands(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    for name, help_ in (("status", "show a job (exit 1 when it failed or was cancelled)"),
                        ("cancel", "cancel a job"), ("delete", "delete a job")):
        c = sub.add_parser(name, help=help_, parents=[shared])
        c.add_argument("job_id")
        if name == "status":
            c.add_argument("--wait", action="store_true", help="follow the job until it ends")
    r = sub.add_parser("result", help="download a finished job's result", parents=[shared])
    r.add_argument("job_id")
    r.add_argument("-o", "--output", required=True, help="output file (written in .npy format, exactly there)")
    r.add_argument("--name", help="which output (default: the first)")
    j = sub.add_parser("jobs", help="list jobs", parents=[shared])
    j.add_argument("--state", choices=STATE_NAMES)
    j.add_argument("--limit", type=int, default=50)
    sub.add_parser("nodes", help="list providers", parents=[shared])
    cl = sub.add_parser("clear", help="trust a quarantined provider again (one caught sending a wrong result)",
                        parents=[shared])
    cl.add_argument("provider", help="its name, id, or the first 8 characters of its id (as `dcf nodes` shows)")


def _add_local_commands(sub: Subparsers, shared: argparse.ArgumentParser) -> None:
    up = sub.add_parser("up", help="run a head and N local providers in the foreground (Ctrl-C, SIGTERM or "
                        "SIGHUP stops them all)", parents=[shared])
    up.add_argument("--providers", type=int, default=2)
    up.add_argument("--http-port", type=int, default=config.option(config.HEAD_OPTIONS, "http_port").default)
    up.add_argument("--state-dir", default=None, help="default: a temporary directory")
    up.add_argument("--amqp-url", default=config.option(config.HEAD_OPTIONS, "amqp_url").default,
                    help="RabbitMQ URL (default: embedded store)")
    up.add_argument("--curve", action="store_true", help="CURVE keys for the head and each provider "
                    "(generated in the state dir)")
    keys_cli.add_parser(sub, shared)
    d = sub.add_parser("demo", help="start a local head + providers, multiply, check, report, stop",
                       parents=[shared])
    d.add_argument("--providers", type=int, default=2)
    d.add_argument("--size", type=int, default=2048)
    d.add_argument("--dtype", choices=("float32", "float64"), default="float64")


# ---- main ----------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        code = _run(args)
    except BrokenPipeError:  # stdout closed early outside the answer (`dcf up | head -1`): quietly, as `cat` does
        _stdout_to_devnull()
        return 141
    try:
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
    except BrokenPipeError:
        _stdout_to_devnull()
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        args.settings = config.ClientSettings.from_namespace(args)  # checked before any command runs
        return COMMANDS[args.command](args)
    except Detached as exc:
        print(f"dcf: job {exc.job_id} goes on; follow it with `dcf status {exc.job_id} --wait`", file=sys.stderr)
        return 130
    except HeadUnreachable as exc:
        return _fail(exc.message, 3)
    except TaskError as exc:
        return _fail(exc.message, 1)
    except DcfError as exc:
        return _fail(exc.message, 2)
    except Stopped as exc:
        return _fail("stopped", 128 + exc.signum)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


def _fail(message: str, code: int) -> int:
    print(f"dcf: error: {message}", file=sys.stderr)
    return code


def say(message: str) -> None:
    """One line on stderr, above any progress bar."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        tqdm.tqdm.write(f"dcf: {message}", file=sys.stderr)
    else:
        print(f"dcf: {message}", file=sys.stderr, flush=True)


def _client(args: argparse.Namespace) -> Client:
    from .client import Client

    client = Client(settings=args.settings)
    told: set[str] = set()

    def waiting(message: str, left: float) -> None:
        if "queue" not in told:  # once: the wait ends in an accepted job or in exit code 3
            say(f"{message}; waiting up to {left:.0f}s more for the head to take the job "
                 "(--queue-wait; Ctrl-C gives up)")
            told.add("queue")

    def reconnecting(message: str, left: float) -> None:
        if "head" not in told:  # once: the wait ends when the head is back, or in exit code 3
            say(f"{message}; reconnecting for up to {left:.0f}s (--reconnect-wait; Ctrl-C gives up)")
            told.add("head")

    def reconnected(away: float) -> None:
        say(f"reconnected to the head after {away:.1f}s")

    client.on_queue_wait = waiting
    client.on_reconnect = reconnecting
    client.on_reconnected = reconnected
    return client


def _emit(args: argparse.Namespace, obj: Any, text: str) -> None:
    """The command's answer on stdout. A reader that closed the pipe early (`dcf --json status J | head -c1`)
    does not change the exit code: the rest of the answer goes nowhere, and the command ends as it would."""
    try:
        print(json.dumps(obj, indent=2, default=str) if args.json else text, flush=True)
    except BrokenPipeError:
        _stdout_to_devnull()


def _stdout_to_devnull() -> None:
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


@contextmanager
def following(job_id: str, *, announce: bool = False) -> Iterator[None]:
    """Ctrl-C while following an accepted job detaches from it (exit 130): the job goes on.
    ``announce`` says "job J accepted" on stderr (stdout is for the final answer) once Ctrl-C already
    detaches: whoever reads that line and interrupts gets "job J goes on", never a bare "interrupted"."""
    try:
        if announce:
            say(f"job {job_id} accepted")
        yield
    except KeyboardInterrupt as exc:
        if isinstance(exc, Stopped):
            raise
        raise Detached(job_id) from None


# ---- progress ------------------------------------------------------------------------------
#: a byte bar whose bytes all came in one piece: a rate over no time would read e.g. 638GB/s
NO_RATE = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}B/{total_fmt}B"


class Bars:
    """tqdm bars on stderr for upload, compute and download; silent when --json or not a TTY.

    Byte bars show the average rate (``smoothing=0``: the live rate is the one the bar ends with); a bar
    starts with the first bytes moved, one whose bytes all came at once shows no rate, and a result
    read from the head's shared state dir (no bytes moved) shows none."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.bars: dict[str, Any] = {}

    def bytes(self, name: str, total_hint: int = 0) -> Callable[[int, int], None]:
        def update(done: int, total: int) -> None:
            total = total or total_hint
            kw: dict[str, Any] = {"unit": "B", "unit_scale": True}
            if name not in self.bars and total and done >= total:  # all at once (inline, small): no rate
                kw["bar_format"] = NO_RATE
            bar = self._bar(name, total, **kw)
            if bar is not None and not bar.disable:
                bar.update(done - bar.n)
                if total and done >= total:
                    self.finish(name)
        return update

    def finish(self, name: str) -> None:
        """Close a bar as its work ends: tqdm's final rate is over the time until ``close``, so a bar left
        open while the next step runs would end with a lower rate than it showed."""
        bar = self.bars.get(name)
        if bar is not None and not bar.disable:
            bar.close()

    def _bar(self, name: str, total: int, **kw: Any) -> Any:
        if not self.enabled:
            return None
        if name not in self.bars:
            from tqdm import tqdm

            self.bars[name] = tqdm(total=total, desc=f"{name:<9}", file=sys.stderr, leave=True,
                                   dynamic_ncols=True, smoothing=0, **kw)
        bar = self.bars[name]
        if total and bar.total != total:
            bar.total = total
            bar.refresh()
        return bar

    def job(self, view: dict[str, Any]) -> None:
        prog = view["progress"]
        bar = self._bar("compute", prog["total"], unit=f" {progress_unit(prog)}")
        if bar is None:
            return
        if bar.disable:  # closed: the job ended
            return
        bar.unit = f" {progress_unit(prog)}"  # a queued job's view does not know it yet
        bar.update(prog["done"] - bar.n)
        waiting = view.get("waiting") if view["state"] in ACTIVE_NAMES else None
        bar.set_postfix_str(waiting or view["state"], refresh=True)
        if view["state"] in TERMINAL:
            self.finish("compute")

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()
        self.bars.clear()


def progress_unit(prog: dict[str, Any]) -> str:
    """What a job's progress counts (the head's ``unit``: rows, steps, ...; subtasks when it says none)."""
    return str(prog.get("unit") or "subtasks")


def _follow(client: Client, job_id: str, bars: Bars) -> dict[str, Any]:
    """Wait for the job with a live compute bar (polls every 0.25 s); a head that restarts meanwhile
    is ridden out (``--reconnect-wait``)."""
    told = False
    with following(job_id):
        while True:
            view = client.watch(job_id, wait=0.25)
            bars.job(view)
            if view.get("waiting") and not bars.enabled and not told:
                say(f"job {job_id} {view['waiting']}")
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
    from .paths import check_output

    if args.output:
        check_output(args.output)
    a, b = _operands(args)
    bars = Bars(not args.json and sys.stderr.isatty())
    with _client(args) as client:
        t0 = time.perf_counter()
        try:
            job_id = _upload_and_submit(client, a, b, args.nodes, bars)
            if args.no_wait:
                bars.close()
                _emit(args, {"job_id": job_id, "state": JobState.QUEUED.value}, job_id)
                return 0
            with following(job_id, announce=not args.json):
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


def _upload_and_submit(client: Client, a: np.ndarray, b: np.ndarray, nodes: int | None, bars: Bars) -> str:
    total = a.nbytes + b.nbytes
    up = bars.bytes("upload", total)
    up(0, total)  # the bar's clock starts now, not after the first chunk: its rate is the true average

    def part(before: int, arr: np.ndarray) -> Callable[[int, int], None]:
        """One operand's upload (its .npy header included) as its share of the operands' bytes: the bar
        never passes its total (tqdm then drops the total from the bar)."""
        def update(done: int, size: int) -> None:
            up(before + (arr.nbytes * done // size if size else 0), total)
        return update
    blob_a = client.upload(a, part(0, a))["blob_id"]
    blob_b = client.upload(b, part(a.nbytes, b))["blob_id"]
    return client.submit("matmul", {"a": blob_a, "b": blob_b}, nodes=nodes)


def random_operands(size: int, dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``dcf demo``'s two random ``size`` x ``size`` matrices, uniform in [-1, 1): ``Generator.random``
    is ~8x faster than ``standard_normal`` (6000x6000 float64: 0.3 s against 2.7 s on the project's
    machine). (``dcf submit matmul --size`` keeps standard normal operands: its ``--seed`` names them.)"""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        m = rng.random((size, size), dtype=np.dtype(dtype))
        m *= 2
        m -= 1
        out.append(m)
    return out[0], out[1]


def _operands(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    import numpy as np

    from .arrays import load_npy

    if args.size is not None:
        if args.a or args.b:
            raise ConfigError("give either --a/--b files or --size, not both")
        if args.size < 1:
            raise ConfigError("--size must be positive")
        if args.size >= SAY_MAKING_FROM and not args.json:
            say(f"making two {args.size}x{args.size} {args.dtype} matrices...")
        rng = np.random.default_rng(args.seed)  # standard normal: `--size N --seed S` names these operands
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
             f"time {r['seconds']:.3f} s (upload, compute and download), {r['gflops']:.1f} GFLOP/s"]
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
    _emit(args, view, status_text(view))
    return 1 if view["state"] in UNSUCCESSFUL else 0


def status_text(view: dict[str, Any], now: float | None = None) -> str:
    """``dcf status``'s text: the job, its progress, what it waits for, training metrics, errors, shares."""
    prog = view["progress"]
    text = (f"{view['job_id']}  {view['type']}  {view['state']}  "
            f"{prog['done']}/{prog['total']} {progress_unit(prog)}")
    if view.get("waiting") and view["state"] in ACTIVE_NAMES:
        text += f"\n  {view['waiting']}"
    training = training_line(view, time.time() if now is None else now)
    if training:
        text += f"\n  {training}"
    if view.get("error"):
        text += f"\n  error: {view['error']}"
    for name, share in sorted(view.get("shares", {}).items()):
        text += f"\n  {name}: {share * 100:.1f}%"
    return text


def training_line(view: dict[str, Any], now: float) -> str:
    """``epoch 2/20, step 50/500, loss 0.4213, accuracy 0.912, 8100 samples/s, 3.1 s elapsed`` for a
    training job that reported metrics (``stats.training``), else ``""``."""
    training = (view.get("stats") or {}).get("training") or {}
    last = training.get("last") or {}
    if not last:
        return ""
    epochs = (view.get("params") or {}).get("epochs", TRAIN["epochs"])
    parts = [f"epoch {last.get('epoch', training.get('epoch', 0))}/{epochs}"]
    step, total = training.get("step", last.get("step")), training.get("total_steps")
    if step is not None:
        parts.append(f"step {step}/{total}" if total else f"step {step}")
    if last.get("loss") is not None:
        parts.append(f"loss {last['loss']:.4f}")
    if last.get("accuracy") is not None:
        parts.append(f"accuracy {last['accuracy']:.3f}")
    if last.get("samples_per_s"):
        parts.append(f"{last['samples_per_s']:.0f} samples/s")
    started = view.get("started_at")
    if started:
        parts.append(f"{max(0.0, (view.get('finished_at') or now) - started):.1f} s elapsed")
    return "training: " + ", ".join(parts)


def cmd_result(args: argparse.Namespace) -> int:
    from .paths import check_output

    check_output(args.output)
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
    for n in nodes:
        if n.get("quarantined") and not args.json:
            print(f"{n['name']} ({n['provider_id'][:8]}) is quarantined: {n['quarantined']}; "
                  f"`dcf clear {n['provider_id'][:8]}` trusts it again", file=sys.stderr)
    return 0


def cmd_clear(args: argparse.Namespace) -> int:
    with _client(args) as client:
        named = [n["provider_id"] for n in client.nodes() if n["name"] == args.provider]
        if len(named) > 1:
            raise ValidationError(f"{len(named)} providers are named {args.provider!r}: give its id")
        view = client.clear_quarantine(named[0] if named else args.provider)
    _emit(args, view, f"{view['name']} ({view['provider_id'][:8]}) {view['state']}: it gets work again")
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


# ---- local clusters --------------------------------------------------------------------------
def _raise_stopped(signum: int, frame: object) -> None:
    _ignore_stops()  # a second signal must not cut the stop short
    raise Stopped(signum)


def _ignore_stops() -> None:
    for sig in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(sig, signal.SIG_IGN)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP stop what the block starts, as Ctrl-C does (they raise ``Stopped``, a
    KeyboardInterrupt); the block's own clean-up (its ``finally``) runs with them and Ctrl-C ignored,
    and the handlers there were before are put back after it."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, *STOP_SIGNALS)}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_stopped)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def cmd_up(args: argparse.Namespace) -> int:
    from .local import LocalCluster

    cluster = LocalCluster(args.providers, http_port=args.http_port, state_dir=args.state_dir,
                           amqp_url=args.amqp_url, quiet=False, curve=args.curve)
    with stop_signals():
        return _run_up(cluster, args.providers)


def _run_up(cluster: LocalCluster, providers: int) -> int:
    try:
        cluster.start()
        print(f"dcf: head at {cluster.url} with {providers} providers; Ctrl-C stops them all", flush=True)
        while cluster.head is not None and cluster.head.poll() is None:
            time.sleep(0.5)
        return _fail("the head exited", 1)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP
        print("dcf: stopping", file=sys.stderr)
        return 0
    finally:
        _ignore_stops()
        cluster.stop()


def cmd_demo(args: argparse.Namespace) -> int:
    with stop_signals():
        return _run_demo(args)


def _run_demo(args: argparse.Namespace) -> int:
    from .client import Client
    from .local import LocalCluster

    print(f"dcf demo: starting a local head and {args.providers} providers (no Docker, no RabbitMQ)...",
          flush=True)
    cluster = LocalCluster(args.providers)
    try:
        cluster.start()
        with Client(cluster.url) as client:
            for n in client.nodes():
                print(f"  provider {n['name']}: {n['device']} {n['device_name']}, {n['gflops']:.1f} GFLOP/s")
            a, b = random_operands(args.size, args.dtype, 0)
            print(f"multiplying two {args.size}x{args.size} {args.dtype} matrices...", flush=True)
            t0 = time.perf_counter()
            job_id = client.submit_matmul(a, b)
            view = client.wait(job_id)
            c = client.result(job_id)
            elapsed = time.perf_counter() - t0
            report = _report(job_id, view, a, b, c, elapsed, check=True)
            print(_report_text(report))
    finally:
        _ignore_stops()
        cluster.stop()
    print("stopped the local head and providers")
    return 0 if report["check"] else 1


COMMANDS = {"submit": cmd_submit, "status": cmd_status, "result": cmd_result, "jobs": cmd_jobs,
            "nodes": cmd_nodes, "clear": cmd_clear, "cancel": cmd_cancel, "delete": cmd_delete, "up": cmd_up,
            "demo": cmd_demo,
            "keys": lambda args: keys_cli.cmd_keys(args, _emit)}
