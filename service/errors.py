"""The service room's one exception family. Each carries the HTTP status and a message that says
what is wrong and what to do; the HTTP layer translates them in one place (`error_responses.error_response`).
"""
from __future__ import annotations


class ServiceError(Exception):
    """A request or the service state refuses an operation. `status` is the HTTP status to answer."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, status: int | None = None, **detail):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code
        if status:
            self.status = status
        self.detail = detail

    def as_json(self) -> dict:
        body = {"error": self.code, "message": self.message}
        if self.detail:
            body["detail"] = self.detail
        return body


class ConfigError(ServiceError):
    """Settings that cannot be used; raised at start, before any request."""

    code = "invalid_config"


class BadRequest(ServiceError):
    status = 400
    code = "bad_request"


class Unauthorized(ServiceError):
    status = 401
    code = "unauthorized"


class NotFound(ServiceError):
    status = 404
    code = "not_found"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class Unprocessable(ServiceError):
    """Well-formed request whose content cannot be used: an undecodable image, an unknown label."""

    status = 422
    code = "unprocessable"


class NotReady(ServiceError):
    """No model is loaded yet (first start with no production alias, or it failed to load)."""

    status = 503
    code = "not_ready"
