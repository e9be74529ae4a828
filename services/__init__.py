"""The REST service: caption and score single pairs, submit and watch cleaning jobs.

Along the request path:

    config    ServeConfig: every option of `capfilt serve`, validated once
    batching  MicroBatcher: requests that arrive within a few milliseconds share one forward pass
    actors    the Ray actors hosting `Captioner` / `Filter` (the cleaning job's classes) and the
              router that spreads requests over `--replicas` of them
    schemas   the pydantic request and response bodies (the OpenAPI schema is made from them)
    requests  JSON-or-multipart bodies, image decoding under the pixel limit
    limits    the request body limit; deps: the routes' dependencies, the API key check
    jobs      `capfilt clean` through Ray Jobs: paths confined to roots, progress from the manifest
    metrics   Prometheus: requests, latencies, batch sizes, jobs by state
    errors    every error a client causes becomes a 4xx with a message
    routes_*  one router per resource; app.py only assembles them
    serve_cli `capfilt serve`; bench and bench_cli `capfilt bench serve` (docs/service.md)
"""
