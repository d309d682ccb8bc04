"""The ledger's typed config (moe.incentives.ledger.config): defaults, typing, validation."""

from __future__ import annotations

import dataclasses

import pytest
from omegaconf import OmegaConf

from moe.errors import ConfigError, LedgerError
from moe.incentives.ledger.config import BEHAVIOURS
from moe.incentives.ledger.validators import WEIGHT_SETTERS
from moe.ledger import LedgerConfig, RewardLedger, ValidatorSpec, as_ledger_config
from tests.helpers import compose
from tests.helpers.ledger_drivers import SUBNETS, drive


def test_composed_default_config_is_the_dataclass():
    ledger = compose(["ledger=default"]).ledger
    assert OmegaConf.to_object(ledger) == LedgerConfig()
    assert as_ledger_config(ledger) == LedgerConfig()


def test_integer_and_float_numbers_name_the_same_ledger(tmp_path):
    as_ints = {"validators": [{"stake": 600, "behaviour": "honest"}, {"stake": 400}], "kappa": 1}
    as_floats = {"validators": [{"stake": 600.0, "behaviour": "honest"}, {"stake": 400.0}], "kappa": 1.0}
    typed = as_ledger_config(as_ints)
    assert typed == as_ledger_config(as_floats) == as_ledger_config(OmegaConf.create(as_floats))
    assert isinstance(typed.validators[0].stake, float)
    assert isinstance(typed.kappa, float)
    instance = LedgerConfig(validators=[ValidatorSpec(stake=600), ValidatorSpec(stake=400)], kappa=1)
    assert dataclasses.asdict(as_ledger_config(instance)) == dataclasses.asdict(typed)
    path = tmp_path / "ledger.sqlite"
    with RewardLedger(path, as_ints, SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 10)
    with RewardLedger(path, as_floats, SUBNETS, seed=7, resume_step=10) as ledger:  # same stored config
        assert ledger.height == 10
    with pytest.raises(LedgerError, match="different config"):
        RewardLedger(path, {**as_floats, "kappa": 0.9}, SUBNETS, seed=7, resume_step=10)


def test_unknown_key_and_wrong_type_name_the_key():
    with pytest.raises(ConfigError, match=r"ledger\.tempi"):
        as_ledger_config({"tempi": 3})
    # router.typed_config names a list element's key without its path (ledger.stake).
    with pytest.raises(ConfigError, match=r"ledger\..*stake"):
        as_ledger_config({"validators": [{"stake": "a lot"}]})


def test_unknown_behaviour_is_a_config_error_listing_the_valid_names():
    with pytest.raises(ConfigError, match="weight_copier"):
        as_ledger_config(LedgerConfig(validators=[ValidatorSpec(behaviour="sneaky")]))
    with pytest.raises(ConfigError, match="cabal_miners"):
        as_ledger_config(LedgerConfig(validators=[ValidatorSpec(behaviour="cabal")]))
    with pytest.raises(ConfigError, match="yuma3"):
        as_ledger_config(LedgerConfig(liquid_alpha=[0.1, 0.3]))


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"steps_per_block": 0}, "steps_per_block"),
        ({"tempo": 0}, "tempo"),
        ({"owner_share": -0.1}, "owner_share"),
        ({"owner_share": 0.0, "miner_share": 0.0, "validator_share": 0.0}, "must be > 0"),
        ({"kappa": 1.5}, "kappa"),
        ({"yuma3": True, "liquid_alpha": [0.3, 0.1]}, "liquid_alpha"),
        ({"validators": []}, "at least one validator"),
        ({"validators": [{"stake": -1.0}]}, r"validators\[0\]\.stake"),
        ({"validators": [{"behaviour": "cabal", "cabal_miners": [-1]}]}, "cabal_miners"),
        ({"subnet_shares": {"layer0": float("inf")}}, "subnet_shares.layer0"),
        ({"synchronous": "sometimes"}, "synchronous"),
    ],
)
def test_out_of_range_values_are_config_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        as_ledger_config(overrides)


def test_every_behaviour_has_a_weight_rule():
    assert set(BEHAVIOURS) == set(WEIGHT_SETTERS)
