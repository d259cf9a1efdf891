"""The head's training rendezvous: a torch.distributed ``TCPStore`` that collective groups meet at.

Started on first use (the first job whose task type lists ``"rendezvous"`` in ``head_services``), on the
head's ``--host`` and ``--rendezvous-port``. Each group uses keys under its own prefix, derived from a
secret only the head and the group's members learn (the subtask's params, over the head's task socket,
CURVE-encrypted when CURVE is on): the store has no key listing, so a stranger who reaches its port cannot
find a group's keys. The members' gloo/NCCL traffic between each other is not encrypted (docs/TRAINING.md).
"""

from __future__ import annotations

import logging
import secrets
import socket
from datetime import timedelta
from typing import Any

from common.errors import ConfigError

log = logging.getLogger("dcf.head.rendezvous")


class Rendezvous:
    """The store, started once; ``options()`` is what a job's planner gets (``JobContext.options``)."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.secret = secrets.token_hex(16)  # per head run: a restarted head's groups never meet old members
        self._listener: socket.socket | None = None
        self._store: Any = None

    def options(self) -> dict[str, Any]:
        if self._store is None:
            self._start()
        return {"port": self.port, "secret": self.secret}

    def _start(self) -> None:
        import torch.distributed as dist

        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((self.host, self.port))
        except OSError as exc:
            listener.close()
            raise ConfigError(f"rendezvous port {self.port} on {self.host} is not free ({exc.strerror or exc}); "
                              "choose another with --rendezvous-port") from None
        listener.listen(512)
        # the store serves on the socket bound here (only --host), not on every interface
        self._store = dist.TCPStore(self.host, self.port, is_master=True, wait_for_workers=False,
                                    timeout=timedelta(seconds=30), master_listen_fd=listener.fileno(),
                                    use_libuv=True)
        self._listener = listener
        log.info("training rendezvous (TCPStore) on %s:%d", self.host, self.port)

    def close(self) -> None:
        self._store = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
