"""Providers: the table, one provider's detail, drain and undrain, clearing a quarantine."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from .deps import HeadDep, require_token
from .errors import documented
from .ids import ProviderId
from .models import NodeView

router = APIRouter(prefix="/v1/nodes", tags=["nodes"], dependencies=[Depends(require_token)],
                   responses=documented(401, 422))

NODE_NOT_FOUND = documented(404, 409)  # 409: an ambiguous short id


@router.get("", response_model=list[NodeView])
async def nodes(head: HeadDep) -> JSONResponse:
    """Every provider the head knows, with its device and measured speed."""
    # returned as is: the rows are the head's own views, and checking each against the model cost
    # ~20 ms at 500 providers (bench/scale.py) for every poll of the table
    return JSONResponse(head.nodes())


@router.get("/{provider_id}", response_model=NodeView, responses=NODE_NOT_FOUND)
async def node(provider_id: ProviderId, head: HeadDep) -> dict[str, Any]:
    return head.node_view(provider_id)


@router.post("/{provider_id}/drain", response_model=NodeView, responses=NODE_NOT_FOUND)
async def drain(provider_id: ProviderId, head: HeadDep) -> dict[str, Any]:
    """The provider finishes what it has and is given nothing new."""
    return head.drain(provider_id, True)


@router.post("/{provider_id}/undrain", response_model=NodeView, responses=NODE_NOT_FOUND)
async def undrain(provider_id: ProviderId, head: HeadDep) -> dict[str, Any]:
    return head.drain(provider_id, False)


@router.post("/{provider_id}/clear", response_model=NodeView, responses=NODE_NOT_FOUND)
async def clear(provider_id: ProviderId, head: HeadDep) -> dict[str, Any]:
    """Trust a quarantined provider again (it was caught sending a wrong result): it gets work from now on.
    409 if it is not quarantined."""
    return head.clear_quarantine(provider_id)
