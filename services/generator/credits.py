"""The generator's side of generation credits: ask the buffer before sampling.

The buffer decides (``services/buffer/credits.py``); this module only asks and waits for
the answer. A request states the weights version the generator will sample with and the
groups it sampled so far; the reply's ``credits`` replace whatever an earlier reply allowed,
so a generator never holds credits from a buffer that has restarted or from before its
own restart (its new process id starts with none).
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from streamrl.common.messages import CreditGrant, CreditRequest
from streamrl.common.metrics import ServiceMetrics
from streamrl.common.security import Security
from streamrl.common.transport import Inbox, make_socket, poll_unless_stopped, try_send

log = logging.getLogger(__name__)


class CreditClient:
    """Asks the buffer's ROUTER (``endpoints.batches``) for credits over a DEALER.

    Args:
        ctx: the process's ZeroMQ context.
        endpoint: the buffer's batch ROUTER.
        sender: this generator's id (unique per process start).
        instance: its stable name (``generator-0``).
        metrics: the service's metrics (rejected replies are counted there).
        timeout_s: seconds to wait for one reply.
        max_message_bytes, hwm, security: as for every socket.
        stop: the service's stop request (``ServiceContext.stop``): once set, a request stops waiting
            for its reply (within :data:`~streamrl.common.transport.STOP_CHECK_S` seconds); None = never.
    """

    def __init__(
        self,
        ctx: zmq.Context,
        *,
        endpoint: str,
        sender: str,
        instance: str,
        metrics: ServiceMetrics,
        timeout_s: float,
        max_message_bytes: int,
        hwm: int,
        security: Security | None,
        stop: threading.Event | None = None,
    ):
        self.sender, self.instance, self.timeout_s, self.stop = sender, instance, timeout_s, stop
        self.sock = make_socket(
            ctx, zmq.DEALER, connect=[endpoint], max_message_bytes=max_message_bytes, hwm=hwm, security=security
        )
        self.inbox = Inbox(metrics, [CreditGrant], max_bytes=max_message_bytes, socket_name="credits")
        self.epoch: str | None = None

    def request(self, *, policy_version: int, groups_sent: int, want: int) -> CreditGrant | None:
        """Ask for up to ``want`` credits; the grant, or None when the buffer did not answer within ``timeout_s``
        (or ``stop`` was set while waiting).

        Replies to earlier, timed-out requests are discarded (their ``reply_to`` differs).
        """
        request = CreditRequest(
            sender=self.sender,
            instance=self.instance,
            policy_version=policy_version,
            groups_sent=groups_sent,
            want=want,
        )
        if not try_send(self.sock, request):
            return None
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not poll_unless_stopped(self.sock, left, self.stop):
                break
            reply = self.inbox.decode(self.sock.recv_multipart(copy=False))
            if reply is None or reply.reply_to != request.msg_id:
                continue
            if self.epoch is not None and reply.epoch != self.epoch:
                log.info("the buffer restarted (epoch %s -> %s): credits are granted afresh", self.epoch, reply.epoch)
            self.epoch = reply.epoch
            return reply
        return None

    def close(self) -> None:
        self.sock.close(0)
