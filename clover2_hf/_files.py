"""Small file helpers shared by the cache, feature-store and tuning writers."""

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
