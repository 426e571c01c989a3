"""One table of every error the app returns: code -> HTTP status, default message, retry hint.

Keeping the table in one place means the HTTP layer, the logs and the tests all agree on
which codes exist; nothing else in the app invents a status code for a failure.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorSpec:
    status: int
    message: str
    retryable: bool = False   # True -> the response carries Retry-After


ERRORS: dict[str, ErrorSpec] = {
    "BAD_REQUEST": ErrorSpec(400, "request body is not a valid TTS request"),
    "TEXT_EMPTY": ErrorSpec(400, "text is empty"),
    "TEXT_TOO_LONG": ErrorSpec(413, "text is longer than the configured maximum"),
    "BODY_TOO_LARGE": ErrorSpec(413, "request body is larger than the configured maximum"),
    "REQUEST_TIMEOUT": ErrorSpec(408, "request body was not received in time"),
    "TEXT_INVALID_CHARS": ErrorSpec(422, "text contains control or invalid characters"),
    "VOICE_UNKNOWN": ErrorSpec(422, "voice is not offered by this backend"),
    "LANG_UNSUPPORTED": ErrorSpec(422, "language is not supported"),
    "JOB_NOT_FOUND": ErrorSpec(404, "no job with this id"),
    "NOT_FOUND": ErrorSpec(404, "no such route"),
    "METHOD_NOT_ALLOWED": ErrorSpec(405, "method not allowed on this route"),
    "IDEMPOTENCY_CONFLICT": ErrorSpec(
        409, "Idempotency-Key was already used with a different request body"),
    "QUEUE_FULL": ErrorSpec(429, "synthesis queue is full; retry later", retryable=True),
    "RATE_LIMITED": ErrorSpec(429, "per-client rate limit exceeded", retryable=True),
    "INGRESS_CLOSED": ErrorSpec(503, "ingress closed by the resource gate", retryable=True),
    "GPU_OOM": ErrorSpec(503, "model ran out of accelerator memory", retryable=True),
    "MODEL_ERROR": ErrorSpec(503, "model failed to synthesize this request", retryable=True),
    "MODEL_NOT_READY": ErrorSpec(503, "model is not loaded or warmed up yet", retryable=True),
    "SHUTTING_DOWN": ErrorSpec(503, "service is draining for shutdown", retryable=True),
    "INTERNAL": ErrorSpec(500, "internal error"),
}


class AppError(Exception):
    """An error with a code from ERRORS; the HTTP layer renders it as the JSON error body."""

    def __init__(self, code: str, message: str | None = None,
                 retry_after_s: int | None = None) -> None:
        if code not in ERRORS:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.spec = ERRORS[code]
        self.message = message or self.spec.message
        self.retry_after_s = retry_after_s
        super().__init__(f"{code}: {self.message}")

    @property
    def status(self) -> int:
        return self.spec.status


class SynthesisError(Exception):
    """Raised by a backend when synthesis fails; ``stage`` is where it failed (for the logs).

    ``code`` should be GPU_OOM or MODEL_ERROR (anything else is reported as MODEL_ERROR).
    """

    def __init__(self, code: str, message: str, stage: str | None = None) -> None:
        self.code = code if code in ("GPU_OOM", "MODEL_ERROR", "MODEL_NOT_READY") \
            else "MODEL_ERROR"
        self.message = message
        self.stage = stage
        super().__init__(f"{self.code}: {message}")
