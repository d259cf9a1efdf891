#!/usr/bin/env python3
"""Soak: the chaos suite's faults, in a loop, for N minutes; then the same figures as the suite.

    .venv/bin/python bench/soak.py [--minutes 10] [--seed S] [--amqp-url amqp://guest:guest@127.0.0.1:5672/]
                                   [--broker-faults] [--no-slow-link] [--figures soak.json]
                                   [--state-dir DIR]

One long-lived local cluster (embedded store, or RabbitMQ with --amqp-url) with 3 providers, one of them
behind a slow link (tests/chaos/harness.py SlowLink: 20 MB/s, 30 ms, arrays over the wire). Each round
picks a fault at random (seeded):
  provider-kill   kill -9 a provider while 2 matmul jobs are out; start a replacement; time the detection
  head-kill       kill -9 the head right after submit, while subtasks are out, while results arrive, or
                  during the recovery of a job; restart it on the same state dir and ports
  join-leave      a provider joins, or one leaves cleanly (SIGTERM); the next job's shares must follow
  training-kill   kill -9 a provider during a sync training job; parameters vs single process (needs torch)
  broker-outage   rabbitmqctl stop_app mid-job, a submission must be refused (503), start_app, reconnect
                  (only with --amqp-url and --broker-faults; the broker is always started again)
Every accepted job must complete with the right result, be listed once and have one job.done event
(followed across head restarts on /v1/stream); finished jobs are deleted to bound the disk used.
Exit code 0 if no job was lost, no result was wrong and no round failed. Not run by CI.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import random
import sys
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common.errors import DcfError, HeadUnreachable, NotFound  # noqa: E402
from tests.chaos.harness import (  # noqa: E402
    EventWatcher,
    Figures,
    MatmulJob,
    SlowLink,
    broker_running,
    broker_start,
    broker_stop,
    check_matmul,
    kill_provider,
    live_providers,
    management_problem,
    measure_detection,
    node,
    private_vhost,
    provider_name,
    rabbitmqctl_problem,
    submit_matmul,
    wait_for,
)
from tests.conftest import AMQP_URL  # noqa: E402
from user_client import Client  # noqa: E402
from user_client.local import LocalCluster  # noqa: E402

PROVIDERS = 3
DELAY = 0.25


class Soak:
    def __init__(self, cl: LocalCluster, c: Client, rng: random.Random, figures: Figures,
                 heartbeat: float, link: SlowLink | None) -> None:
        self.cl, self.c, self.rng, self.figures = cl, c, rng, figures
        self.nprng = np.random.default_rng(rng.randrange(2**32))
        self.heartbeat = heartbeat
        self.link = link
        self.slow: set[int] = set()  # providers behind the slow link: never killed, so the link stays
        self.accepted: list[str] = []
        self.deleted: set[str] = set()
        self.failures: Counter[str] = Counter()
        self.reference: dict[str, Any] | None = None

    # ---- cluster upkeep -------------------------------------------------------------------------
    def start(self) -> None:
        for _ in range(PROVIDERS - (1 if self.link else 0)):
            self.cl.add_provider("--delay", str(DELAY))
        if self.link is not None:
            self.slow.add(len(self.cl.providers))
            self.cl.add_provider("--delay", str(DELAY), *self.link.provider_args(), "--shared-files", "off")
        self.cl.wait_ready(PROVIDERS)

    def members(self) -> list[int]:
        """Running providers the head lists as ready, the slow-link one excepted."""
        ready = {n["name"] for n in self.c.nodes() if n["state"] == "ready"}
        return [i for i in live_providers(self.cl) if provider_name(i) in ready and i not in self.slow]

    def heal(self) -> None:
        """After a failed round: the broker runs, the head runs and takes jobs, PROVIDERS providers are ready."""
        if self.cl.amqp_url and rabbitmqctl_problem() is None and not broker_running():
            broker_start()
        if self.cl.head is None or self.cl.head.poll() is not None:
            self.cl.start_head()
        if self.cl.amqp_url:
            self.finish(self.accepting())
        with contextlib.suppress(DcfError, AssertionError):
            wait_for(lambda: len(self.members()) + len(self.slow) >= PROVIDERS, 10, "providers")
        missing = PROVIDERS - len(self.members()) - len([i for i in self.slow if i in live_providers(self.cl)])
        for _ in range(max(0, missing)):
            self.cl.add_provider("--delay", str(DELAY))
        self.cl.wait_ready(PROVIDERS, timeout=60)

    def accepting(self, timeout: float = 60.0) -> MatmulJob:
        """Submit until the head accepts a job again (after a broker outage it reconnects on its own)."""
        got: list[MatmulJob] = []

        def submit() -> bool:
            with contextlib.suppress(HeadUnreachable):
                got.append(self.job(50))
            return bool(got)
        wait_for(submit, timeout, "the head to accept jobs again", poll=0.2)
        return got[0]

    def job(self, n: int | None = None) -> MatmulJob:
        job = submit_matmul(self.c, self.nprng, n or self.rng.randint(100, 300))
        self.accepted.append(job.job_id)
        return job

    def finish(self, job: MatmulJob) -> dict[str, Any]:
        view = check_matmul(self.c, job, self.figures, timeout=120)
        listed = [j for j in self.c.jobs(limit=10_000) if j["job_id"] == job.job_id]
        assert len(listed) == 1, f"job {job.job_id} listed {len(listed)} times"
        self.c.delete(job.job_id)
        self.deleted.add(job.job_id)
        return view

    # ---- faults ---------------------------------------------------------------------------------
    def provider_kill(self) -> None:
        jobs = [self.job() for _ in range(2)]
        wait_for(lambda: self.c.status(jobs[0].job_id)["state"] != "queued", 30, "the job to start")
        time.sleep(self.rng.uniform(0.0, DELAY))
        victim = self.rng.choice(self.members())
        t_kill = kill_provider(self.cl, victim)
        self.figures.fault("provider kill -9 (matmul)")
        self.cl.add_provider("--delay", str(DELAY))
        measure_detection(self.c, provider_name(victim), t_kill, self.heartbeat, self.figures)
        for job in jobs:
            self.finish(job)
        self.cl.wait_ready(PROVIDERS, timeout=60)

    def head_kill(self) -> None:
        phase = self.rng.choice(["after_submit", "subtasks_out", "results_arrive", "during_recovery"])
        job = self.job()
        if phase in ("subtasks_out", "results_arrive"):
            key = "state" if phase == "subtasks_out" else "progress"
            wait_for(lambda: (self.c.status(job.job_id)["state"] == "running" if key == "state"
                              else self.c.status(job.job_id)["progress"]["done"] >= 1), 30, phase)
            time.sleep(self.rng.uniform(0.0, 0.1))
        self.cl.kill_head()
        self.figures.fault(f"head kill -9 ({phase})")
        if phase == "during_recovery":
            self.cl.start_head()
            time.sleep(self.rng.uniform(0.0, 0.5))
            self.cl.kill_head()
            self.figures.fault(f"head kill -9 ({phase})")
        t0 = time.monotonic()
        self.cl.start_head()
        self.cl.wait_ready(PROVIDERS, timeout=60)
        self.figures.timing("head restart to providers ready", time.monotonic() - t0)
        self.finish(job)

    def join_leave(self) -> None:
        members = self.members()
        during = self.job()
        wait_for(lambda: self.c.status(during.job_id)["state"] != "queued", 30, "the job to start")
        if len(members) <= 2 or self.rng.random() < 0.5:
            name = provider_name(len(self.cl.providers))
            self.cl.add_provider("--delay", str(DELAY))
            self.figures.fault("provider join (matmul)")
            self.finish(during)
            wait_for(lambda: (node(self.c, name) or {}).get("state") == "ready", 60, f"{name} to be ready")
            change = "join"
        else:
            index = self.rng.choice(members)
            name = provider_name(index)
            self.cl.providers[index].terminate()
            self.figures.fault("provider leave (matmul)")
            self.finish(during)
            wait_for(lambda: node(self.c, name) is None, 30, f"{name} to leave")
            change = "leave"
        ready = {n["name"] for n in self.c.nodes() if n["state"] == "ready"}
        view = self.finish(self.job())
        assert set(view["shares"]) == ready, f"after the {change} of {name}: {view['shares']} vs {sorted(ready)}"
        if change == "leave":
            self.cl.add_provider("--delay", str(DELAY))  # back to strength for the next round
            self.cl.wait_ready(PROVIDERS, timeout=60)

    def training_kill(self) -> None:
        from tests.integration.test_training import DIGITS, PARAMS, max_diff, reference

        if self.reference is None:
            self.reference = reference(DIGITS, 1)
        job = self.c.submit_train(DIGITS, epochs=1, **PARAMS)
        self.accepted.append(job)
        step = self.rng.randint(2, 18)
        wait_for(lambda: self.c.status(job)["progress"]["done"] >= step, 120, f"training step {step}")
        victim = self.rng.choice(self.members())
        t_kill = kill_provider(self.cl, victim)
        self.figures.fault("provider kill -9 (sync training)")
        self.cl.add_provider("--delay", str(DELAY))
        measure_detection(self.c, provider_name(victim), t_kill, self.heartbeat, self.figures)
        try:
            self.c.wait(job, timeout=300)
        except (TimeoutError, DcfError):
            self.figures.job("lost")
            raise
        out = Path(self.cl.state_dir) / "soak-model.pt"
        self.c.save_model(job, out)
        diff = max_diff(out, self.reference)
        self.figures.job("ok" if diff < 1e-5 else "wrong")
        assert diff < 1e-5, f"training parameters differ from single-process training by {diff:.2e}"
        self.c.delete(job)
        self.deleted.add(job)
        self.cl.wait_ready(PROVIDERS, timeout=60)

    def broker_outage(self) -> None:
        jobs = [self.job() for _ in range(2)]
        wait_for(lambda: self.c.status(jobs[0].job_id)["state"] != "queued", 30, "the job to start")
        stopper = broker_stop()
        self.figures.fault("RabbitMQ stop_app mid-job")
        t_stop = time.monotonic()
        try:
            wait_for(lambda: not broker_running(), 30, "RabbitMQ to stop", poll=0.1)
            t0 = time.monotonic()
            try:
                with Client(self.cl.url, queue_wait=0) as quick:  # refused at once, not waited for
                    submit_matmul(quick, self.nprng, 50)
                raise AssertionError("a job was accepted while RabbitMQ was down")
            except HeadUnreachable:
                self.figures.timing("submit refused while RabbitMQ is down (--queue-wait 0)", time.monotonic() - t0)
            stopper.wait(timeout=60)
        finally:
            if stopper.poll() is None:
                stopper.wait(timeout=60)
            broker_start()
        self.figures.timing("RabbitMQ outage (stop_app to app running again)", time.monotonic() - t_stop)
        t_back = time.monotonic()
        probe = self.accepting()
        self.figures.timing("RabbitMQ back to the first accepted job", time.monotonic() - t_back)
        for job in [*jobs, probe]:
            self.finish(job)

    # ---- the end ----------------------------------------------------------------------------------
    def final_checks(self, watch: EventWatcher) -> None:
        """One job.done per accepted job across every head; no deleted job came back."""
        with contextlib.suppress(AssertionError):
            wait_for(lambda: all(watch.count("job.done")[j] >= 1 for j in self.accepted), 15, "job.done events")
        done = watch.count("job.done")
        wrong = {j: done[j] for j in self.accepted if done[j] != 1}
        if wrong:
            self.failures["job.done not exactly once"] += 1
            self.figures.notes.append(f"{len(wrong)} jobs without exactly one job.done event: "
                                      f"{dict(list(wrong.items())[:5])}")
        back = []
        for j in self.deleted:
            with contextlib.suppress(NotFound):
                back.append((j, self.c.status(j)["state"]))
        if back:
            self.failures["deleted job came back"] += 1
            self.figures.notes.append(f"{len(back)} deleted jobs came back: {back[:5]}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=int(time.time()))
    p.add_argument("--heartbeat", type=float, default=0.4)
    p.add_argument("--amqp-url", default="", help=f"use RabbitMQ (e.g. {AMQP_URL}); default: embedded store")
    p.add_argument("--broker-faults", action="store_true", help="also stop and start RabbitMQ (rabbitmqctl)")
    p.add_argument("--no-slow-link", action="store_true", help="no provider behind a slow link")
    p.add_argument("--curve", action="store_true", help="CURVE keys for the head and every provider")
    p.add_argument("--figures", help="also write the figures as JSON here")
    p.add_argument("--shared-vhost", action="store_true",
                   help="use the vhost of --amqp-url as it is (default: a private vhost for the run, so that no "
                        "other head on the broker takes its jobs)")
    p.add_argument("--state-dir", help="keep the head's state dir and the logs (logs/) here; default: a temp dir")
    args = p.parse_args(argv)

    rng = random.Random(args.seed)
    figures = Figures(seed=args.seed, seed_from="--seed")
    rounds = ["provider_kill"] * 3 + ["head_kill"] * 3 + ["join_leave"] * 2
    if importlib.util.find_spec("torch") and importlib.util.find_spec("sklearn"):
        rounds.append("training_kill")
    if args.broker_faults:
        problem = "needs --amqp-url" if not args.amqp_url else rabbitmqctl_problem()
        if problem:
            p.error(f"--broker-faults: {problem}")
        rounds.append("broker_outage")
    print(f"soak: {args.minutes:g} min, seed {args.seed}, store {'rabbitmq' if args.amqp_url else 'embedded'}, "
          f"rounds {sorted(set(rounds))}", flush=True)

    vhost: contextlib.AbstractContextManager[str] = contextlib.nullcontext(args.amqp_url)
    if args.amqp_url and not args.shared_vhost:
        problem = management_problem()
        if problem:
            p.error(f"{problem}; use --shared-vhost to run on the vhost of --amqp-url")
        vhost = private_vhost(args.amqp_url, f"dcf-soak-{os.getpid()}")
    with vhost as amqp_url:
        return soak(args, amqp_url, rounds, rng, figures)


def soak(args: argparse.Namespace, amqp_url: str, rounds: list[str], rng: random.Random, figures: Figures) -> int:
    end = time.monotonic() + args.minutes * 60
    with LocalCluster(0, heartbeat=args.heartbeat, threads=1, amqp_url=amqp_url, state_dir=args.state_dir,
                      curve=args.curve) as cl, \
            Client(cl.url) as c, EventWatcher(cl.url) as watch, \
            (contextlib.nullcontext() if args.no_slow_link else SlowLink(cl.ports, 0.03, 20e6)) as link:
        soak = Soak(cl, c, rng, figures, args.heartbeat, link)
        soak.start()
        n = 0
        while time.monotonic() < end:
            name = rng.choice(rounds)
            n += 1
            t0 = time.monotonic()
            try:
                getattr(soak, name)()
                print(f"round {n:4d} {name:<14} ok   {time.monotonic() - t0:5.1f}s", flush=True)
            except Exception as exc:  # a failed round is counted and reported; the soak goes on
                soak.failures[name] += 1
                figures.notes.append(f"round {n} {name} failed: {type(exc).__name__}: {exc}"[:300])
                print(f"round {n:4d} {name:<14} FAIL {type(exc).__name__}: {exc}", flush=True)
                traceback.print_exc()
                soak.heal()
        soak.final_checks(watch)
        if amqp_url and args.broker_faults and not broker_running():
            broker_start()
    print("\n== soak figures ==")
    for line in figures.lines():
        print(line)
    print(f"rounds: {n}, failed: {sum(soak.failures.values())} {dict(soak.failures) or ''}")
    figures.dump(args.figures)
    return 0 if not (figures.jobs_lost or figures.wrong_results or soak.failures) else 1


if __name__ == "__main__":
    sys.exit(main())
