"""Every error a client can cause is a 4xx whose message says what was wrong: bad images, empty and
oversized bodies, wrong types, paths outside the roots, a missing or wrong API key."""

from __future__ import annotations

import base64
import dataclasses
import io
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from capfilt.services.bench import LoopbackServer
from capfilt.services.config import ServeConfig

from .conftest import API_KEY, MAX_BODY, MAX_PIXELS, Service


def _png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.zeros((height, width, 3), np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _detail(response: httpx.Response) -> str:
    return str(response.json()["detail"])


def test_non_image_bytes_are_a_400_naming_the_image(service: Service) -> None:
    with service.client(key=None) as client:
        upload = client.post(
            "/v1/score", files={"image": ("x.jpg", b"\xff\xd8\xff not a jpeg")}, data={"texts": "a"}
        )
        as_json = client.post("/v1/caption", json={"image": _b64(b"GIF89a garbage")})
        bad_b64 = client.post("/v1/caption", json={"image": "not base64 at all!"})
    for response in (upload, as_json):
        assert response.status_code == 400, response.text
        assert response.json()["reason"] == "image_undecodable" and "not a readable image" in _detail(
            response
        )
        assert "0x" not in _detail(response)  # no memory addresses
    assert bad_b64.status_code == 422 and "image is not valid base64" in bad_b64.text


def test_empty_bodies_and_images(service: Service) -> None:
    with service.client(key=None) as client:
        nothing = client.post("/v1/score", headers={"Content-Type": "application/json"}, content=b"")
        no_type = client.post("/v1/score", content=b"")
        empty_image = client.post("/v1/score", files={"image": ("e.jpg", b"")}, data={"texts": "a"})
        empty_b64 = client.post("/v1/capfilt", json={"image": "", "key": "k"})
        not_json = client.post("/v1/score", headers={"Content-Type": "application/json"}, content=b"{oops")
        array = client.post("/v1/score", json=[1, 2])
        empty_job = client.post("/v1/jobs", headers={"Authorization": f"Bearer {API_KEY}"})
    for response in (nothing, no_type):
        assert response.status_code == 400 and "the request body is empty" in _detail(response)
    for response in (empty_image, empty_b64):
        assert response.status_code == 400 and response.json()["reason"] == "image_empty"
    assert not_json.status_code == 400 and "not valid JSON" in _detail(not_json)
    assert array.status_code == 400 and "must be an object" in _detail(array)
    assert empty_job.status_code == 400 and "the request body is empty" in _detail(empty_job)


def test_oversized_images_and_bodies_are_a_413(service: Service) -> None:
    big = _png(1100, 1000)  # 1.1 Mpx over the service's 1 Mpx; a few kB on the wire
    with service.client(key=None) as client:
        image = client.post("/v1/caption", files={"image": ("big.png", big)})
        body = client.post("/v1/caption", files={"image": ("huge.bin", b"\0" * (MAX_BODY + 1))})
    assert image.status_code == 413 and image.json()["reason"] == "image_too_large"
    assert f"1100x1000 pixels exceeds the limit of {MAX_PIXELS}" in _detail(image)
    assert body.status_code == 413 and f"larger than the limit of {MAX_BODY} bytes" in _detail(body)


@pytest.mark.parametrize(
    ("path", "body", "field", "words"),
    [
        ("/v1/score", {"texts": "one text"}, "texts", "valid list"),
        ("/v1/score", {"texts": []}, "texts", "at least 1 item"),
        ("/v1/score", {"texts": [1]}, "texts", "valid string"),
        ("/v1/caption", {"num_captions": "three"}, "num_captions", "valid integer"),
        ("/v1/caption", {"top_p": 1.5}, "top_p", "less than or equal to 1"),
        ("/v1/caption", {"method": "random"}, "method", "'nucleus', 'beam' or 'greedy'"),
        ("/v1/caption", {"min_tokens": 40}, "body", "min_tokens=40: must be between 0 and max_tokens=30"),
        ("/v1/caption", {"method": "greedy", "num_captions": 2}, "body", "greedy decoding gives one caption"),
        ("/v1/caption", {"colour": "red"}, "colour", "Extra inputs are not permitted"),
        ("/v1/capfilt", {"seed": -1, "key": "k"}, "seed", "greater than or equal to 0"),
        ("/v1/capfilt", {"seed": 0}, "key", "Field required"),
        (
            "/v1/capfilt",
            {"key": "k", "text": "\ud800"},
            "text",
            "unable to parse raw data as a unicode string",
        ),
    ],
)
def test_wrong_types_are_a_422_naming_the_field(
    service: Service, image_files, path, body, field, words
) -> None:
    payload = {"image": _b64(image_files[0].read_bytes()), **body}
    if path == "/v1/score" and "texts" not in body:
        payload["texts"] = ["a"]
    with service.client(key=None) as client:  # json.dumps escapes what UTF-8 cannot carry (a lone surrogate)
        response = client.post(
            path, content=json.dumps(payload), headers={"Content-Type": "application/json"}
        )
    assert response.status_code == 422, response.text
    errors = response.json()["detail"]
    assert any(field in e["loc"] if field != "body" else e["loc"] == ["body"] for e in errors), errors
    assert words in " ".join(e["msg"] for e in errors)


def test_model_limits_and_media_types_are_4xx(service: Service, image_files) -> None:
    image = _b64(image_files[0].read_bytes())
    with service.client(key=None) as client:
        too_long = client.post("/v1/caption", json={"image": image, "max_tokens": 200, "min_tokens": 1})
        xml = client.post("/v1/score", content=b"<a/>", headers={"Content-Type": "application/xml"})
        two_files = client.post("/v1/score", files=[("image", ("a", b"1")), ("texts", ("b", b"2"))])
        texts_file = client.post("/v1/score", files=[("texts", ("b", b"2"))])
        unknown = client.get("/v1/nothing")
        wrong_method = client.get("/v1/score")
    assert too_long.status_code == 400 and "max_tokens=200 is more than this captioner" in _detail(too_long)
    assert xml.status_code == 415 and "application/json" in _detail(xml)
    assert two_files.status_code == 400 and "Too many files" in _detail(two_files)
    assert texts_file.status_code == 400 and "'texts' is a file" in _detail(texts_file)
    assert unknown.status_code == 404 and "no such endpoint: /v1/nothing" in _detail(unknown)
    assert wrong_method.status_code == 405


def test_job_paths_outside_the_roots_are_refused(service: Service, tmp_path: Path) -> None:
    shard = str(service.input_root / "web" / "00000.tar")
    out = str(service.output_root / "never")
    cases = {
        "outside": {"input": ["/etc"], "output": out},
        "dotdot": {"input": [f"{service.input_root}/../../.."], "output": out},
        "symlink": {"input": [str(service.input_root / "escape")], "output": out},
        "output": {"input": [shard], "output": str(tmp_path / "elsewhere")},
        "output_dotdot": {"input": [shard], "output": f"{service.output_root}/../x"},
        "url": {"input": ["s3://bucket/shards"], "output": out},
        "checkpoint": {"input": [shard], "output": out, "captioner": "/etc/passwd"},
    }
    with service.client() as client:
        answers = {name: client.post("/v1/jobs", json=body) for name, body in cases.items()}
        relative = client.post("/v1/jobs", json={"input": ["web"], "output": out})
        missing = client.post("/v1/jobs", json={"input": [f"{service.input_root}/nope"], "output": out})
        both = client.post(
            "/v1/jobs", json={"input": [shard], "output": out, "threshold": 0.5, "keep_fraction": 0.5}
        )
    for name, response in answers.items():
        assert response.status_code == 403, (name, response.text)
        assert "outside the allowed roots" in _detail(response) or "only local paths" in _detail(response), (
            name
        )
    assert str(service.input_root) in _detail(answers["symlink"])  # the roots are named
    assert relative.status_code == 400 and "give an absolute path" in _detail(relative)
    assert missing.status_code == 400 and "data path not found" in _detail(missing)
    assert both.status_code == 422 and "exclude each other" in both.text
    assert not (service.output_root / "never").exists()


def test_the_api_key_guards_the_job_endpoints(service: Service) -> None:
    with service.client(key=None) as anonymous, service.client(key="wrong-key-0123456789") as wrong:
        for client in (anonymous, wrong):
            for method, path in (
                ("GET", "/v1/jobs"),
                ("POST", "/v1/jobs"),
                ("GET", "/v1/jobs/x"),
                ("DELETE", "/v1/jobs/x"),
            ):
                response = client.request(method, path, json={})
                assert response.status_code == 401, (method, path, response.text)
                assert response.headers["www-authenticate"] == "Bearer"
        assert "missing API key" in _detail(anonymous.get("/v1/jobs"))
        assert _detail(wrong.get("/v1/jobs")) == "wrong API key"
        assert anonymous.get("/healthz").status_code == 200  # inference and probes stay open (--auth jobs)
    with service.client() as client:
        assert client.get("/v1/jobs").status_code == 200
        assert client.get("/v1/jobs/raysubmit_not_ours").status_code == 404
        assert client.get("/v1/jobs/..%2F..%2Fapi").status_code == 404
        assert client.delete("/v1/jobs/capfilt_clean_0000000000000000").status_code == 404


@pytest.fixture(scope="module")
def guarded(our_captioner_dir: Path, our_filter_dir: Path) -> Iterator[str]:
    """An app with `--auth all` and no roots (jobs off), served over loopback; no models needed."""
    from capfilt.services.app import create_app
    from capfilt.services.jobs import JobManager

    config = ServeConfig(
        captioner=str(our_captioner_dir), filter=str(our_filter_dir), api_key=API_KEY, auth="all"
    )
    config.validate()
    with LoopbackServer(create_app(config, None, JobManager(config, "http://127.0.0.1:9"))) as url:
        yield url


def test_auth_all_guards_every_endpoint_but_the_probes(guarded: str) -> None:
    with httpx.Client(base_url=guarded) as anonymous:
        for path in ("/v1/score", "/v1/caption", "/v1/capfilt"):
            assert anonymous.post(path, json={}).status_code == 401
        assert anonymous.get("/metrics").status_code == 401
        assert anonymous.get("/healthz").status_code == 200
        assert anonymous.get("/readyz").status_code == 503  # no models in this app
    with httpx.Client(base_url=guarded, headers={"Authorization": f"Bearer {API_KEY}"}) as client:
        loading = client.post("/v1/score", json={})
        assert loading.status_code == 503 and "still loading" in _detail(loading)
        assert client.get("/metrics").status_code == 200
        jobs_off = client.post("/v1/jobs", json={"input": ["/x"], "output": "/y"})
        assert jobs_off.status_code == 403 and jobs_off.json()["reason"] == "jobs_disabled"


def test_serve_options_are_checked_before_anything_starts(tmp_path: Path, our_captioner_dir) -> None:
    import argparse

    from capfilt.errors import CapfiltError
    from capfilt.services.serve_cli import add_serve_parser, config_from_args

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))

    def config(*extra: str, env_key: str | None = None) -> ServeConfig:
        args = parser.parse_args(
            ["serve", "--captioner", str(our_captioner_dir), "--filter", str(our_captioner_dir), *extra]
        )
        return config_from_args(args)

    key_file = tmp_path / "key"
    key_file.write_text("k" * 32 + "\n")
    assert config("--api-key-file", str(key_file)).api_key == "k" * 32
    assert "k" * 32 not in repr(config("--api-key-file", str(key_file)))  # kept out of logs
    for extra, message in (
        (("--replicas", "0"), "--replicas must be >= 1"),
        (("--max-batch", "0"), "--max-batch must be >= 1"),
        (("--auth", "all"), "--auth all needs an API key"),
        (("--input-root", str(tmp_path / "missing")), "not an existing directory"),
        (("--port", "70000"), "--port must be in 0-65535"),
    ):
        with pytest.raises(CapfiltError, match=message):
            config(*extra).validate()
    assert config("--precision", "fast").precision == "fast"
    with pytest.raises(CapfiltError, match="--precision must be exact or fast; got 'half'"):
        dataclasses.replace(config(), precision="half").validate()
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(CapfiltError, match="shorter than 16"):
        config("--api-key-file", str(short)).validate()


@pytest.mark.parametrize(
    ("captioner", "filt", "flag", "words"),
    [
        (
            "filter",
            "captioner",
            "--captioner",
            "is a filter (image-grounded encoder) and cannot write captions",
        ),
        (
            "captioner",
            "captioner",
            "--filter",
            "is a captioner (image-grounded decoder) and cannot score texts",
        ),
        ("captioner", "", "--filter", "is a directory without config.json; it is not a checkpoint"),
    ],
    ids=["swapped", "two_captioners", "data_folder"],
)
def test_serve_refuses_wrong_checkpoints_before_ray_starts(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], captioner, filt, flag, words
) -> None:
    """`capfilt serve` loads its checkpoints as `capfilt clean` does before Ray starts: a wrong one is
    `error: --FLAG PATH: ...` and exit 2, not a ready line followed by an actor's traceback."""
    from capfilt.cli import main
    from capfilt.services import serve_cli

    weights = Path(__file__).resolve().parents[2] / "capfilt" / "weights" / "small"

    def no_ray(config: ServeConfig) -> None:
        raise AssertionError("Ray started before the checkpoints were checked")

    monkeypatch.setattr(serve_cli, "init_ray", no_ray)
    paths = {"captioner": str(weights / captioner), "filter": str(weights / filt) if filt else str(weights)}
    code = main(["serve", "--captioner", paths["captioner"], "--filter", paths["filter"], "--port", "0"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    path = paths[flag.removeprefix("--")]
    assert err.startswith(f"error: {flag} {path}: ") and words in err, err


@pytest.mark.parametrize("roots", [True, False])
def test_job_endpoints_without_ray_jobs_answer_503_or_jobs_disabled(tmp_path: Path, roots: bool) -> None:
    """`capfilt serve` on a Ray without its dashboard has no Ray Jobs: the job endpoints say so (503),
    or, with jobs off anyway, 403 jobs_disabled as always; never a 500."""
    from fastapi.testclient import TestClient

    from capfilt.services.app import create_app

    dirs = dict(input_roots=(tmp_path,), output_roots=(tmp_path,)) if roots else {}
    app = create_app(ServeConfig(captioner="unused", filter="unused", **dirs), None, None)
    with TestClient(app, raise_server_exceptions=False) as client:
        answers = [
            client.get("/v1/jobs"),
            client.get("/v1/jobs/raysubmit_abc"),
            client.delete("/v1/jobs/raysubmit_abc"),
            client.post("/v1/jobs", json={"input": [str(tmp_path)], "output": str(tmp_path / "out")}),
        ]
    for answer in answers:
        if roots:
            assert answer.status_code == 503 and answer.json()["reason"] == "unavailable"
            assert "no dashboard" in answer.json()["detail"]
        else:
            assert answer.status_code == 403 and answer.json()["reason"] == "jobs_disabled"
