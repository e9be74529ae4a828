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
