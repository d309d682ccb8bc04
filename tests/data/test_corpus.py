"""Tests for moe.data: determinism, held-out splits, domain balance, the corpus cache, text files, clusters."""

import logging
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from omegaconf import OmegaConf

import moe.data.corpus as corpus
from moe.data import Batch, build_data
from moe.data.clusters import ClustersDataConfig
from moe.data.corpus import DomainSpec, load_or_build_corpus
from moe.data.sources import balanced_domains_B
from moe.data.streams import MixtureDataConfig, TextDataConfig
from moe.errors import ConfigError, DataError
from tests.helpers import CONFIGS

CONFIG_DIR = CONFIGS / "data"
SMALL_CAP = 100_000


@pytest.fixture(scope="module")
def mixture_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus-cache")


@pytest.fixture(scope="module")
def mixture(mixture_cache):
    cfg = MixtureDataConfig(
        max_bytes_per_domain=SMALL_CAP, seq_len=32, batch_size=8, cache_dir=str(mixture_cache)
    )
    return build_data(cfg, seed=0)


def _unique_text(seed: int, num_bytes: int) -> bytes:
    """Random lowercase text: any 33-byte window occurs once, so a window pins down where it came from."""
    letters = torch.randint(
        ord("a"), ord("z") + 1, (num_bytes,), generator=torch.Generator().manual_seed(seed)
    )
    return bytes(letters.tolist())


@pytest.fixture
def text_files(tmp_path):
    paths = []
    for index, stem in enumerate(["alpha", "beta", "gamma"]):
        path = tmp_path / f"{stem}.txt"
        path.write_bytes(_unique_text(index, 4000 + 1000 * index))
        paths.append(path)
    return paths


def _text_cfg(paths, **overrides) -> TextDataConfig:
    return TextDataConfig(files=[str(path) for path in paths], seq_len=32, batch_size=6, **overrides)


def _rows(batch: Batch) -> list[bytes]:
    """Each row's full window: its inputs and the one byte after them."""
    window_BW = torch.cat([batch.inputs, batch.targets[:, -1:]], dim=1)
    return [bytes(row.tolist()) for row in window_BW]


def _assert_same(first: Batch, second: Batch) -> None:
    for name in ("inputs", "targets", "domain_B"):
        assert torch.equal(getattr(first, name), getattr(second, name)), name


# ---------------------------------------------------------------------------------------------- mixture


def test_mixture_has_four_capped_domains(mixture):
    assert mixture.task == "lm"
    assert (mixture.vocab_size, mixture.input_dim, mixture.output_dim) == (256, 0, 0)
    assert mixture.domains == ["python", "cpp", "docs", "bible"]
    for domain in mixture.domains:
        assert len(mixture.split.train[domain]) + len(mixture.split.val[domain]) == SMALL_CAP


def test_lm_batches_are_bytes_with_shifted_targets(mixture):
    batch = mixture.train_batch(3)
    assert batch.inputs.shape == batch.targets.shape == (8, 32)
    assert batch.inputs.dtype == batch.targets.dtype == batch.domain_B.dtype == torch.long
    assert int(batch.inputs.min()) >= 0
    assert int(batch.inputs.max()) < 256
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])


def test_train_batches_are_a_pure_function_of_seed_and_step(mixture, mixture_cache):
    _assert_same(mixture.train_batch(5), mixture.train_batch(5))
    assert not torch.equal(mixture.train_batch(5).inputs, mixture.train_batch(6).inputs)
    cfg = MixtureDataConfig(
        max_bytes_per_domain=SMALL_CAP, seq_len=32, batch_size=8, cache_dir=str(mixture_cache)
    )
    _assert_same(mixture.train_batch(5), build_data(cfg, seed=0).train_batch(5))
    assert not torch.equal(mixture.train_batch(5).inputs, build_data(cfg, seed=1).train_batch(5).inputs)


def test_windows_come_from_their_domain_train_stream(mixture):
    for step in range(3):
        batch = mixture.train_batch(step)
        for window, domain in zip(_rows(batch), batch.domain_B.tolist(), strict=True):
            assert window in mixture.split.train[mixture.domains[domain]]


def test_val_is_fixed_and_held_out_by_document(mixture):
    first, second = mixture.val_batches(), mixture.val_batches()
    assert len(first) == 8
    for one, other in zip(first, second, strict=True):
        _assert_same(one, other)
    for domain in mixture.domains:
        train, val = mixture.split.train_documents[domain], mixture.split.val_documents[domain]
        assert train
        assert val
        assert not set(train) & set(val)
    for batch in first:
        for window, domain in zip(_rows(batch), batch.domain_B.tolist(), strict=True):
            assert window in mixture.split.val[mixture.domains[domain]]


def test_val_split_depends_on_seed(mixture, mixture_cache):
    cfg = MixtureDataConfig(
        max_bytes_per_domain=SMALL_CAP, seq_len=32, batch_size=8, cache_dir=str(mixture_cache)
    )
    other = build_data(cfg, seed=1)
    assert other.split.val_documents != mixture.split.val_documents


def test_batches_are_balanced_across_domains(mixture):
    counts_D = torch.zeros(4, dtype=torch.long)
    for step in range(4):
        batch_counts_D = torch.bincount(mixture.train_batch(step).domain_B, minlength=4)
        assert int(batch_counts_D.max() - batch_counts_D.min()) <= 1
        counts_D += batch_counts_D
    assert counts_D.tolist() == [8, 8, 8, 8]


@given(first=st.integers(0, 10_000), batch_size=st.integers(1, 64), num_domains=st.integers(1, 12))
def test_round_robin_domains_differ_by_at_most_one(first, batch_size, num_domains):
    counts = torch.bincount(balanced_domains_B(first, batch_size, num_domains), minlength=num_domains)
    assert int(counts.max() - counts.min()) <= 1
    over_steps = torch.cat(
        [balanced_domains_B(step * batch_size, batch_size, num_domains) for step in range(num_domains)]
    )
    assert torch.bincount(over_steps, minlength=num_domains).tolist() == [batch_size] * num_domains


def test_warm_mixture_cache_is_reused(mixture, mixture_cache, monkeypatch):
    def no_rebuild(*args, **kwargs):
        raise AssertionError("the corpus was rebuilt although its cache is warm")

    monkeypatch.setattr(corpus, "corpus_dataset", no_rebuild)
    cfg = MixtureDataConfig(
        max_bytes_per_domain=SMALL_CAP, seq_len=32, batch_size=8, cache_dir=str(mixture_cache)
    )
    assert build_data(cfg, seed=0).split.train == mixture.split.train


def test_too_small_cap_names_the_cap(mixture_cache):
    cfg = MixtureDataConfig(max_bytes_per_domain=100, seq_len=32, cache_dir=str(mixture_cache))
    with pytest.raises(ConfigError, match="data.max_bytes_per_domain"):
        build_data(cfg, seed=0)


# ---------------------------------------------------------------------------------------------- cache


def _spec_of(paths: list[Path]) -> list[DomainSpec]:
    return [DomainSpec("notes", paths[0].parent, tuple(paths), corpus.whole_file)]


def _count_builds(monkeypatch) -> list[int]:
    builds = []
    real_corpus_dataset = corpus.corpus_dataset

    def counting(*args, **kwargs):
        builds.append(1)
        return real_corpus_dataset(*args, **kwargs)

    monkeypatch.setattr(corpus, "corpus_dataset", counting)
    return builds


def test_cache_is_reused_and_rebuilt_when_an_input_changes(tmp_path, monkeypatch):
    note = tmp_path / "note.txt"
    note.write_bytes(b"first version")
    builds = _count_builds(monkeypatch)
    cache_root = tmp_path / "cache"
    assert load_or_build_corpus(_spec_of([note]), None, cache_root)["data"][0] == b"first version"
    assert load_or_build_corpus(_spec_of([note]), None, cache_root)["data"][0] == b"first version"
    assert len(builds) == 1
    note.write_bytes(b"second version, longer")
    assert load_or_build_corpus(_spec_of([note]), None, cache_root)["data"][0] == b"second version, longer"
    assert len(builds) == 2
    load_or_build_corpus(_spec_of([note]), 5, cache_root)
    assert len(builds) == 3, "a different cap is a different corpus"


def test_killed_build_leaves_no_cache_and_the_next_build_succeeds(tmp_path, monkeypatch):
    import datasets

    note = tmp_path / "note.txt"
    note.write_bytes(b"some text")
    cache_root = tmp_path / "cache"

    def killed(self, path, **kwargs):
        Path(path, "half-written.arrow").write_bytes(b"\0" * 10)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(datasets.Dataset, "save_to_disk", killed)
        with pytest.raises(KeyboardInterrupt):
            load_or_build_corpus(_spec_of([note]), None, cache_root)
    assert list(cache_root.iterdir()) == []
    assert load_or_build_corpus(_spec_of([note]), None, cache_root)["data"] == [b"some text"]


def test_damaged_cache_is_rebuilt(tmp_path, caplog):
    note = tmp_path / "note.txt"
    note.write_bytes(b"some text")
    cache_root = tmp_path / "cache"
    load_or_build_corpus(_spec_of([note]), None, cache_root)
    (cache_dir,) = cache_root.iterdir()
    (cache_dir / "state.json").write_text("not json")
    with caplog.at_level(logging.WARNING, logger="moe.data.corpus"):
        assert load_or_build_corpus(_spec_of([note]), None, cache_root)["data"] == [b"some text"]
    assert "rebuilding" in caplog.text


def test_cache_root_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert corpus.default_cache_root() == tmp_path / "poimoe"


def test_cap_selects_whole_documents_across_files(tmp_path):
    paths = []
    for index in range(20):
        paths.append(tmp_path / f"{index:02d}.txt")
        paths[-1].write_bytes(bytes([65 + index]) * 100)
    files_read = []

    def counting_reader(path):
        files_read.append(path)
        return corpus.whole_file(path)

    spec = DomainSpec("notes", tmp_path, tuple(paths), counting_reader)
    documents = corpus.select_documents(spec, 550)
    assert len(files_read) == 6, "only as many files are read as the cap needs"
    assert sum(len(body) for _, body in documents) == 550
    names = [name for name, _ in documents]
    assert names == sorted(names), "documents keep their natural order"
    assert names != [path.name for path in paths[:6]], "a cap samples the domain, not its alphabetical start"


# ---------------------------------------------------------------------------------------------- text


def test_text_files_are_domains(text_files):
    source = build_data(_text_cfg(text_files), seed=0)
    assert source.domains == ["alpha", "beta", "gamma"]
    batch = source.train_batch(0)
    assert batch.domain_B.tolist() == [0, 1, 2, 0, 1, 2]
    for window, domain in zip(_rows(batch), batch.domain_B.tolist(), strict=True):
        assert window in text_files[domain].read_bytes()


def test_text_val_windows_never_occur_in_train(text_files):
    source = build_data(_text_cfg(text_files, num_val_batches=4), seed=0)
    for domain in source.domains:
        assert not set(source.split.train_documents[domain]) & set(source.split.val_documents[domain])
    for batch in source.val_batches():
        for window, domain in zip(_rows(batch), batch.domain_B.tolist(), strict=True):
            assert window in source.split.val[source.domains[domain]]
            assert window not in source.split.train[source.domains[domain]]


def test_text_accepts_a_dictconfig(text_files):
    cfg = OmegaConf.create({"name": "text", "files": [str(path) for path in text_files], "seq_len": 16})
    assert build_data(cfg, seed=0).train_batch(0).inputs.shape == (16, 16)


def test_missing_text_file_is_named(text_files, tmp_path):
    missing = tmp_path / "missing.txt"
    with pytest.raises(DataError, match=r"not found: .*missing\.txt") as caught:
        build_data(_text_cfg([*text_files, missing]), seed=0)
    assert "\n" not in str(caught.value)


def test_empty_text_file_is_named(text_files, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(DataError, match=r"empty: .*empty\.txt"):
        build_data(_text_cfg([empty, *text_files]), seed=0)


def test_directory_given_as_text_file_is_named(tmp_path):
    folder = tmp_path / "folder.txt"
    folder.mkdir()
    with pytest.raises(DataError, match=r"folder\.txt"):
        build_data(_text_cfg([folder]), seed=0)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_text_file_is_named(text_files):
    text_files[0].chmod(0)
    try:
        with pytest.raises(DataError, match=r"unreadable: .*alpha\.txt"):
            build_data(_text_cfg(text_files), seed=0)
    finally:
        text_files[0].chmod(0o644)


def test_permission_denied_is_named(text_files, monkeypatch):
    """The same path as a chmod 000 file, simulated so that it also runs as root."""
    real_read_bytes = Path.read_bytes

    def read_bytes(path):
        if path.name == "beta.txt":
            raise PermissionError(13, "Permission denied", str(path))
        return real_read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"unreadable: .*beta\.txt \(Permission denied\)"):
        build_data(_text_cfg(text_files), seed=0)


def test_text_file_too_short_to_split_is_named(tmp_path):
    short = tmp_path / "short.txt"
    short.write_bytes(b"tiny")
    with pytest.raises(DataError, match=r"too short: .*short\.txt"):
        build_data(_text_cfg([short]), seed=0)


def test_empty_file_list_names_the_key():
    with pytest.raises(ConfigError, match=r"data\.files"):
        build_data(TextDataConfig(files=[]), seed=0)


def test_two_files_with_one_stem_are_refused(text_files, tmp_path):
    twin = tmp_path / "other" / "alpha.txt"
    twin.parent.mkdir()
    twin.write_bytes(_unique_text(9, 4000))
    with pytest.raises(ConfigError, match="alpha"):
        build_data(_text_cfg([*text_files, twin]), seed=0)


# ---------------------------------------------------------------------------------------------- clusters


def test_clusters_shapes_and_determinism():
    source = build_data(ClustersDataConfig(num_clusters=4, input_dim=3, output_dim=5, batch_size=8), seed=0)
    assert (source.task, source.vocab_size, source.input_dim, source.output_dim) == ("regression", 0, 3, 5)
    assert source.domains == ["cluster0", "cluster1", "cluster2", "cluster3"]
    batch = source.train_batch(2)
    assert batch.inputs.shape == (8, 3)
    assert batch.targets.shape == (8, 5)
    assert batch.inputs.dtype == torch.float32
    assert batch.domain_B.tolist() == [0, 1, 2, 3, 0, 1, 2, 3]
    again = build_data(ClustersDataConfig(num_clusters=4, input_dim=3, output_dim=5, batch_size=8), seed=0)
    _assert_same(batch, again.train_batch(2))
    assert not torch.equal(batch.inputs, source.train_batch(3).inputs)
    other_seed = build_data(
        ClustersDataConfig(num_clusters=4, input_dim=3, output_dim=5, batch_size=8), seed=1
    )
    assert not torch.equal(batch.targets, other_seed.train_batch(2).targets)
    _assert_same(source.val_batches()[0], again.val_batches()[0])


def test_clusters_targets_are_their_cluster_function_plus_noise():
    source = build_data(ClustersDataConfig(noise=0.0), seed=0)
    batch = source.train_batch(0)
    assert torch.allclose(batch.targets, source.target_function(batch.inputs, batch.domain_B))


def test_clusters_have_different_target_functions():
    source = build_data(ClustersDataConfig(num_clusters=8), seed=0)
    offset_BI = torch.randn(256, source.input_dim, generator=torch.Generator().manual_seed(0))
    outputs = []
    for cluster in range(8):
        cluster_B = torch.full((256,), cluster)
        outputs.append(source.target_function(source.center_LI[cluster_B] + offset_BI, cluster_B))
    scale = torch.stack(outputs).std()
    for first in range(8):
        for second in range(first + 1, 8):
            assert (outputs[first] - outputs[second]).pow(2).mean().sqrt() > 0.5 * scale


def test_clusters_are_separable_and_reward_an_expert_per_cluster():
    """A linear map per cluster fits far better than one shared linear map: the structure an MoE exploits."""
    source = build_data(ClustersDataConfig(num_clusters=4, noise=0.0, batch_size=512), seed=0)
    batch = source.train_batch(0)
    nearest_B = torch.cdist(batch.inputs, source.center_LI).argmin(dim=1)
    assert torch.equal(nearest_B, batch.domain_B)

    def linear_fit_error(x_BI, y_BO):
        x_BI = torch.cat([x_BI, torch.ones(len(x_BI), 1)], dim=1)
        solution = torch.linalg.lstsq(x_BI, y_BO).solution
        return (x_BI @ solution - y_BO).pow(2).sum()

    shared = linear_fit_error(batch.inputs, batch.targets)
    per_cluster = sum(
        linear_fit_error(batch.inputs[batch.domain_B == k], batch.targets[batch.domain_B == k])
        for k in range(4)
    )
    assert per_cluster < 0.5 * shared


# ---------------------------------------------------------------------------------------------- registry, configs


def test_unknown_data_name_lists_valid_names():
    with pytest.raises(ConfigError, match="clusters, mixture, text"):
        build_data(OmegaConf.create({"name": "nope"}), seed=0)


def test_unknown_key_and_wrong_type_are_named():
    with pytest.raises(ConfigError, match=r"data\.bogus"):
        build_data(OmegaConf.create({"name": "clusters", "bogus": 1}), seed=0)
    with pytest.raises(ConfigError, match=r"data\.batch_size"):
        build_data(OmegaConf.create({"name": "clusters", "batch_size": "many"}), seed=0)
    with pytest.raises(ConfigError, match=r"data\.val_fraction"):
        build_data(TextDataConfig(files=["x.txt"], val_fraction=1.5), seed=0)


# ---------------------------------------------------------------------------------------------- install location


def _source_tree(root: Path) -> list[Path]:
    """Forty small files in nested folders: enough that a byte cap must choose among them."""
    paths = []
    for index in range(40):
        path = root / f"pkg{index % 4}" / f"module_{index:02d}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(f"# module {index}\n".encode() * (5 + index % 7))
        paths.append(path)
    return sorted(paths)


def test_corpus_does_not_depend_on_where_its_source_tree_is_installed(tmp_path):
    """Two copies of one tree at different (and differently long) paths give the same capped corpus and
    the same train/val split: choices depend on relative names, never on absolute paths."""
    here = _source_tree(tmp_path / "a")
    there = _source_tree(tmp_path / "elsewhere" / "deeper" / "venv-copy")
    cap = 2_000  # well under the tree's ~4.6 kB, so the cap has to pick files
    datasets = [
        corpus.corpus_dataset(
            [DomainSpec("python", paths[0].parents[1], tuple(paths), corpus.whole_file)], cap
        )
        for paths in (here, there)
    ]
    rows = [list(zip(d["name"], d["data"], strict=True)) for d in datasets]
    assert rows[0] == rows[1]
    assert 0 < sum(len(data) for _, data in rows[0]) <= cap
    assert len(rows[0]) < len(here), "the cap must leave some files out for this test to mean anything"
    splits = [corpus.split_corpus(d, ["python"], seed=3, val_fraction=0.2) for d in datasets]
    assert splits[0] == splits[1]
