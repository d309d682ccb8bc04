"""Byte-level language-modelling sources: the default `mixture` corpus and the user's own `text` files.

Every batch draws its sequences round-robin over the domains, each a window of `seq_len + 1` bytes placed
uniformly in that domain's train (or val) stream; a batch is a pure function of (seed, purpose, index).

Shape legend: B batch, W window (T + 1 bytes), S bytes of all streams, G domains.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe.data.corpus import (
    CorpusSplit,
    Documents,
    DomainSpec,
    corpus_dataset,
    default_cache_root,
    load_or_build_corpus,
    mixture_domains,
    read_file,
    split_corpus,
)
from moe.data.sources import Batch, balanced_domains_B, check_byte_config, register_data, require
from moe.errors import ConfigError, DataError
from router.seeds import torch_generator

if TYPE_CHECKING:
    import datasets

log = logging.getLogger(__name__)

VOCAB_SIZE = 256
_TEXT_CHUNKS_PER_FILE = 20
_TEXT_CHUNK_BYTES_MIN, _TEXT_CHUNK_BYTES_MAX = 64, 64 * 1024


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


@dataclass(frozen=True)
class _Streams:
    """All domains' streams concatenated into one uint8 tensor, so windows are cut with one gather."""

    bytes_S: torch.Tensor
    offset_G: torch.Tensor
    length_G: torch.Tensor

    @classmethod
    def of(cls, streams: list[bytes]) -> _Streams:
        lengths = [len(stream) for stream in streams]
        offsets = [sum(lengths[:index]) for index in range(len(lengths))]
        bytes_S = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
        return cls(bytes_S, torch.tensor(offsets), torch.tensor(lengths))

    def windows_BW(self, domain_B: torch.Tensor, window: int, generator: torch.Generator) -> torch.Tensor:
        """One window of `window` bytes per row, uniformly placed inside that row's domain stream."""
        num_starts_B = self.length_G[domain_B] - window + 1
        # Drawing from a huge range then reducing gives per-row ranges from one call, with negligible bias.
        draw_B = torch.randint(0, 2**62, domain_B.shape, generator=generator)
        start_B = self.offset_G[domain_B] + draw_B % num_starts_B
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
        domain_B = balanced_domains_B(index * self.batch_size, self.batch_size, len(self.domains))
        generator = torch_generator(self.seed, purpose, index)
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
    check_byte_config(cfg)
    require(
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
    check_byte_config(cfg)
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
