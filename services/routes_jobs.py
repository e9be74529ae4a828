"""/v1/jobs: `capfilt clean` jobs through Ray Jobs (guarded by the API key when there is one)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from starlette.concurrency import run_in_threadpool

from .deps import JobsDep, require_key
from .requests import body, openapi_json_body
from .schemas import ErrorBody, JobInfo, JobList, JobLogs, JobRequest

ERRORS = {
    code: {"model": ErrorBody, "description": why}
    for code, why in (
        (
            400,
            "empty body, invalid JSON, options `capfilt clean` refuses (a checkpoint of the wrong role), "
            "a relative or missing path",
        ),
        (401, "missing or wrong API key"),
        (403, "jobs disabled (no roots), or a path outside the roots"),
        (404, "no such CapFilt job"),
        (
            409,
            "output not empty (without resume), output overlapping an unfinished job's, "
            "or the job has already ended",
        ),
        (408, "a request body that stalled or came too slowly"),
        (413, "body over the limit"),
        (415, "a Content-Type other than JSON"),
        (503, "Ray Jobs cannot be reached"),
    )
}
ERRORS[422] = {
    "description": "a field outside its bounds (`detail`: FastAPI's list of {loc, msg, type})",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}},
}
router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_key)], responses=ERRORS)


@router.post("", status_code=201, openapi_extra=openapi_json_body(JobRequest))
async def submit_job(
    jobs: JobsDep, request: Annotated[JobRequest, Depends(body(JobRequest, multipart=False))]
) -> JobInfo:
    """Submit a cleaning job: the options of `capfilt clean`, run by Ray Jobs on the service's cluster."""
    return await run_in_threadpool(jobs.submit, request)


@router.get("")
async def list_jobs(jobs: JobsDep) -> JobList:
    """This service's cleaning jobs, newest first."""
    return JobList(jobs=await run_in_threadpool(jobs.list))


@router.get("/{job_id}")
async def get_job(job_id: str, jobs: JobsDep) -> JobInfo:
    """State (Ray's), progress counted from the job's manifest and stats, the dashboard link."""
    return await run_in_threadpool(jobs.get, job_id)


@router.get("/{job_id}/logs")
async def job_logs(
    job_id: str,
    jobs: JobsDep,
    tail: Annotated[int | None, Query(ge=0, le=100_000, description="only the last N lines")] = None,
) -> JobLogs:
    """The job driver's output (the last million characters at most)."""
    return JobLogs(id=job_id, logs=await run_in_threadpool(jobs.logs, job_id, tail))


@router.delete("/{job_id}", status_code=202)
async def stop_job(job_id: str, jobs: JobsDep) -> JobInfo:
    """Stop a running job (Ray Jobs stops its driver; finished shards stay, resumable)."""
    return await run_in_threadpool(jobs.stop, job_id)
