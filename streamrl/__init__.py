"""streamrl: streaming actor-learner RL for language models over ZeroMQ.

The distribution has one import name. Its parts:

- ``streamrl.common``: the library every process shares (wire messages, transport,
  config, metrics, models, weights, prompts); it imports no service.
- ``streamrl.services``: one package per process (generator, scorer, buffer, learner);
  no service imports another.
- ``streamrl`` itself: the application that composes them (CLI, evaluation, status,
  report, :mod:`streamrl.testing`).
- ``streamrl.deploy``: process files, default configs and prompts.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("streamrl")
except PackageNotFoundError:  # imported from a tree that was never installed
    __version__ = "0+unknown"
