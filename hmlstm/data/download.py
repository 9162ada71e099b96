"""Reading text files, and downloading the datasets that are not shipped (verified by size and checksum)."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence


def read_text(path: str | os.PathLike, byte_level: bool = False) -> str:
    """The file as a str; byte_level: one character per byte (latin-1), for data that is not valid UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path.resolve()}")
    data = path.read_bytes()
    if byte_level:
        return data.decode("latin-1")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.end]
        raise ValueError(f"{path} is not valid UTF-8: byte{'s' if len(bad) > 1 else ''} {bad.hex(' ')} at byte offset "
                         f"{e.start} ({e.reason}); fix the file, or read it byte by byte with byte_level=True "
                         f"(--data.byte_level true)") from None


def parse_ptb_char(text: str) -> str:
    """Mikolov's character-level PTB format -> plain text.

    Each line holds one sentence as space-separated characters with `_` marking a word boundary, e.g.
    " a e r _ b a n k n o t e". Returns the characters with `_` as a space and one newline per line, so
    the length counts one newline per line (the paper's data: 5,017,482 characters for the training split).
    """
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines = lines[:-1]
    out = []
    for line in lines:
        symbols = line.split()
        if any(len(s) != 1 for s in symbols):
            bad = next(s for s in symbols if len(s) != 1)
            raise ValueError(f"not the ptb.char format: symbol {bad!r} is not a single character "
                             f"(line {line[:60]!r})")
        out.append("".join(" " if s == "_" else s for s in symbols) + "\n")
    return "".join(out)


def _digest(path: Path, algorithm: str) -> str:
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_file(path: Path, sha256: Optional[str] = None, md5: Optional[str] = None,
                size: Optional[int] = None) -> None:
    """Raise ValueError naming the file and both values if its size or checksum is not the expected one."""
    if size is not None and path.stat().st_size != size:
        raise ValueError(f"{path.name}: size {path.stat().st_size} bytes, expected {size}")
    for algorithm, expected in (("sha256", sha256), ("md5", md5)):
        if expected is not None:
            got = _digest(path, algorithm)
            if got != expected.lower():
                raise ValueError(f"{path.name}: {algorithm} {got}, expected {expected}")


def download(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, md5: Optional[str] = None,
             size: Optional[int] = None, timeout: float = 60.0) -> Path:
    """Download `url` to `dest` atomically: into a temporary file beside it, verified, then renamed.

    A failed or corrupt download leaves nothing at `dest`. Any urllib URL works (file:// too).
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as response:
            shutil.copyfileobj(response, f, 1 << 20)
        verify_file(tmp, sha256=sha256, md5=md5, size=size)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _extract_member(archive: Path, member: str, dest: Path) -> None:
    """Copy the archive member whose file name is `member` (zip or tar) to `dest`, atomically."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            if zipfile.is_zipfile(archive):
                with zipfile.ZipFile(archive) as z:
                    names = [n for n in z.namelist() if Path(n).name == member]
                    if not names:
                        raise ValueError(f"{archive.name} has no member named {member}")
                    with z.open(names[0]) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
            else:
                with tarfile.open(archive) as t:
                    infos = [i for i in t.getmembers() if i.isfile() and Path(i.name).name == member]
                    if not infos:
                        raise ValueError(f"{archive.name} has no member named {member}")
                    shutil.copyfileobj(t.extractfile(infos[0]), out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


@dataclass(frozen=True)
class RemoteFile:
    """A data file and where it comes from.

    name: the file name in the data directory. url: the download. member: the file's name inside the
    downloaded archive (zip or tar), None if the download is the file itself. archive_sha256 / archive_size:
    what the download must be; sha256 / size: what the final file must be (None: not checked).
    """

    name: str
    url: str
    member: Optional[str] = None
    sha256: Optional[str] = None
    size: Optional[int] = None
    archive_sha256: Optional[str] = None
    archive_size: Optional[int] = None


def ensure_files(files: Sequence[RemoteFile], data_dir: str | os.PathLike, dataset: str,
                 download_missing: bool = True) -> list[Path]:
    """The paths of `files` in `data_dir`, downloading (and verifying) the missing ones.

    Raises FileNotFoundError naming the missing files and the directory to put them in when they are
    absent and cannot be downloaded (no network, or download_missing=False).
    """
    data_dir = Path(data_dir)
    paths = [data_dir / f.name for f in files]
    missing = [f for f, p in zip(files, paths) if not p.is_file()]
    if not missing:
        return paths
    names = ", ".join(f.name for f in missing)
    urls = ", ".join(sorted({f.url for f in missing}))
    hint = (f"Put {names} in {data_dir.resolve()} (or point --data.data_dir at the directory that has them); "
            f"source: {urls}")
    if not download_missing:
        raise FileNotFoundError(f"{dataset}: missing {names} in {data_dir.resolve()} and download=False. {hint}")
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        archives: dict[str, Path] = {}
        for f in missing:
            dest = data_dir / f.name
            if f.member is None:
                download(f.url, dest, sha256=f.sha256, size=f.size)
                continue
            if f.url not in archives:
                archives[f.url] = download(f.url, data_dir / Path(urllib.parse.urlparse(f.url).path).name,
                                           sha256=f.archive_sha256, size=f.archive_size)
            _extract_member(archives[f.url], f.member, dest)
            try:
                verify_file(dest, sha256=f.sha256, size=f.size)
            except ValueError:
                dest.unlink(missing_ok=True)
                raise
    except (urllib.error.URLError, OSError, ValueError, tarfile.TarError, zipfile.BadZipFile) as e:
        raise FileNotFoundError(f"{dataset}: missing {names} in {data_dir.resolve()}, and the download "
                                f"failed: {e}. {hint}") from e
    return paths
