"""The real scorer and buffer between stand-in generators and learner (``bench.transport``, ``bench.scale``).

The stand-ins build real :class:`~streamrl.common.messages.Rollout` messages
(``bench.transport.make_rollout``) and never load a model; the scorer uses the trivial
reward ``count_char``. The scorer's reference pass (``scorer.reference_logprobs``) is
switched off: it is model work that scales like the generators, and the stand-ins'
token ids are SmolLM2-sized, not those of the tiny model the config names.
"""

from __future__ import annotations

from pathlib import Path

from streamrl.common.config import ScorerSection
from streamrl.testing import Services, local_run_config, scrape, wait_until, write_config

STARTUP_TIMEOUT_S = 90.0


def stand_in_sections(workdir: Path, **overrides) -> dict:
    """Config sections for the scorer and buffer on loopback (``overrides`` = {section: {key: value}})."""
    sections = local_run_config(workdir, Path("tiny-char-llama"))
    sections["model"]["path"] = "tiny-char-llama"
    if "reference_logprobs" in ScorerSection.model_fields:
        sections["scorer"]["reference_logprobs"] = False
    for section, values in overrides.items():
        sections.setdefault(section, {}).update(values)
    return sections


def start_scorer_and_buffer(workdir: Path, sections: dict, name: str) -> tuple[Path, Services]:
    """Write ``<workdir>/<name>.toml``, start the buffer and one scorer, and wait until both serve metrics.

    Returns:
        The config file and the :class:`~streamrl.testing.Services` (the caller closes it).

    Raises:
        RuntimeError: they did not start within ``STARTUP_TIMEOUT_S`` (their logs attached).
    """
    config = write_config(workdir / f"{name}.toml", sections)
    services = Services(config, workdir)
    try:
        services.start("buffer")
        services.start("scorer")
        ports = [sections["metrics"]["buffer_port"], sections["metrics"]["scorer_port"]]

        def up() -> bool:
            try:
                return all(scrape(port) for port in ports)
            except (ConnectionError, OSError):
                return False

        if not wait_until(up, timeout=STARTUP_TIMEOUT_S):
            raise RuntimeError("scorer/buffer did not start; logs:\n" + services.logs())
    except BaseException:
        services.close()
        raise
    return config, services


def join_stand_ins(procs: list, timeout_s: float, services: Services) -> None:
    """Wait for the stand-in processes; one still running after ``timeout_s`` is killed.

    Raises:
        RuntimeError: a stand-in did not finish (the services' logs attached).
    """
    for p in procs:
        p.join(timeout_s)
        if p.is_alive():
            p.kill()
            raise RuntimeError("a stand-in process did not finish; service logs:\n" + services.logs())
