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
