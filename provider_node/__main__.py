"""``dcf-provider`` / ``python -m provider_node``: run one provider."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from common import config, tasks
from common.errors import DcfError
from common.logs import setup_logging

log = logging.getLogger("dcf.provider")


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cfg = config.provider_settings(argv)
        setup_logging(cfg.log_level, cfg.log_json)
        tasks.load_plugins(cfg.plugins)
        if cfg.threads:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=cfg.threads)
            try:
                import torch

                torch.set_num_threads(cfg.threads)
            except ImportError:
                pass
        from .device import detect
        from .node import ProviderNode

        node = ProviderNode(cfg, detect(cfg.device))
        if not cfg.curve_secret_key:  # a head secure by default never answers it: say why up front
            log.info("CURVE off (no --curve-secret-key): only a head run with --insecure takes this provider; "
                     "for a head with keys, run `dcf keys add-provider NAME` on its machine and pass "
                     "--curve-server-key and --curve-secret-key (docs/DEPLOYMENT.md, 'Secure by default')")
    except DcfError as exc:
        print(f"dcf-provider: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C while it starts (torch import, benchmark): not registered yet
        return 130

    # Two threads (sockets, compute) hand work to each other many times a second: switch the
    # GIL sooner than the default 5 ms so a hand-off never waits for a time slice.
    sys.setswitchinterval(0.0005)

    def stop(*_: object) -> None:
        node.stopping.set()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if hasattr(signal, "SIGHUP"):  # a closed terminal: leave cleanly, as on Ctrl-C (not on Windows)
        signal.signal(signal.SIGHUP, stop)
    node.run()
    log.info("provider stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
