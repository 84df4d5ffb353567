"""HTTP transport to the generation server (``nemo-igrpo serve``): JSON requests with the shared bearer token, and
retries.

Every request carries the shared token as a bearer token. Unreachable servers (starting, restarting) and 5xx
answers are retried with exponential backoff for ``generation.server.retry_budget_s`` seconds, then the step fails
with :class:`ServerUnavailableError` naming the URL and the last error — before the optimizer step, so the newest
checkpoint is untouched. A 4xx answer (a wrong token, a bad request) fails at once with :class:`ServerRequestError`.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

_MAX_BACKOFF_S = 10.0


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """The server API never redirects; following one would send the bearer token to wherever it points (urllib
    forwards every header but the content ones), so a redirect is an error naming its target."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None  # urllib then raises the 3xx as an HTTPError


_OPENER = urllib.request.build_opener(_NoRedirects())


class ServerUnavailableError(RuntimeError):
    """The generation server did not answer within the retry budget."""


class ServerRestartedError(RuntimeError):
    """The server no longer holds the weights last sent to it (it restarted): its samples would be stale."""


class ServerRequestError(RuntimeError):
    """The server answered, but refused the request (bad token, bad input): retrying would not help."""


class ServerHTTPClient:
    """JSON requests to one server, within a retry budget; the base of the generation-server client."""

    def __init__(self, url: str, token: str, *, retry_budget_s: float = 300.0, request_timeout_s: float = 3600.0):
        if not token:
            raise ValueError("the generation server needs a shared token (generation.server.token_env)")
        self.url = url.rstrip("/")
        self.token = token
        self.retry_budget_s = retry_budget_s
        self.request_timeout_s = request_timeout_s
        self._model_name: str | None = None

    def _request(self, method: str, path: str, body: dict | None = None, timeout: float | None = None,
                 retry_errors: bool = True, text: bool = False):
        """One JSON request with retries on connection errors and 5xx answers, within the retry budget. With
        ``retry_errors=False`` a 5xx answer fails at once (a weight-transfer step that raised would raise again);
        ``text``: the answer is returned as text (``/metrics``), not parsed."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        deadline = time.monotonic() + self.retry_budget_s
        delay, attempt = 0.5, 0
        while True:
            attempt += 1
            request = urllib.request.Request(f"{self.url}{path}", data=data, headers=headers, method=method)
            try:
                with _OPENER.open(request, timeout=timeout or self.request_timeout_s) as response:
                    payload = response.read()
                    if text:
                        return payload.decode(errors="replace")
                    return json.loads(payload) if payload else None
            except urllib.error.HTTPError as error:
                detail = error.read().decode(errors="replace")[:500]
                if error.code == 401:
                    raise ServerRequestError(f"generation server {self.url} refused the token (HTTP 401): the "
                                             "client's and the server's token must be equal "
                                             "(generation.server.token_env)") from None
                if 300 <= error.code < 400:
                    raise ServerRequestError(
                        f"generation server {self.url}{path}: HTTP {error.code} redirect to "
                        f"{error.headers.get('Location')!r}, not followed (it would carry the token there); set "
                        "generation.server.url to the server's own address") from None
                if error.code < 500 or not retry_errors:
                    raise ServerRequestError(f"generation server {self.url}{path}: HTTP {error.code}: "
                                             f"{detail}") from None
                last = f"HTTP {error.code}: {detail}"
            # HTTPException: the server died while sending its answer (IncompleteRead), which is worth a retry too
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError, http.client.HTTPException) as error:
                last = f"{type(error).__name__}: {getattr(error, 'reason', error)}"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ServerUnavailableError(
                    f"generation server {self.url} did not answer {method} {path} within "
                    f"generation.server.retry_budget_s={self.retry_budget_s:g} s ({attempt} attempts); last error: "
                    f"{last}. Is it running (`nemo-igrpo serve`), and is generation.server.url right?")
            log.warning("generation server %s%s: %s; retrying in %.1f s", self.url, path, last, min(delay, remaining))
            time.sleep(min(delay, remaining) * (0.8 + 0.4 * random.random()))  # jitter: clients do not retry in step
            delay = min(delay * 2, _MAX_BACKOFF_S)

    def model_name(self) -> str:
        if self._model_name is None:
            models = self._request("GET", "/v1/models", timeout=30)
            self._model_name = models["data"][0]["id"]
        return self._model_name

    def wait_until_ready(self) -> None:
        """Block until the server serves (within the retry budget)."""
        self.model_name()
