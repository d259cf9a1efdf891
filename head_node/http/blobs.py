"""Blobs: the input arrays of jobs, uploaded as .npy bytes or adopted from the head's state dir."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request

from common import layout
from common.arrays import ArrayMeta
from common.errors import NotFound, TooLarge

from .deps import HeadDep, require_token
from .errors import documented
from .models import Adopt, BlobInfo

log = logging.getLogger("dcf.head.api")

router = APIRouter(prefix="/v1/blobs", tags=["blobs"], dependencies=[Depends(require_token)],
                   responses=documented(401, 422))

NPY_BODY = {"requestBody": {"required": True, "description": "the raw bytes of a .npy file",
                            "content": {"application/octet-stream": {"schema": {"type": "string",
                                                                                "format": "binary"}}}}}


def blob_info(blob_id: str, meta: ArrayMeta) -> dict[str, Any]:
    return {"blob_id": blob_id, **meta.to_dict(), "bytes": meta.nbytes}


@router.put("", status_code=201, response_model=BlobInfo, responses=documented(400, 413, 507),
            openapi_extra=NPY_BODY)
async def upload(request: Request, head: HeadDep) -> dict[str, Any]:
    """Upload one array as the raw bytes of a .npy file (C order, float32 or float64)."""
    limit = head.cfg.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"upload of {declared} bytes exceeds {limit}")
    writer = head.blobs.writer(limit, head.admit_upload)
    try:
        async for chunk in request.stream():
            writer.feed(chunk)
        blob_id, meta = writer.finish(head.cfg.fsync)
    except BaseException:
        writer.abort()
        raise
    log.info("blob stored: %s %s", meta.dtype, list(meta.shape), extra={"blob_id": blob_id})
    return blob_info(blob_id, meta)


@router.post("/adopt", status_code=201, response_model=BlobInfo, responses=documented(404, 413, 507))
async def adopt(body: Adopt, head: HeadDep) -> dict[str, Any]:
    """Take a .npy file a client on the head's machine wrote to STATE_DIR/incoming/<upload_id>.npy."""
    with contextlib.suppress(FileNotFoundError):  # (no file: adopt answers 404)
        head.admit_upload(layout.incoming_path(head.root, body.upload_id).stat().st_size)
    # on a thread: the file is read once for its checksum (~76 ms for 128 MiB), not in the event loop
    blob_id, meta = await asyncio.to_thread(head.blobs.adopt, body.upload_id, head.cfg.max_upload_bytes,
                                            head.cfg.fsync)
    log.info("blob adopted: %s %s", meta.dtype, list(meta.shape), extra={"blob_id": blob_id})
    return blob_info(blob_id, meta)


@router.delete("/{blob_id}", status_code=204, responses=documented(404))
async def delete_blob(blob_id: str, head: HeadDep) -> None:
    if not head.blobs.delete_blob(blob_id):
        raise NotFound(f"no blob {blob_id}")
