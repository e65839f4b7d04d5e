"""Errors that stop a service at start-up with a message for the operator."""

from __future__ import annotations


class StartupRefused(RuntimeError):
    """A condition a service must not run under (a taken port, a run folder in use, a damaged journal).

    The message names what is wrong and the fix; ``streamrl.common.service.run_service`` prints it
    and exits with status 2 after closing every socket.
    """
