"""Hugging Face datasets by hub id or local path: one split, in datasets' slice syntax.

A local path is a `save_to_disk` folder (read with `load_from_disk`, sliced here: datasets
slices only what `load_dataset` reads), a .jsonl/.json/.parquet file (the whole file is the
split it is named as), or a folder of such files (split names from the file names, as
`load_dataset` infers them). Anything else is a hub id, read through the hub or its local cache.
Every failure is one line (a DataError); where the hub cannot be reached, `hint` says what
the user can do instead.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from composer.errors import DataError

FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")
SAVED_MARKERS = ("dataset_dict.json", "state.json")  # what save_to_disk writes at the top


def split_names(split: str) -> list[str]:
    """The split names a spec reads: `train[:-500]+test` -> [train, test]."""
    return list(dict.fromkeys(part.split("[")[0].strip() for part in split.split("+")))


def open_split(dataset: str, config: str | None, split: str, *, hint: str = "") -> Any:
    """The rows of `split` of `dataset` as a `datasets.Dataset`."""
    path = Path(dataset).expanduser()
    try:
        with _quiet():
            if path.is_dir() and any((path / m).is_file() for m in SAVED_MARKERS):
                return _slice_saved(path, split)
            if path.is_file():
                builder = FILE_BUILDERS.get(path.suffix.lower())
                if builder is None:
                    known = ", ".join(FILE_BUILDERS)
                    raise DataError(f"{dataset}: not a dataset file (known: {known})")
                return _load(
                    builder, data_files={n: str(path) for n in split_names(split)}, split=split
                )
            if path.is_dir():
                if not any(p.suffix.lower() in FILE_BUILDERS for p in path.rglob("*")):
                    raise DataError(
                        f"{dataset}: neither a save_to_disk folder nor a folder of "
                        f"{'/'.join(FILE_BUILDERS)} files"
                    )
                return _load(str(path), split=split)
            if not _HUB_ID.match(dataset) or path.suffix.lower() in FILE_BUILDERS:
                raise DataError(f"{dataset}: no such file or folder")
            return _load(dataset, config, split=split)
    except DataError:
        raise
    except ConnectionError as exc:  # offline, or the hub unreachable, and not in the cache
        raise DataError(
            f"{dataset}: not a local path and the Hugging Face hub cannot be reached "
            f"({_first_line(exc)}){hint}"
        ) from exc
    except Exception as exc:  # datasets' own errors: unknown split, bad config, bad file
        where = f"{dataset}" + (f" ({config})" if config else "")
        raise DataError(f"{where} {split}: {_first_line(exc)}") from exc


def _load(*args: Any, **kwargs: Any) -> Any:
    import datasets

    return datasets.load_dataset(*args, **kwargs)


def _slice_saved(path: Path, split: str) -> Any:
    """`split` of a save_to_disk folder: a DatasetDict's splits by name; a single Dataset is
    the split it was saved as (or any name, if it was saved without one)."""
    import datasets

    saved = datasets.load_from_disk(str(path))
    names = split_names(split)
    if isinstance(saved, datasets.DatasetDict):
        parts = dict(saved)
    else:
        own = str(saved.split) if saved.split is not None else None
        if own is not None and names != [own]:
            raise DataError(f"{path}: holds only the split '{own}', not {split}")
        parts = {name: saved for name in names}
    absolute = datasets.ReadInstruction.from_spec(split).to_absolute(
        {name: len(rows) for name, rows in parts.items()}
    )
    pieces = [parts[a.splitname].select(range(a.from_, a.to)) for a in absolute]
    return pieces[0] if len(pieces) == 1 else datasets.concatenate_datasets(pieces)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No progress bars or info logging from datasets while it reads."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


def check_columns(rows: Any, columns: dict[str, str], where: str) -> None:
    """Each role's column exists: else one line naming the field (`fields.answer`)."""
    for role, column in columns.items():
        if column not in rows.column_names:
            raise DataError(
                f"{where}: fields.{role}: no column '{column}' "
                f"(columns: {', '.join(rows.column_names)})"
            )
