"""The page's HTTP API served by uvicorn on loopback: authentication, CSRF, validation, limits."""

from __future__ import annotations

import time

import pytest
import requests

from feedback_support import serving
from streamrl.services.feedback.web import MAX_BODY_BYTES, LabelError, create_app

TOKEN = "alice-token"


class FakeBackend:
    def __init__(self):
        self.labels, self.refusals, self.influence, self.revoked = [], [], True, set()

    def labeller_for_token(self, token):
        return "alice" if token == TOKEN and "alice" not in self.revoked else None

    def labeller_enabled(self, name):
        return name == "alice" and name not in self.revoked

    def recent(self, after, limit):
        return [{"seq": after + 1, "rollout_id": "r1"}][:limit]

    def group(self, group_id):
        return [{"rollout_id": "r1", "group_id": group_id}]

    def rate(self, labeller, rollout_id, value):
        if rollout_id == "gone":
            raise LabelError(404, "rollout 'gone' is not among the recent")
        self.labels.append((labeller, rollout_id, value))
        return {"label_id": len(self.labels)}

    def prefer(self, labeller, chosen, rejected):
        self.labels.append((labeller, chosen, rejected))
        return {"label_id": len(self.labels)}

    def status(self):
        return {"labels": {"total": len(self.labels)}}

    def set_influence(self, labeller, active):
        self.influence = active
        return {"influence_active": active}

    def export(self, layout):
        return [{"layout": layout, "i": i} for i in range(3)]

    def refused(self, reason):
        self.refusals.append(reason)


@pytest.fixture
def server(request):
    backend = FakeBackend()
    with serving(create_app(backend, session_ttl_s=60, secure_cookies=False, **getattr(request, "param", {}))) as url:
        yield url, backend


def login(url) -> tuple[requests.Session, str, requests.Response]:
    session = requests.Session()
    response = session.post(url + "/api/login", json={"token": TOKEN})
    assert response.status_code == 200, response.text
    return session, response.json()["csrf_token"], response


def test_every_api_route_needs_a_labeller(server):
    url, backend = server
    for method, path in [
        ("get", "/api/rollouts"),
        ("get", "/api/status"),
        ("get", "/api/groups/g1"),
        ("get", "/api/export"),
        ("post", "/api/ratings"),
        ("post", "/api/preferences"),
        ("post", "/api/influence"),
        ("get", "/api/session"),
    ]:
        assert getattr(requests, method)(url + path, json={}).status_code == 401, path
    assert requests.get(url + "/api/rollouts", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert requests.get(url + "/api/rollouts", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert requests.get(url + "/healthz").json() == {"ok": True}
    assert "unauthenticated" in backend.refusals and "bad_token" in backend.refusals
    assert backend.labels == []


def test_login_sets_a_strict_http_only_cookie_and_refuses_bad_tokens(server):
    url, backend = server
    assert requests.post(url + "/api/login", json={"token": "nope"}).status_code == 401
    assert (
        requests.post(url + "/api/login", json={"token": TOKEN}, headers={"Origin": "http://evil.example"}).status_code
        == 403
    )
    session, csrf, response = login(url)
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    assert session.get(url + "/api/session").json() == {"labeller": "alice", "csrf_token": csrf}
    assert session.post(url + "/api/logout", headers={"X-CSRF-Token": csrf}).status_code == 200
    assert session.get(url + "/api/session").status_code == 401


def test_cookie_requests_that_change_state_need_the_csrf_token_and_our_origin(server):
    url, backend = server
    session, csrf, _ = login(url)
    body = {"rollout_id": "r1", "value": 1}
    assert session.post(url + "/api/ratings", json=body).status_code == 403  # no token
    assert session.post(url + "/api/ratings", json=body, headers={"X-CSRF-Token": "forged"}).status_code == 403
    assert (
        session.post(
            url + "/api/ratings", json=body, headers={"X-CSRF-Token": csrf, "Origin": "http://127.0.0.1:1"}
        ).status_code
        == 403
    )
    assert session.post(url + "/api/influence", json={"active": False}).status_code == 403
    assert backend.labels == [] and backend.influence is True
    assert backend.refusals.count("csrf") == 3 and backend.refusals.count("cross_origin") == 1
    ok = session.post(url + "/api/ratings", json=body, headers={"X-CSRF-Token": csrf, "Origin": url})
    assert ok.status_code == 201 and ok.json() == {"label_id": 1}
    assert backend.labels == [("alice", "r1", 1)]
    # a bearer token carries no ambient authority: no CSRF token needed
    bearer = requests.post(
        url + "/api/preferences", json={"chosen": "a", "rejected": "b"}, headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert bearer.status_code == 201 and backend.labels[-1] == ("alice", "a", "b")


@pytest.mark.parametrize(
    "body",
    [
        {"rollout_id": "r1", "value": 2},
        {"rollout_id": "r1", "value": "1"},
        {"rollout_id": "r1", "value": True},
        {"rollout_id": "r1", "value": 1.0},
        {"rollout_id": "", "value": 1},
        {"rollout_id": "x" * 257, "value": 1},
        {"rollout_id": "r1", "value": 1, "extra": 0},
        {"value": 1},
        ["r1", 1],
        "r1",
    ],
)
def test_bad_input_is_refused_and_stores_nothing(server, body):
    url, backend = server
    response = requests.post(url + "/api/ratings", json=body, headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 422, (body, response.text)
    assert backend.labels == []


def test_limits_errors_headers_and_export(server):
    url, backend = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    big = {"rollout_id": "r" * (MAX_BODY_BYTES + 10), "value": 1}
    assert requests.post(url + "/api/ratings", json=big, headers=auth).status_code == 413
    gone = requests.post(url + "/api/ratings", json={"rollout_id": "gone", "value": -1}, headers=auth)
    assert gone.status_code == 404 and "gone" in gone.json()["detail"]
    assert requests.get(url + "/api/rollouts?limit=0", headers=auth).status_code == 422
    page = requests.get(url + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert requests.get(url + "/static/app.js").status_code == 200
    export = requests.get(url + "/api/export?layout=ratings", headers=auth)
    assert export.headers["content-type"].startswith("application/x-ndjson")
    assert export.text.splitlines() == [f'{{"layout": "ratings", "i": {i}}}' for i in range(3)]
    assert requests.get(url + "/api/export?layout=pickle", headers=auth).status_code == 422


def test_a_revoked_labellers_browser_session_ends_at_once(server):
    url, backend = server
    session, csrf, _ = login(url)
    headers = {"X-CSRF-Token": csrf, "Origin": url}
    assert session.post(url + "/api/ratings", json={"rollout_id": "r1", "value": 1}, headers=headers).status_code == 201
    backend.revoked.add("alice")
    assert (
        session.post(url + "/api/ratings", json={"rollout_id": "r1", "value": -1}, headers=headers).status_code == 401
    )
    assert session.post(url + "/api/influence", json={"active": False}, headers=headers).status_code == 401
    assert session.get(url + "/api/export").status_code == 401
    backend.revoked.clear()  # the session was dropped: even a labeller enabled again must log in anew
    assert session.get(url + "/api/rollouts").status_code == 401
    assert backend.labels == [("alice", "r1", 1)] and backend.influence is True and "revoked" in backend.refusals


@pytest.mark.parametrize("server", [{"label_rate_per_s": 2.0, "label_burst": 5}], indirect=True)
def test_one_labeller_is_rate_limited_with_429_and_retry_after(server):
    url, backend = server
    auth = {"Authorization": f"Bearer {TOKEN}"}
    codes = [
        requests.post(url + "/api/ratings", json={"rollout_id": "r1", "value": 1}, headers=auth) for _ in range(12)
    ]
    assert [c.status_code for c in codes[:5]] == [201] * 5  # the burst
    refused = [c for c in codes if c.status_code == 429]
    assert len(refused) >= 6 and int(refused[0].headers["retry-after"]) >= 1
    assert len(backend.labels) == 12 - len(refused) and backend.refusals.count("rate_limited") == len(refused)
    time.sleep(0.6)  # 2 labels per second: one more after half a second
    assert requests.post(url + "/api/ratings", json={"rollout_id": "r1", "value": 1}, headers=auth).status_code == 201


def test_an_oversized_chunked_body_gets_413(server):
    url, backend = server
    auth = {"Authorization": f"Bearer {TOKEN}"}

    def chunks():  # no Content-Length: Transfer-Encoding: chunked, 10 MB
        yield b'{"rollout_id": "'
        for _ in range(10 * 1024):
            yield b"r" * 1024
        yield b'", "value": 1}'

    response = requests.post(url + "/api/ratings", data=chunks(), headers={**auth, "Content-Type": "application/json"})
    assert response.status_code == 413, response.text
    small = requests.post(
        url + "/api/ratings",
        data=iter([b'{"rollout_id": "r1", ', b'"value": 1}']),
        headers={**auth, "Content-Type": "application/json"},
    )
    assert small.status_code == 201 and backend.labels == [("alice", "r1", 1)]
