"""POST /v1/caption, /v1/score, /v1/capfilt: one image at a time, micro-batched in the actors."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from capfilt.curate import sample_seed
from capfilt.ledger import ok_row

from .actors import CAPTIONER, FILTER, ModelInfo
from .deps import ConfigDep, ModelsDep, require_key_if_all
from .errors import ClientError
from .requests import body, image_pixels, openapi_body
from .schemas import (
    CapfiltRequest,
    CapfiltResponse,
    CaptionRequest,
    CaptionResponse,
    ErrorBody,
    KeptText,
    ScoreRequest,
    ScoreResponse,
    TextScore,
)

ERRORS = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (400, "empty body, invalid JSON, an image that cannot be decoded, settings the model cannot do"),
        (401, "missing or wrong API key (with --auth all)"),
        (408, "a request body that stalled or came too slowly"),
        (413, "body or image over the limits"),
        (415, "a Content-Type other than JSON or multipart"),
        (503, "the models are still loading"),
    )
}
ERRORS[422] = {
    "description": "a field outside its bounds (`detail`: FastAPI's list of {loc, msg, type})",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}
router = APIRouter(
    prefix="/v1", tags=["inference"], dependencies=[Depends(require_key_if_all)], responses=ERRORS
)


def _check_tokens(max_tokens: int, info: ModelInfo) -> None:
    if max_tokens > info.max_tokens:
        raise ClientError(
            400, f"max_tokens={max_tokens} is more than this captioner's positions allow ({info.max_tokens})"
        )


@router.post("/caption", openapi_extra=openapi_body(CaptionRequest))
async def caption(
    models: ModelsDep, config: ConfigDep, request: Annotated[CaptionRequest, Depends(body(CaptionRequest))]
) -> CaptionResponse:
    """K captions for one image: nucleus sampling (BLIP's CapFilt), beam search or greedy."""
    info = models.info[CAPTIONER]
    _check_tokens(request.max_tokens, info)
    pixels = await image_pixels(request.image, config.max_image_pixels, [info.image_size])
    captions = await models.caption(pixels[info.image_size], request.generation(), request.seed)
    return CaptionResponse(captions=captions, captioner_id=info.digest)


@router.post("/score", openapi_extra=openapi_body(ScoreRequest, list_fields=("texts",)))
async def score(
    models: ModelsDep, config: ConfigDep, request: Annotated[ScoreRequest, Depends(body(ScoreRequest))]
) -> ScoreResponse:
    """ITM p(match) (with [ENC]) and ITC similarity of each text, as `capfilt score` gives them."""
    info = models.info[FILTER]
    pixels = await image_pixels(request.image, config.max_image_pixels, [info.image_size])
    scores = await models.score(pixels[info.image_size], request.texts, clean_text=not request.raw_text)
    return ScoreResponse(
        scores=[TextScore(text=s.text, itm=s.itm, itc=s.itc) for s in scores], filter_id=info.digest
    )


@router.post("/capfilt", openapi_extra=openapi_body(CapfiltRequest))
async def capfilt(
    models: ModelsDep, config: ConfigDep, request: Annotated[CapfiltRequest, Depends(body(CapfiltRequest))]
) -> CapfiltResponse:
    """What `capfilt clean` decides for this sample: synthetic captions seeded from (seed, key), every
    score, what is kept and why; the fields of the job's ledger row for the same key and seed."""
    cap, filt = models.info[CAPTIONER], models.info[FILTER]
    generation = request.generation()
    _check_tokens(generation.max_tokens, cap)
    pixels = await image_pixels(request.image, config.max_image_pixels, [cap.image_size, filt.image_size])
    # the job's caption stage: `curate.caption_samples` seeds each sample with sample_seed(seed, key)
    synthetic = await models.caption(
        pixels[cap.image_size], generation, sample_seed(request.seed, request.key)
    )
    curated = await models.decide(
        pixels[filt.image_size], request.key, request.text, synthetic, request.threshold
    )
    row = ok_row(
        curated,
        shard="",
        url=None,
        threshold=request.threshold,
        captioner_id=cap.digest,
        filter_id=filt.digest,
        seed=request.seed,
    )
    kept = [KeptText(origin=o, text=t, itm=i) for o, t, i in curated.decision.kept_texts]  # type: ignore[arg-type]
    fields = set(CapfiltResponse.model_fields) - {"kept"}
    return CapfiltResponse(kept=kept, **{k: row[k] for k in fields})
