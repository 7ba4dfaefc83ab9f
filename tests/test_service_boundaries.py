"""What the service lets in: bearer tokens on guarded routes, and no torch in its imports."""
from __future__ import annotations

import pytest
from pydantic import SecretStr

from service.auth import require_bearer
from service.errors import Unauthorized


def test_bearer_token_checks():
    token = SecretStr("t" * 24)
    require_bearer(None, None, "/x")  # no token configured: open
    require_bearer("Bearer " + "t" * 24, token, "/x")
    for header in (None, "", "Basic abc", "Bearer", "Bearer " + "t" * 23, "bearer " + "u" * 24):
        with pytest.raises(Unauthorized):
            require_bearer(header, token, "/x")


def test_the_service_imports_no_torch():
    import subprocess
    import sys

    code = ("import sys; import service.service, service.runtime, service.http_app, exporters.prediction_log.records; "
            "bad = [m for m in ('torch', 'torchvision', 'training') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
