"""Small file helpers shared by the cache, feature-store, calibration and tuning writers."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Mapping[str, Any], *, indent: int = 2, tmp_prefix: str | None = None) -> None:
    """Write `data` as JSON to `path` so that readers see the old file or the new one, never a mix.

    The JSON goes to a temporary file in the same directory (`tmp_prefix` names it; default
    `.<name>.`), is fsynced, then `os.replace`d over `path`; on any error the temporary file is removed.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=tmp_prefix or f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=indent, sort_keys=True)
            fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: Environment variable that overrides the cache root directory.
CACHE_ENV_VAR: str = "CLOVER2_HF_CACHE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache root directory (not created).

    Order: ``cache_dir`` argument, ``$CLOVER2_HF_CACHE``,
    ``$XDG_CACHE_HOME/clover2_hf``, ``~/.cache/clover2_hf``.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "clover2_hf"
