"""Bearer-token checks. A route guarded by an unset token is open; a set one needs
`Authorization: Bearer <token>`, compared in constant time so timing leaks nothing about it.
"""
from __future__ import annotations

import hmac

from pydantic import SecretStr

from service.errors import Unauthorized


def require_bearer(authorization: str | None, expected: SecretStr | None, what: str) -> None:
    """Raise Unauthorized unless `authorization` is 'Bearer <expected>' (or no token is configured)."""
    if expected is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not presented.strip():
        raise Unauthorized(f"{what} needs an 'Authorization: Bearer <token>' header")
    if not hmac.compare_digest(presented.strip().encode(), expected.get_secret_value().encode()):
        raise Unauthorized(f"the bearer token given for {what} is not valid")
