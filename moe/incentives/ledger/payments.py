"""Compute payments: the owner's treasury pays providers for the tokens their experts processed.

The treasury (account ``treasury``) is funded at genesis with ``ledger.treasury`` tokens by one
``payouts`` row of block 0 (reason ``fund``), so every balance is still the sum of its payouts and the
invariant at every block is ``Σ balances + burned == issuance + funded``.

Training steps report charges (objects with ``provider``, ``hotkey``, ``layer``, ``tokens`` and
``price_per_1k_units``, e.g. ``experts.market.ComputeCharge``). A block sums the charges of its steps
per (subnet = layer, provider, price) and pays each sum ``tokens × price_per_1k_units // 1000`` units
(the floor of the block's sum) from the treasury to ``provider/<name>``, an account registered in the
block of its first payment with the charge's hotkey (a name stays bound to that key). Sums are paid in
the order of (subnet, provider, price); when the treasury cannot cover one it pays what is left, and the
``payments`` row records the rest as ``unpaid`` (recorded, not owed later), so no balance goes
negative: ``amount + unpaid == tokens × price_per_1k_units // 1000`` on every row. ``settle_payments``
is a pure function of a block's recorded charges and the treasury's balance, so ``verify`` re-runs it.
"""

from __future__ import annotations

import sqlite3
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from moe.errors import LedgerError
from moe.incentives.ledger.epoch import TREASURY, BlockDraft

FUND_REASON = "fund"
COMPUTE_REASON = "compute"
PROVIDER_PREFIX = "provider/"
PRICE_TOKENS = 1000  # price_per_1k_units is the price of this many tokens processed

# A block's charges summed: (subnet, provider, hotkey, tokens, price_per_1k_units).
ChargeRow = tuple[str, str, str, int, int]
ChargeKey = tuple[str, str, str, int]  # (subnet, provider, hotkey, price_per_1k_units)


def funding_rows(accounts: Sequence[Sequence[Any]], funded: int) -> list[tuple[Any, ...]]:
    """The genesis ``payouts`` row that funds the treasury (none when ``funded`` is 0)."""
    (treasury,) = [row[0] for row in accounts if row[1] == TREASURY]
    return [(0, "", treasury, FUND_REASON, funded)] if funded else []


def _whole(value: Any, field: str, provider: Any) -> int:
    """A non-negative integer field of a charge; ``LedgerError`` naming the provider otherwise."""
    try:
        number = int(value)
        exact = number == value
    except (TypeError, ValueError):
        exact = False
    if not exact or number < 0:
        raise LedgerError(
            f"a charge of provider {provider!r} has {field}={value!r}; it must be an integer >= 0"
        )
    return number


class OpenCharges:
    """The charges of the block still open, with tokens summed per (subnet, provider, hotkey, price)."""

    def __init__(self, subnets: Sequence[str]) -> None:
        self._subnets = list(subnets)
        self._tokens: dict[ChargeKey, int] = defaultdict(int)

    def check(self, charges: Iterable[Any], hotkeys: Mapping[str, str]) -> list[tuple[ChargeKey, int]]:
        """One step's charges as (key, tokens), or ``LedgerError`` naming the first bad one: a bad field, an
        unknown subnet, or a key other than the one its provider is bound to (``hotkeys``: registered
        providers; or earlier in the open block)."""
        bound = dict(hotkeys) | {provider: hotkey for _, provider, hotkey, _ in self._tokens}
        checked = []
        for charge in charges:
            key, tokens = self._checked(charge)
            if bound.setdefault(key[1], key[2]) != key[2]:
                raise LedgerError(
                    f"a charge of provider {key[1]} names key {key[2]}; it is bound to {bound[key[1]]}"
                )
            checked.append((key, tokens))
        return checked

    def add(self, checked: Iterable[tuple[ChargeKey, int]]) -> None:
        """Add the charges ``check`` returned to the open block."""
        for key, tokens in checked:
            self._tokens[key] += tokens

    def _checked(self, charge: Any) -> tuple[ChargeKey, int]:
        provider = charge.provider
        if not isinstance(provider, str) or not provider:
            raise LedgerError(f"a charge names no provider ({provider!r})")
        if charge.layer not in self._subnets:
            raise LedgerError(
                f"a charge of provider {provider!r} for unknown subnet {charge.layer!r}; subnets: {self._subnets}"
            )
        price = _whole(charge.price_per_1k_units, "price_per_1k_units", provider)
        return (charge.layer, provider, str(charge.hotkey), price), _whole(charge.tokens, "tokens", provider)

    def rows(self) -> list[ChargeRow]:
        return [
            (subnet, provider, hotkey, tokens, price)
            for (subnet, provider, hotkey, price), tokens in self._tokens.items()
            if tokens
        ]

    def clear(self) -> None:
        self._tokens.clear()


def settle_payments(draft: BlockDraft, charges: Iterable[ChargeRow], hotkeys: Mapping[str, str]) -> None:
    """Pay the block's summed ``charges`` from the treasury (see the module docstring): ``payments``
    rows, one ``payouts`` debit of the treasury per subnet and one credit per (subnet, provider), and an
    account for each provider paid for the first time. ``hotkeys``: the key each known provider is bound to."""
    bound = dict(hotkeys)
    available = draft.balance(TREASURY)
    moved: dict[tuple[str, str], int] = defaultdict(int)
    for subnet, provider, hotkey, tokens, price in sorted(charges, key=lambda row: (row[0], row[1], row[4])):
        account = PROVIDER_PREFIX + provider
        if provider not in bound:
            draft.register(account, "provider", "", len(bound), provider.rsplit("/", 1)[0], hotkey)
            bound[provider] = hotkey
        elif bound[provider] != hotkey:
            raise LedgerError(
                f"block {draft.height}: provider {provider} is bound to key {bound[provider]}, but a charge "
                f"in subnet {subnet} names key {hotkey}"
            )
        due = tokens * price // PRICE_TOKENS
        amount = min(due, available)
        available -= amount
        draft.rows["payments"].append(
            (draft.height, subnet, provider, hotkey, tokens, price, amount, due - amount)
        )
        moved[(subnet, TREASURY)] -= amount
        moved[(subnet, account)] += amount
    for (subnet, account), amount in moved.items():
        draft.move(subnet, account, COMPUTE_REASON, amount)


def replay_payments(
    draft: BlockDraft,
    recorded: Mapping[str, Sequence[tuple[Any, ...]]],
    hotkeys: Mapping[str, str],
    names: Mapping[int, str],
) -> None:
    """Re-run ``settle_payments`` on a recorded block's charges and check every payment and every
    compute payout against it, naming the block and the provider; ``names``: account id → name."""
    settle_payments(draft, [row[1:6] for row in recorded["payments"]], hotkeys)
    rebuilt = {(row[1], row[2], row[5]): row for row in draft.rows["payments"]}
    for row in recorded["payments"]:
        expected = rebuilt[(row[1], row[2], row[5])]
        if row != expected:
            raise LedgerError(
                f"block {draft.height}: the payment to provider {row[2]} in subnet {row[1]} records amount "
                f"{row[6]}, unpaid {row[7]}, but {row[4]} tokens at {row[5]} units per 1k from the treasury "
                f"give amount {expected[6]}, unpaid {expected[7]}"
            )
    recorded_moves, rebuilt_moves = _compute_moves(recorded["payouts"]), _compute_moves(draft.rows["payouts"])
    moved = set(recorded_moves) | set(rebuilt_moves)
    for subnet, account in sorted(
        moved, key=lambda key: (names.get(key[1]) == TREASURY, key)
    ):  # providers first
        found, expected = recorded_moves.get((subnet, account), 0), rebuilt_moves.get((subnet, account), 0)
        if found != expected:
            raise LedgerError(
                f"block {draft.height}: payouts move {found} units of compute on "
                f"{names.get(account, f'account {account}')} in subnet {subnet}, but the block's payments give {expected}"
            )


def _compute_moves(payouts: Iterable[tuple[Any, ...]]) -> dict[tuple[str, int], int]:
    return {(row[1], row[2]): row[4] for row in payouts if row[3] == COMPUTE_REASON}


def provider_hotkeys(conn: sqlite3.Connection) -> dict[str, str]:
    """Each registered provider's name and the key it is bound to."""
    return {
        name.removeprefix(PROVIDER_PREFIX): hotkey
        for name, hotkey in conn.execute("SELECT name, hotkey FROM accounts WHERE role = 'provider'")
    }


def payments_summary(conn: sqlite3.Connection) -> dict[str, Any]:
    """The treasury (funded, balance), compute paid and unpaid in all (units), and per provider its key,
    tokens processed, units paid and unpaid; for summaries and reports."""
    funded, paid = (
        conn.execute(
            "SELECT COALESCE(SUM(amount), 0) FROM payouts WHERE reason = ? AND amount > 0", (reason,)
        ).fetchone()[0]
        for reason in (FUND_REASON, COMPUTE_REASON)
    )
    (balance,) = conn.execute("SELECT balance FROM accounts WHERE name = ?", (TREASURY,)).fetchone()
    by_provider = {
        provider: {"hotkey": hotkey, "tokens": tokens, "paid": amount, "unpaid": unpaid}
        for provider, hotkey, tokens, amount, unpaid in conn.execute(
            "SELECT provider, hotkey, SUM(tokens), SUM(amount), SUM(unpaid) FROM payments "
            "GROUP BY provider ORDER BY provider"
        )
    }
    unpaid = sum(entry["unpaid"] for entry in by_provider.values())
    return {"funded": funded, "treasury": balance, "paid": paid, "unpaid": unpaid, "by_provider": by_provider}


def recorded_payments(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """Every payment a ledger records, block by block, for ``show`` and reports."""
    columns = ("block", "step", "subnet", "provider", "tokens", "price_per_1k_units", "amount", "unpaid")
    query = (
        "SELECT p.block, b.step, p.subnet, p.provider, p.tokens, p.price_per_1k_units, p.amount, p.unpaid "
        "FROM payments p JOIN blocks b ON b.height = p.block ORDER BY p.block, p.subnet, p.provider, "
        "p.price_per_1k_units"
    )
    return [dict(zip(columns, row, strict=True)) for row in conn.execute(query)]
