"""One JSON POST with retries, for the reward server and the LLM judge: the retry rule and the errors they share."""

from __future__ import annotations

import http.client
import time


def post_json(url: str, body: bytes, headers: dict, *, timeout_s: float, max_retries: int, backoff_s: float, what: str,
              error: type[Exception], hint: str) -> bytes:
    """POST ``body`` to ``url``; the raw answer. Timeouts, refused connections, 429 and 5xx are retried
    (``max_retries`` times, backoff doubling from ``backoff_s``); another HTTP status raises at once. Errors are
    ``error`` and start with ``what`` (e.g. "reward server URL"); ``hint`` says what to raise after the retries."""
    import urllib.error
    import urllib.request

    last = ""
    for attempt in range(max_retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        req = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            try:
                detail = e.read()[:200].decode(errors="replace").strip()
            except (OSError, http.client.HTTPException):
                detail = ""
            if e.code == 429 or e.code >= 500:
                last = f"HTTP {e.code} {detail}".strip()
                continue
            raise error(f"{what} answered HTTP {e.code}: {detail}") from None
        except (TimeoutError, urllib.error.URLError, http.client.HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            last = (f"no answer within {timeout_s:g} s" if isinstance(reason, TimeoutError) or "timed out" in str(reason)
                    else f"cannot connect ({reason})")
    raise error(f"{what}: {last} (after {max_retries + 1} attempts; {hint})")
