"""Reward reporting: the summary train.py prints at the end of a run, and the run report's rewards
section (balances, emission per block, the last epoch's consensus and incentive per miner, failed
audits, compute payments per provider)."""

from __future__ import annotations

from pathlib import Path

from moe.experiments.render import figure_link, markdown_table, pyplot, save_figure
from moe.incentives.ledger import TOKEN, iter_blocks, read_summary
from moe.incentives.ledger.audits import EVIDENCE_KEYS
from moe.incentives.rewards import LEDGER_FILE

EMISSION_PLOT = "emission.png"


def format_rewards(rewards: dict) -> list[str]:
    """A short reward summary for the end of a run: issuance, blocks, balances by role and behaviour."""
    lines = [
        f"Rewards: {rewards['blocks']} blocks, {rewards['epochs']} epochs, issuance "
        f"{rewards['issuance_tokens']:.3f} tokens, burned {rewards['burned_tokens']:.3f}"
    ]
    for title, table in (("by role", rewards["by_role"]), ("by behaviour", rewards["by_behaviour"])):
        cells = "   ".join(f"{name} {amount['tokens']:.3f}" for name, amount in sorted(table.items()))
        lines.append(f"  {title:13s} {cells}")
    payments = rewards.get("payments", {})
    if payments.get("by_provider"):
        lines.append(
            f"  compute      paid {payments['paid'] / TOKEN:.3f}, unpaid {payments['unpaid'] / TOKEN:.3f}, "
            f"treasury {payments['treasury'] / TOKEN:.3f} of {payments['funded'] / TOKEN:.3f}"
        )
    return lines


def rewards_section(run_dir: Path, out_dir: Path) -> list[str]:
    """The report's rewards section: balances by role and behaviour, emission per block (plot), and
    the last epoch's consensus and incentive per miner. Empty when the run kept no ledger."""
    path = Path(run_dir) / LEDGER_FILE
    if not path.exists():
        return []
    rewards = read_summary(path)
    lines = [
        "",
        "## Rewards",
        "",
        f"{rewards['blocks']} blocks, {rewards['epochs']} epochs, issuance "
        f"{rewards['issuance_tokens']:.3f} tokens, burned {rewards['burned_tokens']:.3f} tokens.",
        "",
    ]
    balances = [
        [name, f"{amount['tokens']:.6f}"]
        for group in ("by_role", "by_behaviour")
        for name, amount in sorted(rewards[group].items())
    ]
    lines += markdown_table(["account", "tokens"], balances)
    for subnet, epoch in rewards.get("last_epoch", {}).items():
        lines += ["", f"Last epoch of subnet `{subnet}` (block {epoch['block']}):", ""]
        per_miner = zip(epoch["consensus"], epoch["incentive"], strict=True)
        lines += markdown_table(
            ["miner", "consensus", "incentive"],
            [[str(m), f"{c:.4f}", f"{i:.4f}"] for m, (c, i) in enumerate(per_miner)],
        )
    lines += audits_lines(rewards.get("audits", []))
    lines += payments_lines(rewards.get("payments", {}))
    figure = plot_emission(list(iter_blocks(path)), Path(out_dir) / EMISSION_PLOT)
    return [*lines, "", figure_link("emission per block", figure)]


def audits_lines(audits: list[dict]) -> list[str]:
    """The failed audits the ledger records: when, whom, which check, the slash and the evidence."""
    if not audits:
        return []
    slashed = sum(audit["slashed"] for audit in audits) / TOKEN
    lines = ["", f"Failed audits: {len(audits)}, slashed {slashed:.6f} tokens in all.", ""]
    rows = [
        [str(a["block"]), str(a["step"]), f"{a['subnet']}/{a['miner']}", a["check"], f"{a['slashed'] / TOKEN:.6f}",
         ", ".join(f"{k}={a['evidence'][k]}" for k in EVIDENCE_KEYS if k in a["evidence"])]
        for a in audits
    ]  # fmt: skip
    return lines + markdown_table(["block", "step", "miner", "check", "slashed", "evidence"], rows)


def payments_lines(payments: dict) -> list[str]:
    """Compute paid from the treasury per provider: tokens processed, tokens paid and unpaid."""
    if not payments.get("by_provider"):
        return []
    lines = [
        "",
        f"Compute payments: {payments['paid'] / TOKEN:.6f} tokens paid, {payments['unpaid'] / TOKEN:.6f} "
        f"unpaid (treasury funded {payments['funded'] / TOKEN:.6f}, holds {payments['treasury'] / TOKEN:.6f}).",
        "",
    ]
    rows = [
        [f"provider/{name}", str(p["tokens"]), f"{p['paid'] / TOKEN:.6f}", f"{p['unpaid'] / TOKEN:.6f}"]
        for name, p in payments["by_provider"].items()
    ]
    return lines + markdown_table(["provider", "tokens processed", "paid", "unpaid"], rows)


def plot_emission(blocks: list[tuple[int, int, int, int, int]], path: Path) -> Path:
    """Emission per block and total issuance against the block height (ledger rows, in base units)."""
    plt = pyplot()
    height = [b[0] for b in blocks]
    fig, (ax_emission, ax_issuance) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax_emission.plot(height, [b[2] / TOKEN for b in blocks])
    ax_emission.set(xlabel="block", ylabel="emission (tokens)", title="emission per block")
    ax_issuance.plot(height, [b[3] / TOKEN for b in blocks])
    ax_issuance.set(xlabel="block", ylabel="tokens", title="total issuance")
    return save_figure(fig, path)
