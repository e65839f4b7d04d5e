"""The labellers' web page and JSON HTTP API (FastAPI), with authentication and CSRF protection.

Authentication: every ``/api`` route except ``/api/login`` needs a labeller, either

* ``Authorization: Bearer <token>`` (scripts and tools; the per-labeller token made by
  ``python -m streamrl.services.feedback.admin labeller add NAME``), or
* the browser session cookie set by ``POST /api/login`` (``HttpOnly``, ``SameSite=Strict``,
  ``Secure`` under TLS), with, on every state-changing request, the session's CSRF token in
  the ``X-CSRF-Token`` header (synchronizer-token pattern) and, when the browser sends one, an
  ``Origin`` equal to this server's own. A cross-site form or script can make the browser send
  the cookie (same-site pages on another port can, whatever SameSite says) but can neither read
  the CSRF token nor set the header without a CORS preflight, which this server never approves.

Input: request bodies are JSON objects validated strictly (unknown keys, wrong types and values
outside the allowed set are refused with 422), at most :data:`MAX_BODY_BYTES`. Responses carry a
Content-Security-Policy that allows only this origin's scripts and styles, and no framing.

Routes (JSON unless said otherwise):

=========================  ===========================================================
``GET /``                  the page (HTML; its script is ``/static/app.js``)
``GET /healthz``           ``{"ok": true}`` (no authentication)
``POST /api/login``        ``{"token"}`` -> session cookie, ``{"labeller", "csrf_token"}``
``POST /api/logout``       ends the session
``GET /api/session``       ``{"labeller", "csrf_token"}`` of the current session
``GET /api/rollouts``      ``?after=SEQ&limit=N``: rollouts that streamed in after SEQ
``GET /api/groups/{id}``   the remembered completions of one group (for pairwise picks)
``POST /api/ratings``      ``{"rollout_id", "value": 1 | -1}`` -> 201 ``{"label_id", ...}``
``POST /api/preferences``  ``{"chosen", "rejected"}`` (same group) -> 201 ``{"label_id", ...}``
``GET /api/status``        labels, H-hat version, influence, the run's reward by version
``POST /api/influence``    ``{"active": true | false}``: start / pause the human influence
``GET /api/export``        ``?layout=preferences|ratings``: the labels as JSON lines
=========================  ===========================================================
"""

import hmac  # no `from __future__ import annotations`: FastAPI reads the route annotations at runtime
import json
import math
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Annotated, Literal, Protocol

from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, StrictInt, StringConstraints, field_validator

MAX_BODY_BYTES = 16 * 1024
"""Largest request body accepted, bytes."""
COOKIE = "streamrl_session"
"""Name of the session cookie."""
CSRF_HEADER = "x-csrf-token"
"""Header that must carry the session's CSRF token on state-changing cookie requests."""
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
STATIC = resources.files("streamrl.services.feedback") / "static"

Id = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class LabelError(Exception):
    """A label the backend refuses: ``status`` (404 unknown rollout, 409 not comparable) and a message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class Backend(Protocol):
    """What the web app needs from the feedback service."""

    def labeller_for_token(self, token: str) -> str | None: ...
    def labeller_enabled(self, name: str) -> bool: ...
    def recent(self, after: int, limit: int) -> list[dict]: ...
    def group(self, group_id: str) -> list[dict]: ...
    def rate(self, labeller: str, rollout_id: str, value: int) -> dict: ...
    def prefer(self, labeller: str, chosen: str, rejected: str) -> dict: ...
    def status(self) -> dict: ...
    def set_influence(self, labeller: str, active: bool) -> dict: ...
    def export(self, layout: str) -> list[dict]: ...
    def refused(self, reason: str) -> None: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LoginIn(_Strict):
    token: Annotated[str, StringConstraints(min_length=1, max_length=256)]


class RatingIn(_Strict):
    rollout_id: Id
    value: StrictInt  # Literal[-1, 1] would take 1.0 and True (equal to 1)

    @field_validator("value")
    @classmethod
    def _plus_or_minus_one(cls, value: int) -> int:
        if value not in (-1, 1):
            raise ValueError("a rating is 1 (good) or -1 (bad)")
        return value


class PreferenceIn(_Strict):
    chosen: Id
    rejected: Id


class InfluenceIn(_Strict):
    active: bool


@dataclass
class Session:
    labeller: str
    csrf: str
    expires: float


class Sessions:
    """Browser sessions in memory (a restart logs everyone out; labels are never in a session)."""

    def __init__(self, ttl_s: float):
        self.ttl_s = ttl_s
        self._lock = threading.Lock()
        self._by_id: dict[str, Session] = {}

    def create(self, labeller: str) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(32)
        session = Session(labeller, secrets.token_urlsafe(32), time.time() + self.ttl_s)
        with self._lock:
            now = time.time()
            self._by_id = {k: v for k, v in self._by_id.items() if v.expires > now}
            self._by_id[sid] = session
        return sid, session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            session = self._by_id.get(sid)
            if session is None or session.expires <= time.time():
                self._by_id.pop(sid, None)
                return None
            return session

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


class _BodyLimit:
    """ASGI middleware: refuse (413) a request whose body exceeds ``limit`` bytes, declared
    (``Content-Length``) or streamed (chunked). The body is read here, at most ``limit`` bytes
    of it, before the application sees the request, so an oversized chunked body is answered
    413 however the route would have parsed it."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        too_large = JSONResponse({"detail": f"request body over {self.limit} bytes"}, 413)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return None
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.limit:
                return await too_large(scope, receive, send)
            more = message.get("more_body", False)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the disconnect
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)


class RateLimit:
    """Labels a labeller may store: a token bucket per labeller (``rate`` labels per second on
    average, bursts of ``burst``). Thread-safe.

    Args:
        rate: sustained labels per second (> 0).
        burst: bucket size (>= 1).
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"RateLimit: rate ({rate}) must be > 0 and burst ({burst}) >= 1")
        self.rate, self.burst, self.clock = rate, burst, clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}  # labeller -> (tokens, at)

    def take(self, who: str) -> float:
        """Take one label from ``who``'s bucket: 0.0 when allowed, else the seconds until one is."""
        with self._lock:
            now = self.clock()
            tokens, at = self._buckets.get(who, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - at) * self.rate)
            if tokens >= 1.0:
                self._buckets[who] = (tokens - 1.0, now)
                return 0.0
            self._buckets[who] = (tokens, now)
            return (1.0 - tokens) / self.rate


def create_app(
    backend: Backend,
    *,
    session_ttl_s: float,
    secure_cookies: bool,
    label_rate_per_s: float = 5.0,
    label_burst: int = 20,
) -> "_BodyLimit":
    """The ASGI application of the feedback service: FastAPI (routes in the module docstring) inside
    the request-body limit.

    Args:
        backend: the service's side (rollouts, labels, status).
        session_ttl_s: lifetime of a browser session, seconds.
        secure_cookies: mark the session cookie ``Secure`` (HTTPS).
        label_rate_per_s: labels per second one labeller may store on average (``feedback.label_rate_per_s``);
            beyond it ``POST /api/ratings`` and ``/api/preferences`` answer 429 with ``Retry-After``.
        label_burst: labels one labeller may store in a burst (``feedback.label_burst``).
    """
    app = FastAPI(title="streamrl feedback", docs_url=None, redoc_url=None, openapi_url=None)
    sessions = Sessions(session_ttl_s)
    limit = RateLimit(label_rate_per_s, label_burst)

    @app.middleware("http")
    async def headers(request: Request, call_next: Callable):
        response = await call_next(request)
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
        )
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if request.url.path.startswith("/api"):
            response.headers["Cache-Control"] = "no-store"
        return response

    def own_origin(request: Request) -> str:
        return f"{request.url.scheme}://{request.headers.get('host', '')}"

    def refuse(reason: str, status: int, detail: str) -> HTTPException:
        backend.refused(reason)
        return HTTPException(status, detail)

    def labeller(request: Request) -> str:
        """The authenticated labeller (bearer token or session cookie + CSRF), else 401 / 403."""
        auth = request.headers.get("authorization", "")
        if auth:
            scheme, _, token = auth.partition(" ")
            name = backend.labeller_for_token(token.strip()) if scheme.lower() == "bearer" else None
            if name is None:
                raise refuse("bad_token", 401, "unknown or revoked token")
            return name
        sid = request.cookies.get(COOKIE)
        session = sessions.get(sid)
        if session is None:
            raise refuse("unauthenticated", 401, "log in first (POST /api/login) or send Authorization: Bearer TOKEN")
        if not backend.labeller_enabled(session.labeller):  # revoked since logging in: the session dies now
            sessions.drop(sid)
            raise refuse("revoked", 401, f"labeller {session.labeller} was revoked; this session has ended")
        if request.method not in SAFE_METHODS:
            origin = request.headers.get("origin")
            if origin is not None and origin != own_origin(request):
                raise refuse("cross_origin", 403, f"cross-origin request from {origin} refused")
            if not hmac.compare_digest(request.headers.get(CSRF_HEADER, ""), session.csrf):
                raise refuse("csrf", 403, "missing or wrong X-CSRF-Token")
        return session.labeller

    Labeller = Annotated[str, Depends(labeller)]

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(str(STATIC / "index.html"), media_type="text/html")

    app.mount("/static", StaticFiles(directory=str(STATIC)), name="static")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"ok": True}

    @app.post("/api/login")
    def login(body: LoginIn, request: Request, response: Response) -> dict:
        origin = request.headers.get("origin")
        if origin is not None and origin != own_origin(request):
            raise refuse("cross_origin", 403, f"cross-origin login from {origin} refused")
        name = backend.labeller_for_token(body.token)
        if name is None:
            time.sleep(0.2)  # slows token guessing
            raise refuse("bad_token", 401, "unknown or revoked token")
        sid, session = sessions.create(name)
        response.set_cookie(
            COOKIE, sid, max_age=int(session_ttl_s), httponly=True, samesite="strict", secure=secure_cookies, path="/"
        )
        return {"labeller": name, "csrf_token": session.csrf}

    @app.post("/api/logout")
    def logout(request: Request, response: Response, who: Labeller) -> dict:
        sessions.drop(request.cookies.get(COOKIE))
        response.delete_cookie(COOKIE, path="/")
        return {"labeller": who, "logged_out": True}

    @app.get("/api/session")
    def session(request: Request, who: Labeller) -> dict:
        current = sessions.get(request.cookies.get(COOKIE))
        return {"labeller": who, "csrf_token": current.csrf if current is not None else None}

    @app.get("/api/rollouts")
    def rollouts(
        who: Labeller, after: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=500)] = 50
    ) -> dict:
        items = backend.recent(after, limit)
        return {"rollouts": items, "cursor": items[-1]["seq"] if items else after}

    @app.get("/api/groups/{group_id}")
    def group(group_id: Id, who: Labeller) -> dict:
        return {"group_id": group_id, "rollouts": backend.group(group_id)}

    def labelled(who: str, action: Callable[[], dict]) -> JSONResponse:
        wait_s = limit.take(who)
        if wait_s > 0:
            backend.refused("rate_limited")
            return JSONResponse(
                {
                    "detail": f"{who}: more than {label_rate_per_s:g} labels per second (bursts of "
                    f"{label_burst}); retry in {wait_s:.1f}s"
                },
                status_code=429,
                headers={"Retry-After": str(max(1, math.ceil(wait_s)))},
            )
        try:
            return JSONResponse(action(), status_code=201)
        except LabelError as err:
            backend.refused("label")
            raise HTTPException(err.status, str(err)) from None

    @app.post("/api/ratings", status_code=201)
    def rate(body: RatingIn, who: Labeller) -> JSONResponse:
        return labelled(who, lambda: backend.rate(who, body.rollout_id, body.value))

    @app.post("/api/preferences", status_code=201)
    def prefer(body: PreferenceIn, who: Labeller) -> JSONResponse:
        return labelled(who, lambda: backend.prefer(who, body.chosen, body.rejected))

    @app.get("/api/status")
    def status(who: Labeller) -> dict:
        return {"labeller": who, **backend.status()}

    @app.post("/api/influence")
    def influence(body: InfluenceIn, who: Labeller) -> dict:
        return backend.set_influence(who, body.active)

    @app.get("/api/export")
    def export(who: Labeller, layout: Literal["preferences", "ratings"] = "preferences") -> StreamingResponse:
        rows = backend.export(layout)
        return StreamingResponse(
            (json.dumps(row) + "\n" for row in rows),
            media_type="application/x-ndjson",
            headers={"Content-Disposition": f'attachment; filename="{layout}.jsonl"'},
        )

    return _BodyLimit(app, MAX_BODY_BYTES)
