"""The feedback service's socket loop: the scored-rollout feed in (SUB), H-hat versions out (PUB),
and the labellers' web page and API (uvicorn in a thread).

The scorers publish every scored rollout on a PUB socket connected to this service's SUB
(``endpoints.feedback``): a PUB never blocks and drops when nobody subscribes, so the pipeline
runs at the same speed with or without this service. The loop, every 0.1 s at most:

1. drains the feed into the in-memory :class:`~streamrl.services.feedback.state.RecentRollouts`;
2. when labels arrived (at most once per ``fit_interval_s``): computes the frozen reference
   model's features of newly labelled rollouts, refits H-hat on the newest ``max_labels`` labels
   (:func:`~streamrl.services.feedback.hhat.fit_head`), records the version in the database and
   publishes it (``endpoints.human_model``);
3. re-publishes the newest version every ``announce_interval_s`` (late subscribers).

Labels are committed to SQLite by the web threads before they are acknowledged; the loop only
reads them, so a crash between a label and its refit loses nothing (a restart refits).
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import torch
import uvicorn
import zmq

from streamrl.common.config import is_local_endpoint
from streamrl.common.errors import StartupRefused
from streamrl.common.human import beta_at, reference_features
from streamrl.common.messages import HumanModel, ScoredRollout
from streamrl.common.models import configure_torch, load_causal_lm, load_tokenizer, resolve_model_path
from streamrl.common.service import ServiceContext, ServiceLoop
from streamrl.common.transport import send
from streamrl.services.feedback.hhat import fit_head, model_message
from streamrl.services.feedback.metrics import FeedbackMetrics
from streamrl.services.feedback.state import RecentRollouts
from streamrl.services.feedback.store import LabelStore
from streamrl.services.feedback.web import LabelError, create_app

log = logging.getLogger(__name__)

INFLUENCE = "influence_active"
"""Settings key of the page's start / pause switch."""


class FeedbackService(ServiceLoop):
    """The feedback process (see the module docstring); also the web app's backend."""

    def __init__(self, ctx: ServiceContext):
        super().__init__(ctx)
        cfg = ctx.config
        fb = cfg.feedback
        self.cfg, self.fb = cfg, fb
        if not fb.enabled:
            log.info("feedback.enabled is false: nothing to do (set feedback.enabled = true to serve the page)")
            raise SystemExit(0)
        configure_torch(1, seed=cfg.run.seed)
        self.metrics = FeedbackMetrics(ctx.metrics)
        self.store = LabelStore(fb.database_path(cfg.run.output_dir))
        self.closing(self.store.close)
        self.lock = threading.Lock()
        self.rollouts = RecentRollouts(fb.recent_rollouts)
        self.version, self.fitted_label_id = self.store.latest_model()
        self.active = self.store.get_setting(INFLUENCE, "true") == "true"
        self.metrics.influence.set(int(self.active))
        self.metrics.model_version.set(self.version)
        self.message: HumanModel | None = None
        self.pending: list[tuple[int, float]] = []  # (label id, committed at) not yet in a published version
        self.wake = threading.Event()
        self.last_fit = 0.0
        self.logged_below = 0  # label count last logged while below min_labels (logged once per change)
        path = resolve_model_path(cfg.model.path, cfg.model.cache_path)
        self.tokenizer = load_tokenizer(path)
        self.reference = load_causal_lm(path, device=torch.device("cpu")).eval()
        self.feed = self.socket(
            zmq.SUB, bind=cfg.endpoints.bind_address("feedback"), subscribe=b"", hwm=max(cfg.transport.hwm, 1000)
        )
        self.publisher = self.socket(zmq.PUB, bind=cfg.endpoints.bind_address("human_model"))
        self.inbox = ctx.inbox([ScoredRollout], "feed")
        self.http_socket = self._bind_http()
        self.closing(self.http_socket.close)
        tls = fb.tls_cert is not None
        app = create_app(
            self,
            session_ttl_s=fb.session_ttl_s,
            secure_cookies=tls,
            label_rate_per_s=fb.label_rate_per_s,
            label_burst=fb.label_burst,
        )
        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            lifespan="off",
            ssl_certfile=fb.tls_cert,
            ssl_keyfile=fb.tls_key,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.url = f"{'https' if tls else 'http'}://{fb.http_host}:{self.http_socket.getsockname()[1]}/"

    def _bind_http(self) -> socket.socket:
        fb = self.fb
        family = socket.AF_INET6 if ":" in fb.http_host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((fb.http_host.strip("[]"), fb.http_port))
        except OSError as err:
            sock.close()
            raise StartupRefused(
                f"cannot serve the feedback page on {fb.http_host}:{fb.http_port}: {err.strerror}; "
                "fix: stop the process that holds the port or set feedback.http_port "
                "(0 = any free port)"
            ) from None
        sock.listen(64)
        return sock

    # ----------------------------------------------------------------- loop

    def starting(self) -> None:
        """Start the web server's thread, then fit and publish H-hat on the labels stored by an earlier run."""
        thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.http_socket]}, name="feedback-http", daemon=True
        )
        thread.start()
        self.closing(self._stop_http, thread)
        log.info(
            "%s: labellers' page on %s (labels in %s); feed on %s, H-hat on %s",
            self.ctx.instance,
            self.url,
            self.store.path,
            self.cfg.endpoints.feedback,
            self.cfg.endpoints.human_model,
        )
        if not is_local_endpoint(self.cfg.endpoints.feedback):
            log.info("the feed endpoint is not on loopback: scorers elsewhere reach it through CURVE")
        self.last_announce = 0.0
        self._fit_and_publish()  # labels stored by an earlier run: a version at once

    def turn(self) -> None:
        """Take the feed (waiting up to 0.1 s), refit when labels arrived, re-publish when due."""
        self._drain_feed()
        now = time.time()
        if self.pending and now - self.last_fit >= self.fb.fit_interval_s:
            self._fit_and_publish()
            self.last_announce = time.time()
        elif self.wake.is_set() or (
            self.message is not None and now - self.last_announce >= self.fb.announce_interval_s
        ):
            self.wake.clear()
            self._publish()
            self.last_announce = now

    def _stop_http(self, thread: threading.Thread) -> None:
        self.server.should_exit = True
        thread.join(timeout=5)

    def _drain_feed(self) -> None:
        if not self.wait_for(self.feed, 0.1):
            return
        for _ in range(1000):
            if not self.feed.poll(0):
                break
            msg = self.inbox.decode(self.feed.recv_multipart(copy=False))
            if msg is None:
                continue
            with self.lock:
                self.rollouts.add(msg, time.time())
            self.metrics.received.inc()

    def _fit_and_publish(self) -> None:
        """Compute missing features, refit H-hat on the stored labels, publish a new version."""
        self.last_fit = time.time()
        started = time.perf_counter()
        with self.lock:
            pending, self.pending = self.pending, []
        missing = self.store.rollouts_without_features()
        while missing:
            features = reference_features(
                self.reference,
                [p for _, p, _ in missing],
                [c for _, _, c in missing],
                pad_id=self.tokenizer.pad_token_id,
            )
            self.store.set_features({rid: f for (rid, _, _), f in zip(missing, features)})
            missing = self.store.rollouts_without_features()
        rows = self.store.training_labels(self.fb.max_labels)
        if len(rows) < self.fb.min_labels:
            if rows and len(rows) != self.logged_below:
                self.logged_below = len(rows)
                log.info(
                    "%d label(s) so far; H-hat is first fit at feedback.min_labels = %d", len(rows), self.fb.min_labels
                )
            with self.lock:
                self.pending = pending + self.pending
            return
        try:
            head, loss = fit_head(rows, l2=self.fb.l2)
        except Exception:  # the labels are safe in the database: keep serving, retry with the next label
            log.exception("H-hat refit on %d labels failed; version %d stays in use", len(rows), self.version)
            return
        version = self.version + 1
        with self.lock:
            active = self.active
        message = model_message(
            head,
            version=version,
            active=active,
            rows=rows,
            anchors=self.fb.eligibility_anchors,
            sender=self.ctx.instance,
        )
        self.store.record_model(version=version, labels=len(rows), last_label_id=rows[-1].id, loss=loss)
        self.version, self.fitted_label_id, self.message = version, rows[-1].id, message
        self._publish()
        now = time.time()
        for _, committed in pending:
            self.metrics.label_to_model.observe(now - committed)
        self.metrics.fit_seconds.observe(time.perf_counter() - started)
        self.metrics.model_version.set(version)
        self.metrics.labels_in_model.set(len(rows))
        log.info(
            "H-hat version %d fit on %d labels (loss %.4f) in %.2fs",
            version,
            len(rows),
            loss,
            time.perf_counter() - started,
        )

    def _publish(self) -> None:
        if self.message is None:
            return
        with self.lock:
            self.message.active = self.active
        self.message.sent_at = time.time()
        try:
            send(self.publisher, self.message, flags=zmq.NOBLOCK)
            self.metrics.published.inc()
        except zmq.Again:  # a PUB drops rather than blocks; Again only on a full pipe with NOBLOCK
            pass

    # -------------------------------------------------------------- backend

    def labeller_for_token(self, token: str) -> str | None:
        """The enabled labeller whose token this is, else None."""
        return self.store.labeller_for_token(token)

    def labeller_enabled(self, name: str) -> bool:
        """True while ``name`` is an enabled labeller (a browser session of a revoked one ends)."""
        return self.store.labeller_enabled(name)

    def recent(self, after: int, limit: int) -> list[dict]:
        """The newest ``limit`` rollouts that streamed in after ``after`` (JSON-ready)."""
        with self.lock:
            items = self.rollouts.after(after, limit)
        return [seen.public() for seen in items]

    def group(self, group_id: str) -> list[dict]:
        """The remembered completions of a group (JSON-ready)."""
        with self.lock:
            return [seen.public() for seen in self.rollouts.group(group_id)]

    def _known(self, rollout_id: str):
        with self.lock:
            seen = self.rollouts.get(rollout_id)
        if seen is None:
            raise LabelError(404, f"rollout {rollout_id!r} is not among the {self.fb.recent_rollouts} most recent")
        return seen

    def _stored(self, label_id: int, committed: float, kind: str) -> None:
        self.metrics.labels.labels(kind=kind).inc()
        with self.lock:
            self.pending.append((label_id, committed))

    def rate(self, labeller: str, rollout_id: str, value: int) -> dict:
        """Store a +1 / -1 rating (committed before returning).

        Raises:
            LabelError: 404 when the rollout is not among the recent ones.
        """
        seen = self._known(rollout_id)
        label_id, at = self.store.add_label(
            labeller=labeller,
            kind="rating",
            scored=seen.scored,
            value=value,
            model_version=self.version,
            seen_at=seen.seen_at,
            credit=self._credit(seen, time.time()),
        )
        self._stored(label_id, at, "rating")
        return {
            "label_id": label_id,
            "kind": "rating",
            "labeller": labeller,
            "rollout_id": rollout_id,
            "value": value,
            "policy_version": seen.scored.rollout.policy_version,
            "created_at": at,
            "model_version": self.version,
        }

    def _credit(self, rated, now: float) -> list[tuple[ScoredRollout, float, float]]:
        """TAMER's credit assignment of a rating given at ``now``: shared evenly by the rated rollout and
        the rollouts that streamed in between ``credit_delay_max_s`` and ``credit_delay_min_s`` seconds
        before it (what the person saw within their reaction delay); empty (all on the rated one) when
        the window is off or holds nothing else. Returns ``(rollout, seen_at, weight)``, weights summing to 1."""
        fb = self.fb
        if not fb.credit_delay_max_s:
            return []
        with self.lock:
            shown = self.rollouts.shown_between(now - fb.credit_delay_max_s, now - fb.credit_delay_min_s)
        credited = [rated] + [s for s in shown if s.scored.rollout.rollout_id != rated.scored.rollout.rollout_id]
        if len(credited) == 1:
            return []
        return [(s.scored, s.seen_at, 1.0 / len(credited)) for s in credited]

    def prefer(self, labeller: str, chosen: str, rejected: str) -> dict:
        """Store a pairwise pick of two completions of one group (committed before returning).

        Raises:
            LabelError: 404 for an unknown rollout, 409 for the same rollout twice or two groups.
        """
        if chosen == rejected:
            raise LabelError(409, "chosen and rejected are the same rollout")
        a, b = self._known(chosen), self._known(rejected)
        if a.scored.rollout.group_id != b.scored.rollout.group_id:
            raise LabelError(409, "a preference compares two completions of the same group (the same prompt draw)")
        label_id, at = self.store.add_label(
            labeller=labeller,
            kind="preference",
            scored=a.scored,
            value=1,
            other=b.scored,
            model_version=self.version,
            seen_at=a.seen_at,
        )
        self._stored(label_id, at, "preference")
        return {
            "label_id": label_id,
            "kind": "preference",
            "labeller": labeller,
            "chosen": chosen,
            "rejected": rejected,
            "created_at": at,
            "model_version": self.version,
        }

    def status(self) -> dict:
        """Labels, H-hat version, influence switch, combination, beta_0 (``beta``) and the current
        beta_t = beta * beta_decay^t (``beta_t``, t = the newest policy version streamed in, the
        learner's step), and the reward and beta_t by policy version."""
        with self.lock:
            series = self.rollouts.reward_series()
            received = self.rollouts.seq
            active = self.active
        labels_in_model = self.message.labels if self.message is not None else 0
        fb = self.fb
        newest = series[-1]["version"] if series else 0
        beta_by_version = [
            {"version": p["version"], "beta": beta_at(fb.beta, fb.beta_decay, p["version"])} for p in series
        ]
        return {
            "labels": self.store.count_labels(),
            "labels_by_labeller": self.store.labels_by_labeller(),
            "human_model_version": self.version,
            "labels_in_model": labels_in_model,
            "influence_active": active,
            "combination": fb.combination.value,
            "beta": fb.beta,
            "beta_t": beta_at(fb.beta, fb.beta_decay, newest),
            "policy_version": newest,
            "beta_decay": fb.beta_decay,
            "eligibility": fb.eligibility,
            "rollouts_received": received,
            "reward_by_version": series,
            "beta_by_version": beta_by_version,
        }

    def set_influence(self, labeller: str, active: bool) -> dict:
        """Start or pause the human influence (stored; re-published at once)."""
        self.store.set_setting(INFLUENCE, "true" if active else "false")
        with self.lock:
            self.active = active
        self.metrics.influence.set(int(active))
        log.info("%s %s the human influence", labeller, "started" if active else "paused")
        self.wake.set()  # the loop re-publishes the newest version with the new switch at once
        return {"influence_active": active, "labeller": labeller}

    def export(self, layout: str) -> list[dict]:
        """The labels as ``preferences`` or ``ratings`` rows (:meth:`LabelStore.export`)."""
        return list(self.store.export(layout))

    def refused(self, reason: str) -> None:
        """Count a refused HTTP request."""
        self.metrics.refused.labels(reason=reason).inc()
