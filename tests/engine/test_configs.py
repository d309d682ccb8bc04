"""Every config composes, every experiment runs a few steps, and bad configs fail naming the culprit."""

from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, ValidationError

from tests.helpers import CONFIGS, TINY, compose, run_cli

GROUP_FILES = sorted(
    (path.parent.name, path.stem)
    for path in CONFIGS.glob("*/*.yaml")
    if path.parent.name not in ("hydra", "experiment")
)
EXPERIMENTS = sorted(path.stem for path in CONFIGS.glob("experiment/*.yaml"))


@pytest.mark.parametrize(("group", "option"), GROUP_FILES)
def test_every_group_option_composes(group, option):
    cfg = compose([f"{group}={option}"])
    assert cfg.trainer.max_steps > 0


SCHEMA_FILES = [(group, option) for group, option in GROUP_FILES if group != "debug"]


def inherited_values(group: str, option: str) -> dict:
    """What `configs/<group>/<option>.yaml` starts from: its schema's defaults, or the option it extends."""
    from hydra.core.config_store import ConfigStore

    import moe.engine.config  # noqa: F401  (registers the schemas)

    parent = next(d for d in OmegaConf.load(CONFIGS / group / f"{option}.yaml").defaults if d != "_self_")
    if parent.endswith("_schema"):
        return OmegaConf.to_container(ConfigStore.instance().load(f"{group}/{parent}.yaml").node)
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{parent}.yaml"))
    values.pop("defaults")
    return {**inherited_values(group, parent), **values}


@pytest.mark.parametrize(("group", "option"), SCHEMA_FILES)
def test_group_files_hold_only_what_differs_from_their_schema(group, option):
    """The dataclass is the one source of defaults: a YAML line repeating a default would let the two drift."""
    inherited = inherited_values(group, option)
    values = OmegaConf.to_container(OmegaConf.load(CONFIGS / group / f"{option}.yaml"))
    values.pop("defaults")
    for key, value in values.items():
        assert key in inherited, f"configs/{group}/{option}.yaml: {key} is not in its schema"
        is_interpolation = isinstance(value, str) and value.startswith("${")
        assert is_interpolation or value != inherited[key], (
            f"configs/{group}/{option}.yaml repeats the default {key}: {value!r}; delete the line"
        )


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    cfg = compose([f"experiment={experiment}"])
    assert cfg.seed is not None


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_few_steps(experiment, tmp_path):
    from moe.engine.loop import train

    cfg = compose([f"experiment={experiment}", *TINY, f"run_dir={tmp_path}", "trainer.max_steps=2"])
    summary = train(cfg)
    assert summary["step"] == 2
    assert (tmp_path / "summary.json").exists()


def test_unknown_key_fails_naming_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_step=3"])
    assert "max_step" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_naming_the_key():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["trainer.max_steps=many"])
    cause = err.value.__cause__
    assert isinstance(cause, ValidationError | ConfigKeyError)
    assert "max_steps" in str(cause)


def test_router_option_typo_fails_at_load_time():
    with pytest.raises(ConfigCompositionException) as err:
        compose(["router.topk=3"])
    assert "topk" in str(err.value.__cause__)


def test_unknown_router_name_lists_valid_ones(tmp_path):
    result = run_cli("train.py", *TINY, "data=clusters", f"run_dir={tmp_path}", "router.name=nope")
    assert result.returncode != 0
    assert "unknown router 'nope'" in result.stderr
    assert "topk" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_help_and_print_config():
    help_result = run_cli("train.py", "--help")
    assert help_result.returncode == 0
    assert "router" in help_result.stdout
    cfg_result = run_cli("train.py", "--cfg", "job")
    assert cfg_result.returncode == 0
    assert "max_steps" in cfg_result.stdout
    assert "top_k" in cfg_result.stdout


def test_multirun_sweeps_router_and_seed(tmp_path):
    result = run_cli(
        "train.py",
        "-m",
        "router.top_k=1,2",
        "seed=0,1",
        *TINY,
        "data=clusters",
        f"hydra.sweep.dir={tmp_path}",
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert len(summaries) == 4
