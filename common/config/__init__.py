"""One TOML file configures a whole run: shared settings plus a section per service.

Load it with :func:`load_config`. Validation happens once, at start, and
collects every problem into one :class:`ConfigError` whose lines each give the
key, the rule that was broken and how to fix it. Unknown keys are errors
(with a spelling suggestion); modes are Enums (``streamrl.common.modes``), never free
strings. ``--set section.key=value`` overrides take TOML values
(``--set learner.lr=3e-6``, ``--set generator.prompts.path="x.jsonl"``).

Every rule lives in this package once. The schema (types, ranges, Literals, options that apply to
one prompt kind or one reward source, cross-section rules) needs neither the file
system nor imports, so any process can load any config. What does
(:func:`resource_problems`: model and reward-model folders, prompt files, reward
functions and their ``kwargs``, creatable output folders, CUDA) runs when
:func:`load_config` is given ``resources`` (service names): ``streamrl check`` asks for
every service, each service process for its own at start-up, so both report the same
lines. The loaders take the validated sections (:class:`PromptSource`,
:class:`RewardSpec`) and do not check them again.

Every field has a ``description``; :func:`reference_table` renders the config
reference of docs/config.md from them (``python -m streamrl.common.config [--update docs/config.md]``).

Modules, each importing only those above it:

- :mod:`~streamrl.common.config.base`: the section base class, errors, path markers, types in words;
- :mod:`~streamrl.common.config.sources`: :class:`PromptSource`, :class:`RewardSpec`;
- :mod:`~streamrl.common.config.learner`: :class:`LearnerSection`;
- :mod:`~streamrl.common.config.stages`: the offline stages' sections and ``[eval]``;
- :mod:`~streamrl.common.config.checks`: cross-section rules (:func:`cross_problems`) and hints (:func:`cross_hints`);
- :mod:`~streamrl.common.config.schema`: the other sections and :class:`Config`;
- :mod:`~streamrl.common.config.resources`: files, folders, imports and devices (:func:`resource_problems`);
- :mod:`~streamrl.common.config.load`: TOML, overrides, path resolution, :func:`load_config`;
- :mod:`~streamrl.common.config.reference_doc`: the reference table of docs/config.md.
"""

from streamrl.common.config.base import (
    LOCAL_PATH,
    MAYBE_LOCAL_PATH,
    STRICT_ARGS,
    BF16Setting,
    ConfigError,
    ResourceError,
    _section_type,
)
from streamrl.common.config.checks import cross_hints, cross_problems, is_local_endpoint
from streamrl.common.config.learner import LearnerSection, LoraSection
from streamrl.common.config.load import (
    add_config_arguments,
    apply_overrides,
    load_config,
    parse_override,
    resolve_paths,
    validate_config,
)
from streamrl.common.config.reference_doc import REFERENCE_BEGIN, REFERENCE_END, reference_table, replace_reference
from streamrl.common.config.resources import SERVICES, resource_problems
from streamrl.common.config.schema import (
    SINGLE_ENDPOINTS,
    WILDCARD_HOSTS,
    BindSection,
    BufferSection,
    Config,
    EndpointsSection,
    FeedbackSection,
    GeneratorSection,
    MetricsSection,
    ModelSection,
    RunSection,
    ScorerSection,
    SecuritySection,
    TrackingSection,
    TransportSection,
    endpoint_problem,
)
from streamrl.common.config.sources import BUILTIN_REWARDS, PromptSource, RewardSpec
from streamrl.common.config.stages import EvalSection, RewardModelSection, SFTSection, StageData

__all__ = [
    "BF16Setting",
    "BUILTIN_REWARDS",
    "BindSection",
    "BufferSection",
    "Config",
    "ConfigError",
    "EndpointsSection",
    "EvalSection",
    "FeedbackSection",
    "GeneratorSection",
    "LOCAL_PATH",
    "LearnerSection",
    "LoraSection",
    "MAYBE_LOCAL_PATH",
    "MetricsSection",
    "ModelSection",
    "PromptSource",
    "REFERENCE_BEGIN",
    "REFERENCE_END",
    "ResourceError",
    "RewardModelSection",
    "RewardSpec",
    "RunSection",
    "SERVICES",
    "SFTSection",
    "SINGLE_ENDPOINTS",
    "STRICT_ARGS",
    "ScorerSection",
    "SecuritySection",
    "StageData",
    "TrackingSection",
    "TransportSection",
    "WILDCARD_HOSTS",
    "_section_type",
    "add_config_arguments",
    "apply_overrides",
    "cross_hints",
    "cross_problems",
    "endpoint_problem",
    "is_local_endpoint",
    "load_config",
    "parse_override",
    "reference_table",
    "replace_reference",
    "resolve_paths",
    "resource_problems",
    "validate_config",
]
