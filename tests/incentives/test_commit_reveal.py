"""Commit-reveal weights (moe.incentives.ledger.submissions): Yuma counts revealed rows only, reveals
must open their commits, a resumed run reveals what it committed, and a weight copier earns less."""

from __future__ import annotations

import copy
import logging
import sqlite3
from pathlib import Path

import pytest

from moe.errors import LedgerError
from moe.incentives.ledger.signing import submission_message, validator_identity
from moe.ledger import RewardLedger, verify_ledger
from tests.helpers.ledger_drivers import (
    SUBNETS,
    block_hashes,
    copier_dividend_share,
    drive,
    make_config,
    rehash_chain,
    run_ledger,
    tamper,
    writer_key,
)

TEMPO = 5  # make_config's: epochs at blocks 5, 10, 15, ... (two steps per block)


def weight_rows(path: Path, block: int) -> dict[tuple[str, int], list[tuple[int, int]]]:
    conn = sqlite3.connect(path)
    rows: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for subnet, validator, miner, value in conn.execute(
        "SELECT subnet, validator, miner, value FROM weights WHERE block = ? ORDER BY subnet, validator, miner",
        (block,),
    ):
        rows.setdefault((subnet, validator), []).append((miner, value))
    conn.close()
    return rows


def test_yuma_counts_only_the_rows_revealed_now(tmp_path):
    plain, hidden = tmp_path / "plain.sqlite", tmp_path / "commit_reveal.sqlite"
    run_ledger(plain, 60)
    run_ledger(hidden, 60, make_config(commit_reveal=True))
    verify_ledger(hidden)  # every reveal opens its commit, and Yuma's outcome follows from the revealed rows
    assert weight_rows(hidden, TEMPO) == {}  # the first epoch has nothing revealed
    for block in range(2 * TEMPO, 31, TEMPO):
        # the validators that do not read the consensus choose the same rows in both ledgers; with
        # commit-reveal Yuma counts each of them one epoch later
        for key, row in weight_rows(plain, block - TEMPO).items():
            if key[1] != 4:  # all but the weight copier, whose consensus differs
                assert weight_rows(hidden, block)[key] == row, (block, key)
    conn = sqlite3.connect(hidden)
    kinds = conn.execute("SELECT kind, COUNT(*) FROM submissions GROUP BY kind").fetchall()
    salts = conn.execute("SELECT COUNT(*) FROM submissions WHERE kind = 'commit' AND salt != ''").fetchone()
    conn.close()
    assert dict(kinds) == {"commit": 6 * 2 * 5, "reveal": 5 * 2 * 5}  # epochs × subnets × validators
    assert salts == (0,)  # a commit shows the digest only


def test_a_reveal_that_does_not_open_its_commit_fails(tmp_path):
    """Even with every key (writer and validator), a changed reveal no longer matches its commit."""
    path = tmp_path / "ledger.sqlite"
    run_ledger(path, 60, make_config(commit_reveal=True))
    conn = sqlite3.connect(path)
    (genesis,) = conn.execute("SELECT hash FROM blocks WHERE height = 0").fetchone()
    (salt,) = conn.execute(
        "SELECT salt FROM submissions WHERE block = 20 AND subnet = 'layer0' AND validator = 0 AND kind = 'reveal'"
    ).fetchone()
    values = dict(conn.execute(
        "SELECT miner, value FROM weights WHERE block = 20 AND subnet = 'layer0' AND validator = 0"))  # fmt: skip
    conn.close()
    row = [values.get(miner, 0) for miner in range(4)]
    row[1] -= 1
    message = submission_message(genesis, 20, "layer0", 0, "reveal", salt=salt, row=row)
    signature = validator_identity(writer_key(), 7, 0).sign(message).hex()
    tamper(
        path,
        "UPDATE weights SET value = value - 1 WHERE block = 20 AND subnet = 'layer0' AND validator = 0 AND miner = 1",
        f"UPDATE submissions SET signature = '{signature}' WHERE block = 20 AND subnet = 'layer0' AND validator = 0 "
        "AND kind = 'reveal'",
    )
    rehash_chain(path, sign_with=writer_key())
    with pytest.raises(
        LedgerError, match="block 20: subnet 'layer0': validator 0's revealed weights do not match"
    ):
        verify_ledger(path)


@pytest.mark.parametrize("resume_step", [40, 50])
def test_resume_reveals_what_was_committed_before_the_checkpoint(tmp_path, resume_step):
    cfg = make_config(commit_reveal=True)
    reference, resumed = tmp_path / "reference.sqlite", tmp_path / "resumed.sqlite"
    run_ledger(reference, 80, cfg)
    with RewardLedger(resumed, cfg, SUBNETS, seed=7) as ledger:
        drive(ledger, 1, resume_step)
        state = ledger.checkpoint_state()
        drive(ledger, resume_step + 1, 66)  # killed later than its checkpoint
    assert state["unrevealed"]["layer0"]  # the checkpoint keeps the rows committed at block 20 or 25
    with RewardLedger(
        resumed, cfg, SUBNETS, seed=7, resume_step=resume_step, checkpoint_state=state
    ) as ledger:
        drive(ledger, resume_step + 1, 80)
    verify_ledger(resumed)
    assert block_hashes(resumed) == block_hashes(reference)


def test_resume_refuses_unrevealed_rows_that_do_not_match_the_commits(tmp_path, caplog):
    cfg = make_config(commit_reveal=True)
    path = tmp_path / "ledger.sqlite"
    with RewardLedger(path, cfg, SUBNETS, seed=7) as ledger:
        drive(ledger, 1, 40)
        state = ledger.checkpoint_state()
    forged = copy.deepcopy(state)
    forged["unrevealed"]["layer0"][0] = [1, 2, 3, 4]
    with pytest.raises(
        LedgerError, match="unrevealed weights of validator 0 in subnet 'layer0' do not match"
    ):
        RewardLedger(path, cfg, SUBNETS, seed=7, resume_step=40, checkpoint_state=forged)
    with caplog.at_level(logging.WARNING), RewardLedger(path, cfg, SUBNETS, seed=7, resume_step=40) as ledger:
        drive(ledger, 41, 50)  # no checkpoint state: nothing to reveal at the next epoch, still valid
    assert "cannot reveal" in caplog.text
    assert weight_rows(path, 25) == {}
    verify_ledger(path)


def test_weight_copier_earns_less_under_commit_reveal_when_miners_change(tmp_path):
    """Three validators (honest 600, honest 250, copier 150 of stake); every miner's quality is redrawn
    every 3 epochs. The copier copies last epoch's consensus: with commit-reveal that consensus comes from
    rows chosen one epoch earlier still, so its copy is staler and clipped more. With miners that never
    change, commit-reveal costs it almost nothing: the cut is about stale copies."""
    share = {
        (commit_reveal, phase): copier_dividend_share(
            tmp_path / f"{commit_reveal}-{phase}.sqlite", commit_reveal, epochs=40, epochs_per_phase=phase
        )
        for commit_reveal in (False, True)
        for phase in (3, 1000)
    }
    changing_cut = share[(False, 3)] - share[(True, 3)]
    steady_cut = share[(False, 1000)] - share[(True, 1000)]
    assert changing_cut > 0.005, share
    assert changing_cut > 2 * abs(steady_cut), share
    assert share[(True, 3)] < 0.15  # below its stake share
