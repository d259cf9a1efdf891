"""/docs and /redoc work offline (issue 11 item 14): their pages name no outside URL, every asset
they load is served by the head itself, and /openapi.json describes what "Try it out" needs: the
raw body of PUT /v1/blobs, the binary result download, the bearer token and the error bodies."""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from user_client.local import LocalCluster

pytestmark = pytest.mark.integration

ASSET = re.compile(r'(?:src|href)="([^"]+)"')
OUTSIDE = re.compile(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", re.IGNORECASE)


@pytest.fixture(scope="module")
def head_url() -> Iterator[str]:
    cl = LocalCluster(0, heartbeat=0.5, head_args=["--api-token", "s3cret"])
    try:
        cl.start_head()
        yield cl.url
    finally:
        cl.stop()


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_local_assets(head_url: str, page: str) -> None:
    r = httpx.get(head_url + page, timeout=10)  # no token: the pages hold no data
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert OUTSIDE.findall(r.text) == [], "the page must not load anything from outside the head"
    assets = ASSET.findall(r.text)
    assert any(a.endswith(".js") for a in assets), assets
    for asset in assets:
        assert asset.startswith("/"), asset
        got = httpx.get(head_url + asset, timeout=10)
        assert got.status_code == 200 and len(got.content) > 500, asset
    assert "/openapi.json" in r.text


def test_openapi_describes_bodies_responses_and_the_token(head_url: str) -> None:
    spec = httpx.get(head_url + "/openapi.json", timeout=10).json()
    upload = spec["paths"]["/v1/blobs"]["put"]
    body = upload["requestBody"]
    assert body["required"] and body["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert "201" in upload["responses"] and "413" in upload["responses"]
    result = spec["paths"]["/v1/jobs/{job_id}/result"]["get"]["responses"]
    assert result["200"]["content"]["application/octet-stream"]["schema"]["format"] == "binary"
    assert result["404"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    submit = spec["paths"]["/v1/jobs"]["post"]
    assert submit["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/JobSpec")
    schemes = spec["components"]["securitySchemes"]
    assert [s["scheme"] for s in schemes.values()] == ["bearer"]
    assert submit["security"] and "security" not in spec["paths"]["/v1/health"]["get"]
    assert {} not in submit["security"]  # this head has --api-token: required (without one it is optional)
    job_param = spec["paths"]["/v1/jobs/{job_id}"]["get"]["parameters"][0]
    assert job_param["in"] == "path" and "prefix" in job_param["description"]
