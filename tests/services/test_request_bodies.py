"""Request bodies as clients write them, read without models or Ray: base64 images with the line
breaks and data: URLs encoders produce, and JSON nested too deeply for the parser (a 400, not a 500)."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError

from capfilt.services.app import create_app
from capfilt.services.config import ServeConfig
from capfilt.services.deps import get_models
from capfilt.services.schemas import CaptionRequest


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    """The service's app; every body here is refused before a model is asked, so none is loaded."""
    app = create_app(ServeConfig(captioner="unused", filter="unused"), None, None)
    app.dependency_overrides[get_models] = lambda: None
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client


@pytest.mark.parametrize(
    "encode",
    [
        lambda data: base64.encodebytes(data).decode(),  # `base64` / MIME: a newline every 76 chars
        lambda data: base64.encodebytes(data).decode().replace("\n", "\r\n"),
        lambda data: " \t" + base64.b64encode(data).decode() + "\n",
        lambda data: "data:image/png;base64," + base64.b64encode(data).decode(),
        lambda data: "data:image/png;name=a.png;charset=binary;base64," + base64.encodebytes(data).decode(),
        lambda data: "DATA:image/png;BASE64," + base64.b64encode(data).decode(),
    ],
    ids=["line_breaks", "crlf", "padded", "data_url", "data_url_parameters", "data_url_upper_case"],
)
def test_base64_images_as_encoders_write_them(encode) -> None:
    image = _png()
    assert len(base64.b64encode(image)) > 2 * 76  # long enough to be wrapped onto several lines
    assert CaptionRequest.model_validate({"image": encode(image)}).image == image


@pytest.mark.parametrize(
    "text",
    [
        "not base64 at all!",
        base64.encodebytes(b"\x89PNG\r\n").decode() + "*",
        "aGVs\u00a0bG8=",  # a no-break space is not ASCII whitespace
        "data:image/png,aGVsbG8=",  # a data: URL without ;base64 is percent-encoded, not base64
        "aGVsbG8",  # padding missing
    ],
)
def test_garbage_is_still_not_base64(text: str) -> None:
    with pytest.raises(ValidationError, match="image is not valid base64") as err:
        CaptionRequest.model_validate({"image": text})
    assert err.value.errors()[0]["loc"] == ("image",)


def test_garbage_base64_is_a_422_naming_the_image(client: TestClient) -> None:
    response = client.post("/v1/caption", json={"image": "ab\ncd\n*"})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "image"] and "image is not valid base64" in error["msg"]


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_json_nested_too_deeply_is_a_400(client: TestClient, opening: str) -> None:
    nested = (opening * 200_000).encode()  # 200 kB or more, under the 16 MiB body limit
    response = client.post("/v1/score", content=nested, headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json() == {
        "detail": "the request body's JSON is nested too deeply to parse: send an object with the "
        "fields of ScoreRequest",
        "reason": None,
    }


@pytest.mark.parametrize("key", ["a/b.c", "a.b", "../k", "k\x00", "."])
def test_keys_the_cleaning_job_calls_invalid_are_a_422(client: TestClient, key: str) -> None:
    """`capfilt clean` marks a sample whose key holds '.', '/' or NUL invalid_key: no decision for
    REST to mirror, so the same key is refused here, with the job's words."""
    from capfilt.pipelines.clean_inputs import key_problem

    response = client.post("/v1/capfilt", json={"image": base64.b64encode(_png()).decode(), "key": key})
    assert response.status_code == 422, response.text
    [error] = response.json()["detail"]
    assert error["loc"] == ["body", "key"] and key_problem(key) in error["msg"]
    assert "invalid_key" in error["msg"]


@pytest.mark.parametrize("media", ["application/json", "multipart/form-data; boundary=x"])
def test_a_body_over_the_limit_is_the_same_413_declared_or_chunked(media: str) -> None:
    app = create_app(ServeConfig(captioner="unused", filter="unused", max_body_bytes=1024), None, None)
    app.dependency_overrides[get_models] = lambda: None
    body = b"x" * 4096

    def chunks() -> Iterator[bytes]:  # no Content-Length: sent chunked, counted as it arrives
        yield from (body[i : i + 512] for i in range(0, len(body), 512))

    with TestClient(app, raise_server_exceptions=False) as limited:
        declared = limited.post("/v1/caption", content=body, headers={"Content-Type": media})
        chunked = limited.post("/v1/caption", content=chunks(), headers={"Content-Type": media})
    assert "content-length" not in chunked.request.headers
    for response in (declared, chunked):
        assert response.status_code == 413, response.text
        assert response.json() == {
            "detail": "the request body is larger than the limit of 1024 bytes",
            "reason": "body_too_large",
        }


@pytest.mark.parametrize("num_gpus", [1e-5, 1.5])
def test_job_gpu_shares_ray_would_refuse_are_422(num_gpus: float) -> None:
    from capfilt.services.schemas import JobRequest

    with pytest.raises(ValueError, match="num_gpus"):
        JobRequest.model_validate({"input": ["/x"], "output": "/y", "num_gpus": num_gpus})


def test_a_body_of_many_unknown_fields_gets_a_short_422(client: TestClient) -> None:
    """Unknown fields are refused before pydantic builds one error per field; a 422 lists at most
    MAX_ERRORS errors (a million keys made a 90 MB answer and held the event loop for 7 s)."""
    from capfilt.services.requests import MAX_ERRORS

    body = {"image": base64.b64encode(_png()).decode(), **{f"k{i}": i for i in range(50_000)}}
    r = client.post("/v1/caption", json=body)
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert len(detail) == MAX_ERRORS + 1 and len(r.content) < 10_000
    assert detail[0] == {
        "loc": ["body", "k0"],
        "msg": "Extra inputs are not permitted",
        "type": "extra_forbidden",
    }
    assert detail[-1]["msg"] == f"and {50_000 - MAX_ERRORS} more unknown fields"
    many_bad = {"image": base64.b64encode(_png()).decode(), "texts": [{"x": 1}] * 60}  # 60 type errors
    r = client.post("/v1/score", json=many_bad)
    assert r.status_code == 422 and len(r.json()["detail"]) == MAX_ERRORS + 1
    assert r.json()["detail"][-1]["type"] == "too_many_errors"


def test_an_integer_python_will_not_convert_is_a_400(client: TestClient) -> None:
    r = client.post("/v1/caption", content=b'{"image": "x", "num_captions": ' + b"9" * 5000 + b"}",
                    headers={"content-type": "application/json"})  # fmt: skip
    assert r.status_code == 400 and "not JSON this service reads" in r.json()["detail"]


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_server_error() -> None:
    """No traceback, not a 5xx in the metrics: nobody reads the answer."""
    import asyncio

    app = create_app(ServeConfig(captioner="unused", filter="unused"), None, None)
    app.dependency_overrides[get_models] = lambda: None
    sent: list[dict] = []
    messages = iter(
        [{"type": "http.request", "body": b'{"image": "', "more_body": True}, {"type": "http.disconnect"}]
    )

    async def receive() -> dict:
        return next(messages)

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/caption", "raw_path": b"/v1/caption", "query_string": b"", "root_path": "",
        "headers": [(b"content-type", b"application/json"), (b"host", b"test")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    asyncio.run(app(scope, receive, send))
    assert sent[0]["status"] == 499
    with TestClient(app) as c:
        metrics = c.get("/metrics").text
    assert 'capfilt_http_requests_total{method="POST",route="/v1/caption",status="499"} 1.0' in metrics


def test_metrics_labels_stay_bounded_and_name_the_route_asked(client: TestClient) -> None:
    for i in range(5):
        client.request(f"X{i}FOO", "/healthz")
    client.get("/openapi.json")
    big = client.post("/v1/caption", content=b"x", headers={"content-length": str(10**9)})
    assert big.status_code == 413
    metrics = client.get("/metrics").text
    assert "X0FOO" not in metrics
    assert 'capfilt_http_requests_total{method="other",route="/healthz",status="405"} 5.0' in metrics
    assert 'route="/openapi.json"' in metrics
    assert 'capfilt_http_requests_total{method="POST",route="/v1/caption",status="413"}' in metrics


def test_a_trailing_slash_is_not_redirected_to_the_clients_host(client: TestClient) -> None:
    r = client.get("/v1/caption/", headers={"host": "evil.example"}, follow_redirects=False)
    assert r.status_code == 404 and "location" not in r.headers
