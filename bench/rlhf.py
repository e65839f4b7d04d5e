"""RLHF stages 1-2 on real preference data: SFT held-out loss and reward-model accuracy.

Runs ``streamrl sft`` then ``streamrl rm`` (the reward model starts from the SFT model,
as in InstructGPT) with ``deploy/configs/rlhf.toml`` on Anthropic hh-rlhf (harmless-base,
``../shared/data``) and SmolLM2-135M-Instruct, and records: the SFT response loss on
held-out rows before and after, and the reward model's held-out accuracy (pairs ranked
right) with its standard error, its z-score against chance and the mean margin, plus the
wall time of each stage. The held-out rows (``eval_rows``, 500 by default) are never
trained on by either stage.

Usage (from the repository root)::

    flock /tmp/streamrl-heavy.lock .venv/bin/python -m bench.rlhf
    .venv/bin/python -m bench.rlhf --set rm.epochs=3 --set rm.data.train_rows=800
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from bench.report import REPO, command_line, environment, environment_line, markdown_table, write_results
from streamrl.common.config import ConfigError, load_config

CONFIG = REPO / "deploy" / "configs" / "rlhf.toml"


def run(config_path: Path, overrides: list[str], *, force: bool) -> dict:
    """Run both stages; returns their summaries and wall times."""
    from streamrl.reward_model import run_rm
    from streamrl.sft import run_sft

    config = load_config(config_path, overrides)
    log = lambda line: print(line, flush=True)  # noqa: E731
    started = time.perf_counter()
    sft = run_sft(config, force=force, log=log)
    sft_seconds = time.perf_counter() - started
    rm = run_rm(config, force=force, log=log)
    return {"sft": sft, "rm": rm, "sft_seconds": round(sft_seconds, 1),
            "rm_seconds": round(time.perf_counter() - started - sft_seconds, 1)}


def render(result: dict, env: dict, command: str) -> str:
    """The RESULTS.md section."""
    sft, rm = result["sft"], result["rm"]
    z = (rm["heldout_accuracy"] - 0.5) / rm["heldout_accuracy_stderr"] if rm["heldout_accuracy_stderr"] else float("inf")
    table = markdown_table(
        ["stage", "training rows", "held-out rows", "frozen / trainable", "result", "wall (s)"],
        [["sft", sft["train_rows"], sft["heldout_rows"], f"{sft['frozen_blocks']} blocks frozen",
          f"held-out response loss {sft['heldout_loss_before']:.4f} -> {sft['heldout_loss_after']:.4f} nats/token "
          f"({sft['heldout_tokens']} tokens)", sft["wall_seconds"]],
         ["rm", rm["train_rows"], rm["heldout_rows"], f"{rm['frozen_blocks']} blocks frozen",
          f"held-out accuracy {rm['heldout_accuracy']:.3f} +- {rm['heldout_accuracy_stderr']:.3f} "
          f"({z:.1f} SE above chance, n {rm['heldout_comparisons']}), margin {rm['heldout_margin']:+.3f} +- "
          f"{rm['heldout_margin_stderr']:.3f}; training rows {rm['train_accuracy']:.3f}", rm["wall_seconds"]]])
    return f"""## RLHF stages: SFT and reward model on hh-rlhf (`python -m bench.rlhf`)

{environment_line(env)}

Command: `{command}` (config `deploy/configs/rlhf.toml`{', overrides ' + ', '.join(result['overrides'])
                                                        if result['overrides'] else ''}).
Data: Anthropic hh-rlhf harmless-base, 1,800 pairs; {rm['heldout_rows']} held out by a seeded hash of the
prompt (never trained on by either stage). Model SmolLM2-135M-Instruct; the reward model starts from the
SFT model. Normalisation bias stored with the reward model: {rm['bias']:+.4f} (demonstrations' mean raw score
{rm['demonstrations_mean_raw']:+.4f}); held-out chosen / rejected mean normalised score
{rm['heldout_mean_best']:+.3f} / {rm['heldout_mean_others']:+.3f}.

{table}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(CONFIG), help="stage config (default deploy/configs/rlhf.toml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set rm.epochs=3")
    parser.add_argument("--force", action="store_true", help="retrain stages whose output folder is complete")
    parser.add_argument("--results-dir", type=Path, default=None)
    parser.add_argument("--results-md", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        result = run(Path(args.config), args.overrides, force=args.force)
    except ConfigError as err:
        print(f"bench.rlhf: invalid config\n{err}", file=sys.stderr)
        return 2
    result["overrides"] = args.overrides
    env = environment()
    result["environment"] = env
    write_results("rlhf", result, render(result, env, command_line()), results_dir=args.results_dir,
                  results_md=args.results_md)
    rm = result["rm"]
    print(f"rm held-out accuracy {rm['heldout_accuracy']:.3f} +- {rm['heldout_accuracy_stderr']:.3f} "
          f"(n {rm['heldout_comparisons']}); sft held-out loss {result['sft']['heldout_loss_before']:.4f} -> "
          f"{result['sft']['heldout_loss_after']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
