"""Dataset blobs for ``Device.fetch``: mapped from the head's state dir when this provider shares
it, else asked of the head (a ``fetch`` request on its registration port), and cached by content
key so that a dataset crosses the network once per provider."""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import numpy as np
import zmq

from common import layout, protocol
from common.errors import TaskError

from .shared import SharedFiles

log = logging.getLogger("dcf.provider")

DATA_CACHE_ENTRIES = 8
FETCH_TIMEOUT_MS = 30_000
FETCH_TRIES = 3


class BlobSource(Protocol):
    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        """The blob ``blob_id``; ``key`` names its content (equal keys, equal arrays)."""
        ...


class RemoteBlobs(Protocol):
    def request(self, blob_id: str) -> np.ndarray:
        """The blob, asked of the head."""
        ...


class HeadBlobs:
    """Asks the head for blobs over a REQ socket, one per calling thread (ZeroMQ sockets are not
    shared between threads). Lazy Pirate: a request without a reply closes the socket and tries
    again, ``FETCH_TRIES`` times in all."""

    def __init__(self, open_socket: Callable[[], zmq.Socket], provider_id: Callable[[], str],
                 timeout_ms: int = FETCH_TIMEOUT_MS, head: Callable[[], str] = lambda: "") -> None:
        self._open_socket = open_socket  # a REQ socket connected to the head's registration port
        self._provider_id = provider_id  # the current one (it changes when the identity is renewed)
        self._head = head  # the head in use: a thread's socket to another one is opened anew
        self._timeout_ms = timeout_ms
        self._sockets = threading.local()

    def request(self, blob_id: str) -> np.ndarray:
        request = protocol.encode("fetch", {"provider_id": self._provider_id(), "blob_id": blob_id})
        for attempt in range(FETCH_TRIES):
            sock = self._socket()
            sock.send_multipart(request)
            if sock.poll(self._timeout_ms):
                return _blob_of(protocol.decode(sock.recv_multipart(copy=False)), blob_id)
            self.close_thread_socket()  # a stuck REQ is closed and opened anew
            log.warning("no reply to a blob request (try %d)", attempt + 1)
        raise TaskError(f"could not fetch blob {blob_id} from the head")

    def _socket(self) -> zmq.Socket:
        sock: zmq.Socket | None = getattr(self._sockets, "socket", None)
        if sock is not None and getattr(self._sockets, "head", None) != self._head():
            self.close_thread_socket()  # the provider moved to another head (a standby took over)
            sock = None
        if sock is None:
            self._sockets.head = self._head()
            sock = self._sockets.socket = self._open_socket()
        return sock

    def close_thread_socket(self) -> None:
        """Close the calling thread's socket, if it has one."""
        sock: zmq.Socket | None = getattr(self._sockets, "socket", None)
        if sock is not None:
            sock.close(linger=0)
            self._sockets.socket = None


def _blob_of(msg: protocol.Message, blob_id: str) -> np.ndarray:
    if msg.type == "error":
        raise TaskError(f"the head refused blob {blob_id}: {msg['message']}")
    if msg.type != "blob" or len(msg.arrays) != 1:
        raise TaskError("malformed blob reply")
    return msg.arrays[0]


class BlobCache:
    """``BlobSource`` of a provider: the last ``entries`` blobs by content key, each mapped from
    the shared state dir (``use_shared``) or asked of the head through ``remote``."""

    def __init__(self, remote: RemoteBlobs, entries: int = DATA_CACHE_ENTRIES) -> None:
        self._remote = remote
        self._entries = entries
        self._shared: SharedFiles | None = None
        self._arrays: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()  # the socket thread runs quick subtasks too

    def use_shared(self, files: SharedFiles | None) -> None:
        """Map blobs from this state dir from now on (None: ask the head)."""
        self._shared = files

    def fetch(self, blob_id: str, key: str) -> np.ndarray:
        with self._lock:
            if key in self._arrays:
                self._arrays.move_to_end(key)
                return self._arrays[key]
        shared = self._shared
        if shared is not None:
            arr = np.load(layout.blob_path(shared.root, blob_id), mmap_mode="r", allow_pickle=False)
        else:
            arr = self._remote.request(blob_id)
        with self._lock:
            self._arrays[key] = arr
            while len(self._arrays) > self._entries:
                self._arrays.popitem(last=False)
        return arr
