"""Fail fast when the Hugging Face Hub is needed but cannot be reached.

Offline, `transformers` and `datasets` retry each request with back-off for about 25 seconds
before giving up, once per file. A single short connection probe turns that into an immediate,
actionable error.
"""

from __future__ import annotations

import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from ensemble.errors import EnsembleError

PROBE_TIMEOUT_S = 5.0


def is_local(name: str) -> bool:
    return Path(name).expanduser().exists()


def looks_like_path(name: str) -> bool:
    """A name no Hub id can have (Hub ids are `name` or `namespace/name`): so it was meant as a
    local path, and a missing one is a typo, not a reason to contact the Hub."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def require_local_or_hub(kind: str, key: str, name: str, fix: str) -> None:
    """Check that ``name`` exists locally, or else that it can be fetched from the Hub."""
    if is_local(name):
        return
    if looks_like_path(name):
        raise EnsembleError(f"{key}: {kind} directory {name} not found; fix the path")
    require_hub(kind, name, fix)


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes", "on"}


@lru_cache(maxsize=1)
def hub_reachable() -> tuple[bool, str]:
    """(reachable, reason). Cached: one probe per process."""
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    url = urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True, ""
    except OSError as e:
        return False, f"{host}:{port}: {e.strerror or e}"


def require_hub(kind: str, name: str, fix: str) -> None:
    """Raise a one-line error if ``name`` (a Hub id for a ``kind``) cannot be fetched.

    Anything already in the local Hugging Face cache is used without a probe when
    ``HF_HUB_OFFLINE=1`` is set; otherwise the Hub must answer.
    """
    if offline_mode():
        return  # the libraries will read the local cache and fail fast themselves
    ok, reason = hub_reachable()
    if not ok:
        raise EnsembleError(
            f"cannot reach the Hugging Face Hub to fetch {kind} '{name}' ({reason}); {fix}, "
            "or set HF_HUB_OFFLINE=1 if it is already in your Hugging Face cache"
        )
