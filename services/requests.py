"""Request bodies as JSON (the image in base64) or multipart/form-data (the image as a file part),
and the image they carry, decoded under the pixel limit and resized as the cleaning job does."""

from __future__ import annotations

import asyncio
import json
import re
import typing
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np
from fastapi import HTTPException, Request
from fastapi.exceptions import RequestValidationError
from PIL import Image
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile

from capfilt.images import ImageError, open_image

M = TypeVar("M", bound=BaseModel)
R = TypeVar("R")
JSON, MULTIPART = "application/json", "multipart/form-data"
MAX_FIELD_BYTES = 64 * 1024  # one multipart text field; the image part is bounded by the body limit
# Threads that decode images (each can take width x height x 3 bytes) and parse JSON bodies (up to
# --max-body-bytes each). Fixed pools, not limiters: a request cancelled because its client left
# drops its call if it waits for a thread, and one already running finishes inside the pool, so
# the pool's size still bounds the work (with anyio's limiter a cancelled caller gave back its
# slot while its thread went on: abandoned 25-megapixel decodes piled up, 34 at once, 5.6 GB).
_DECODE_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="decode")
_PARSE_POOL = ThreadPoolExecutor(max_workers=8, thread_name_prefix="parse-json")
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


MAX_ERRORS = 20  # errors a 422 lists: a body of a million bad fields gets a short answer


def _capped(
    errors: list[dict[str, Any]], total: int, prefix: tuple[str, ...], what: str
) -> RequestValidationError:
    """A 422 of the first MAX_ERRORS of `total` errors (`errors` holds at least those), then one
    saying how many more `what` there were."""
    shown = errors[:MAX_ERRORS]
    if total > MAX_ERRORS:
        more = f"and {total - MAX_ERRORS} more {what}"
        shown.append({"loc": list(prefix), "msg": more, "type": "too_many_errors"})
    return RequestValidationError(shown)


def validation_error(err: ValidationError, prefix: tuple[str, ...] = ("body",)) -> RequestValidationError:
    """pydantic's errors as FastAPI's 422, located in the body, without echoing the (large) input;
    the first MAX_ERRORS of them, then one saying how many more there were."""
    found = err.errors(include_url=False)
    errors = [{"loc": [*prefix, *e["loc"]], "msg": e["msg"], "type": e["type"]} for e in found[:MAX_ERRORS]]
    return _capped(errors, len(found), prefix, "errors")


def _unknown_fields(
    model: type[BaseModel], data: dict[str, Any], prefix: tuple[str, ...] = ("body",)
) -> None:
    """422 for fields the model does not have (its schema forbids extras), before pydantic builds one
    error per field: a 16 MiB body can hold a million keys."""
    if model.model_config.get("extra") != "forbid":
        return
    unknown = [k for k in data if k not in model.model_fields]
    if unknown:
        errors = [
            {"loc": [*prefix, k], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"}
            for k in unknown[:MAX_ERRORS]
        ]
        raise _capped(errors, len(unknown), prefix, "unknown fields")


def _from_json(raw: bytes, model: type[M]) -> M:
    """Parse and validate a JSON body (run in a worker thread: a large body takes a while, and the
    event loop serves every other client meanwhile)."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HTTPException(400, f"the request body is not valid JSON: {err}") from err
    except RecursionError as err:  # json's parser recurses once per nested array or object
        raise HTTPException(
            400,
            f"the request body's JSON is nested too deeply to parse: send an object with the fields of {model.__name__}",
        ) from err
    except ValueError as err:  # an integer of more digits than Python converts (4,300)
        raise HTTPException(400, f"the request body is not JSON this service reads: {err}") from err
    return _validated(model, data)


def _validated(model: type[M], data: Any) -> M:
    if not isinstance(data, dict):
        raise HTTPException(400, f"the JSON body must be an object with the fields of {model.__name__}")
    _unknown_fields(model, data)
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def _is_list(model: type[BaseModel], name: str) -> bool:
    annotation = model.model_fields[name].annotation
    args = (
        typing.get_args(annotation)
        if typing.get_origin(annotation) in (typing.Union, type(int | None))
        else ()
    )
    return typing.get_origin(annotation) is list or any(typing.get_origin(a) is list for a in args)


async def _form_fields(request: Request, model: type[BaseModel]) -> dict[str, Any]:
    """The form's parts as the model's fields: repeated parts for list fields, the file's bytes."""
    async with request.form(max_files=1, max_fields=256, max_part_size=MAX_FIELD_BYTES) as form:
        data: dict[str, Any] = {}
        for name in dict.fromkeys(form.keys()):
            values = form.getlist(name)
            parts: list[Any] = []
            for value in values:
                if isinstance(value, UploadFile):
                    if name != "image":
                        raise HTTPException(
                            400, f"multipart part {name!r} is a file; only 'image' can be one"
                        )
                    parts.append(await value.read())
                else:
                    parts.append(value)
            many = name in model.model_fields and _is_list(model, name)
            data[name] = parts if many or len(parts) > 1 else parts[0]
        return data


def body(model: type[M], *, multipart: bool = True) -> Callable[[Request], Awaitable[M]]:
    """A dependency that reads `model` from a JSON body, or a multipart one unless `multipart` is
    False (see `openapi_body`, `openapi_json_body`): 400 when empty or not JSON, 415 for another
    Content-Type, 422 naming the fields the schema refuses."""
    accepted = f"{JSON} or {MULTIPART}" if multipart else JSON
    expected = (
        f"a JSON object ({JSON}, the image in base64) or a {MULTIPART} form with the image as a file "
        "part named 'image'"
        if multipart
        else f"a JSON object ({JSON}) with the fields of {model.__name__}"
    )

    async def parse(request: Request) -> M:
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media == MULTIPART and multipart:
            return _validated(model, await _form_fields(request, model))
        if media == JSON or media.endswith("+json") or not media:
            raw = await request.body()
            if not raw.strip():
                raise HTTPException(400, f"the request body is empty: send {expected}")
            if not media:
                raise HTTPException(415, f"no Content-Type: send {accepted}")
            return await _in_pool(_PARSE_POOL, _from_json, raw, model)
        raise HTTPException(415, f"unsupported Content-Type {media!r}: send {accepted}")

    return parse


def openapi_json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose body `body(model, multipart=False)` reads."""
    return {"requestBody": {"required": True, "content": {JSON: {"schema": model.model_json_schema()}}}}


def openapi_body(model: type[BaseModel], list_fields: tuple[str, ...] = ()) -> dict[str, Any]:
    """`openapi_extra` for a route whose body `body(model)` reads: one schema per content type."""
    as_json = model.model_json_schema()
    as_form = json.loads(json.dumps(as_json))
    as_json["properties"]["image"] = {
        "type": "string",
        "contentEncoding": "base64",
        "description": "the image file, base64-encoded",
    }
    as_form["properties"]["image"] = {
        "type": "string",
        "contentMediaType": "application/octet-stream",
        "format": "binary",
        "description": "the image file",
    }
    encoding = {name: {"style": "form", "explode": True} for name in list_fields}
    form_media: dict[str, Any] = {"schema": as_form}
    if encoding:
        form_media["encoding"] = encoding
    return {
        "requestBody": {
            "required": True,
            "content": {JSON: {"schema": as_json}, MULTIPART: form_media},
        }
    }


async def _in_pool(pool: ThreadPoolExecutor, fn: Callable[..., R], *args: Any) -> R:
    """fn(*args) in one of `pool`'s threads."""
    return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


def _pixels(data: bytes, max_pixels: int, sizes: list[int]) -> dict[int, bytes]:
    image = open_image(data, "image", max_pixels)
    return {size: model_pixels(image, size) for size in dict.fromkeys(sizes)}


async def image_pixels(data: bytes, max_pixels: int, sizes: list[int]) -> dict[int, bytes]:
    """The image in `data` decoded (in a worker thread) and resized to each model size, or
    ImageError (its `reason`: image_empty, image_undecodable, image_too_large)."""
    try:
        return await _in_pool(_DECODE_POOL, _pixels, data, max_pixels, sizes)
    except ImageError as err:  # PIL names the BytesIO's address: not the client's business
        raise ImageError(_ADDRESS.sub("", str(err)), err.reason) from None


def model_pixels(image: Image.Image, size: int) -> bytes:
    """The image resized (bicubic) to the model's square input, raw uint8 bytes: what the cleaning
    job's decode stage hands its model stages (`clean_read.decode_batch`)."""
    return np.asarray(image.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8).tobytes()
