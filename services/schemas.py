"""Request and response bodies. The OpenAPI schema (`/docs`) is made from these models, so their
bounds are the API's: a request outside them is a 422 naming the field."""

from __future__ import annotations

import base64
import binascii
import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from capfilt.inference import capfilt_sampling
from capfilt.ledger import MAX_SEED
from capfilt.model.generate import GenerationConfig
from capfilt.pipelines.clean_inputs import key_problem
from capfilt.pipelines.clean_resources import gpu_share_problem

MAX_TEXTS = 64  # texts per /v1/score request
MAX_TEXT_CHARS = 10_000  # the filter reads 35 tokens of a text; web texts can be long, not this long
_DATA_URL = re.compile(r"^data:[^,]*;base64,", re.IGNORECASE)  # media type and parameters: any but a comma
_WHITESPACE = re.compile(r"\s+", re.ASCII)  # the line breaks `base64` and MIME encoders put every 76 chars


def _image_bytes(value: Any) -> Any:
    """JSON carries the image as base64 (line breaks and a data: URL prefix are allowed); multipart as
    the file."""
    if isinstance(value, str):
        text = _DATA_URL.sub("", _WHITESPACE.sub("", value), count=1)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError) as err:
            raise ValueError(
                f"image is not valid base64 ({err}): send the image file base64-encoded, "
                "optionally as a data:<type>;base64, URL"
            ) from err
    return value


def _usable_key(value: str) -> str:
    """The cleaning job's rule for keys: one it would mark invalid_key is refused here too."""
    problem = key_problem(value)
    if problem is not None:
        raise ValueError(f"{problem}: the cleaning job marks such a sample invalid_key")
    return value


def _ray_gpu_share(value: float) -> float:
    problem = gpu_share_problem(value)
    if problem is not None:
        raise ValueError(problem)
    return value


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("a path cannot hold a NUL character")
    return value


# pydantic refuses strings UTF-8 cannot carry (the lone surrogates JSON can): they cannot be tokenised
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Probability = Annotated[float, Field(ge=0.0, le=1.0)]
TopP = Annotated[float, Field(gt=0.0, le=1.0, description="nucleus probability mass")]
TopK = Annotated[
    int, Field(ge=0, le=100_000, description="sample among the top-k tokens only, 0 for all (BLIP's: 50)")
]
NumCaptions = Annotated[int, Field(ge=1, le=16, description="K: captions per image")]
ImageBytes = Annotated[
    bytes,
    BeforeValidator(_image_bytes),
    Field(description="the image file: base64 in a JSON body, the file part in multipart/form-data"),
]
Key = Annotated[
    str,
    Field(
        min_length=1,
        max_length=256,
        json_schema_extra={"pattern": r"^[^./\x00]+$"},  # documents `_usable_key`, which words the error
        description="the sample's key (img2dataset's): seeds its captions; no '.', '/' or NUL, as in the job",
    ),
    AfterValidator(_usable_key),
]
PathText = Annotated[str, Field(min_length=1, max_length=4096), AfterValidator(_no_nul)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CaptionRequest(_Request):
    """Captions for one image. Defaults follow BLIP's CapFilt sampling, as `capfilt caption` does."""

    image: ImageBytes
    method: Literal["nucleus", "beam", "greedy"] = Field("nucleus", description="decoding")
    num_captions: NumCaptions = 1
    num_beams: int = Field(3, ge=1, le=8, description="beam width (beam search)")
    top_p: TopP = 0.9
    top_k: TopK = 50
    temperature: float = Field(1.0, gt=0.0, le=10.0, description="sampling temperature (nucleus)")
    repetition_penalty: float | None = Field(
        None, gt=0.0, le=10.0, description="default: 1.1 for nucleus (BLIP's CapFilt), else 1.0"
    )
    max_tokens: int = Field(
        30, ge=1, le=512, description="most caption tokens after the prompt, [SEP] included"
    )
    min_tokens: int = Field(5, ge=0, le=512, description="fewest caption tokens before [SEP]")
    seed: Seed = Field(0, description="nucleus sampling seed (the CLI's --seed for its first image)")

    def generation(self) -> GenerationConfig:
        """The same GenerationConfig `capfilt caption` builds from the same options."""
        penalty = self.repetition_penalty
        if penalty is None:
            penalty = 1.1 if self.method == "nucleus" else 1.0
        return GenerationConfig(
            method=self.method,
            num_captions=self.num_captions,
            num_beams=self.num_beams,
            top_p=self.top_p,
            top_k=self.top_k,
            temperature=self.temperature,
            repetition_penalty=penalty,
            max_tokens=self.max_tokens,
            min_tokens=self.min_tokens,
            seed=self.seed,
        )

    @model_validator(mode="after")
    def _consistent(self) -> CaptionRequest:
        try:
            self.generation().validate()
        except ValueError as err:  # names the field: "GenerationConfig.min_tokens=40: must be ..."
            raise ValueError(str(err).replace("GenerationConfig.", "")) from err
        return self


class CaptionResponse(BaseModel):
    captions: list[str] = Field(description="K captions, the prompt stripped")
    captioner_id: str = Field(description="the captioner checkpoint's digest")


class ScoreRequest(_Request):
    """ITM and ITC of texts against one image, as `capfilt score` computes them."""

    image: ImageBytes
    texts: list[Text] = Field(min_length=1, max_length=MAX_TEXTS, description="texts to score")
    raw_text: bool = Field(False, description="score texts as given, without BLIP's caption cleaning")


class TextScore(BaseModel):
    text: str
    itm: float = Field(description="softmax(ITM logits)[match], computed with [ENC]")
    itc: float = Field(description="cosine of the ITC projections")


class ScoreResponse(BaseModel):
    scores: list[TextScore]
    filter_id: str = Field(description="the filter checkpoint's digest")


class CapfiltRequest(_Request):
    """One web sample through CapFilt exactly as `capfilt clean` treats it: the synthetic captions are
    seeded from (seed, key), so the same key and seed give the job's ledger row."""

    image: ImageBytes
    text: Text | None = Field(None, description="the web text (none or blank: not scored, never kept)")
    key: Key
    seed: Seed = Field(0, description="the job seed (`capfilt clean --seed`)")
    threshold: Probability = Field(0.5, description="keep texts with ITM p(match) above it")
    num_captions: NumCaptions = 1
    top_p: TopP = 0.9
    top_k: TopK = 50

    def generation(self) -> GenerationConfig:
        """BLIP's CapFilt sampling with this K, top-p and top-k: what `CleanConfig.generation()` gives."""
        return capfilt_sampling(
            num_captions=self.num_captions, top_p=self.top_p, top_k=self.top_k, seed=self.seed
        )


class Candidate(BaseModel):
    text: str
    itm: float
    itc: float


class KeptText(BaseModel):
    origin: Literal["web", "synthetic"]
    text: str
    itm: float


class CapfiltResponse(BaseModel):
    """The fields of the cleaning job's ledger row for this sample (`capfilt.ledger.ok_row`)."""

    key: str
    status: Literal["ok"] = "ok"
    reason: str = Field(description="the decision's reason code (capfilt.decision.REASONS)")
    web_text: str | None
    web_itm: float | None = Field(description="null when the web text is missing or blank")
    web_itc: float | None
    web_kept: bool
    synthetic: list[Candidate] = Field(description="the K candidates in sampling order")
    synthetic_kept: list[str] = Field(description="kept candidates, best first")
    kept: list[KeptText] = Field(description="every pair this image gives D'")
    threshold: float
    captioner_id: str
    filter_id: str
    seed: int


class JobRequest(_Request):
    """A `capfilt clean` job: the same options as the command line (`capfilt clean --help`).

    Paths must resolve (symlinks and `..` followed) under the service's input roots (inputs,
    human shards, checkpoints) or output roots (output)."""

    input: list[PathText] = Field(
        min_length=1, max_length=10_000, description="shards: files, directories, globs"
    )
    output: PathText = Field(description="a new or empty directory (or the job's own with resume)")
    human: list[PathText] | None = Field(None, max_length=10_000, description="human-annotated shards for D'")
    threshold: Probability | None = Field(None, description="keep texts above it (default 0.5)")
    keep_fraction: float | None = Field(None, gt=0.0, le=1.0, description="instead of a threshold")
    num_captions: NumCaptions = 1
    top_p: TopP = 0.9
    top_k: TopK = 50
    batch_size: int | None = Field(
        None,
        ge=1,
        le=4096,
        description="images per model batch (default: on CPUs up to 128 as the captioner's memory allows; 32 on GPUs)",
    )
    num_gpus: Annotated[float, AfterValidator(_ray_gpu_share)] | None = Field(
        None,
        ge=0.0,
        le=64.0,
        description="GPUs per model actor: 0 for CPUs only, a share of one GPU (at least 0.0001), or whole "
        "GPUs (default: from the cluster)",
    )
    captioner_actors: int | None = Field(None, ge=1, le=1024, description="default: from the cluster")
    filter_actors: int | None = Field(None, ge=1, le=1024, description="default: from the cluster")
    writers: int | None = Field(
        None, ge=1, le=8, description="processes writing finished shards (default: from the cluster's GPUs)"
    )
    resume: bool = Field(False, description="continue the job in `output`, skipping finished shards")
    seed: Seed = 0
    precision: Literal["exact", "fast"] = Field(
        "exact",
        description="fast: bf16 on GPUs (fp16 before Ampere) and CPUs with AMX, int8 on other CPUs (agreement: docs/benchmarks.md)",
    )
    captioner: PathText | None = Field(None, description="default: the service's captioner")
    filter: PathText | None = Field(None, description="default: the service's filter")

    @model_validator(mode="after")
    def _one_threshold(self) -> JobRequest:
        if self.threshold is not None and self.keep_fraction is not None:
            raise ValueError("threshold and keep_fraction exclude each other: give one")
        return self


class JobProgress(BaseModel):
    """Counted from the job's manifest.jsonl and stats/ (finished shards only)."""

    shards_total: int | None
    shards_done: int
    samples_done: int = Field(description="web samples in finished shards")
    web_kept: int
    synthetic_kept: int
    dprime_pairs: int
    status: dict[str, int]
    reasons: dict[str, int]
    read_errors: dict[str, str] = Field(
        default_factory=dict,
        description="input shard -> why it could not be read to its end (its samples up to there count)",
    )


class JobSummary(BaseModel):
    id: str
    state: str = Field(description="Ray's job status: PENDING, RUNNING, STOPPED, SUCCEEDED or FAILED")
    output: str
    submitted_at: float | None = Field(description="Unix time in seconds")
    ended_at: float | None
    dashboard: str = Field(description="the job's page in the Ray dashboard")


class JobInfo(JobSummary):
    message: str | None
    entrypoint: str
    progress: JobProgress | None
    summary: dict[str, Any] | None = Field(
        None,
        description="a SUCCEEDED job's summary, as `capfilt clean` prints it (OUT/summary.json): totals, "
        "the threshold used, read errors, timings, resources, where D', the ledger and the report are",
    )


class JobList(BaseModel):
    jobs: list[JobSummary]


class JobLogs(BaseModel):
    id: str
    logs: str


class ErrorBody(BaseModel):
    """Every error but a request validation error (422): what was wrong, in words."""

    detail: str
    reason: str | None = Field(None, description="a machine-readable code where there is one")


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Ready(BaseModel):
    ready: bool
    captioner_id: str | None = None
    filter_id: str | None = None
