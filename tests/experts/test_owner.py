"""ExpertOwner: the one step every owner takes (LocalPool and workers): clip, step, zero; a stale owner
only drops its gradients; a non-finite gradient skips the step instead of poisoning the expert."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from experts.modules import FFN
from experts.owner import ExpertOwner, OptimizerSettings, StepReport, step_owners

pytestmark = pytest.mark.timeout(60)

SETTINGS = OptimizerSettings(lr=1e-2, weight_decay=0.1, grad_clip=0.5)


def backward(module: torch.nn.Module, seed: int = 0) -> None:
    module(torch.randn(5, 4, generator=torch.Generator().manual_seed(seed))).square().sum().backward()


def owner_with_gradients(seed: int = 0) -> ExpertOwner:
    torch.manual_seed(seed)
    owner = ExpertOwner(FFN(4, 8), SETTINGS)
    backward(owner.module, seed)
    return owner


def test_a_step_clips_then_steps_adamw_and_zeroes_the_gradients():
    torch.manual_seed(0)
    owner = ExpertOwner(FFN(4, 8), SETTINGS)
    reference = copy.deepcopy(owner.module)
    backward(owner.module)
    backward(reference)
    optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-2, weight_decay=0.1)
    norm = float(torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5))
    optimizer.step()
    report = owner.step()
    assert report.skipped is None
    assert report.grad_norm == pytest.approx(norm)
    assert owner.steps == 1
    for mine, theirs in zip(owner.module.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs)
        assert mine.grad is None


def test_a_stale_owner_drops_its_gradients_without_stepping():
    owner = owner_with_gradients()
    before = copy.deepcopy(owner.module.state_dict())
    assert owner.step(learns=False).skipped is None
    assert owner.steps == 0
    assert all(p.grad is None for p in owner.module.parameters())
    for name, value in owner.module.state_dict().items():
        assert torch.equal(value, before[name])


def test_a_non_finite_gradient_skips_the_step_and_says_so():
    owner = owner_with_gradients()
    before = copy.deepcopy(owner.module.state_dict())
    next(owner.module.parameters()).grad[0, 0] = float("nan")
    report = owner.step()
    assert report.skipped == "non-finite gradient"
    assert report.grad_norm is None
    assert owner.steps == 0
    for name, value in owner.module.state_dict().items():
        assert torch.equal(value, before[name])


def test_zero_missing_grads_moves_adamw_as_an_empty_call_does_in_process():
    torch.manual_seed(0)
    called_empty = ExpertOwner(FFN(4, 8), SETTINGS)
    never_called = copy.deepcopy(called_empty)
    called_empty.module(torch.empty(0, 4)).sum().backward()  # in-process: zero gradients
    called_empty.step()
    never_called.step(zero_missing_grads=True)  # a worker told it was called with no tokens
    for a, b in zip(called_empty.module.parameters(), never_called.module.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert called_empty.optimizer.state.keys() == set(called_empty.module.parameters())
    assert never_called.optimizer.state.keys() == set(never_called.module.parameters())


def test_stepping_owners_together_equals_stepping_each():
    together = [owner_with_gradients(seed) for seed in range(3)]
    alone = [owner_with_gradients(seed) for seed in range(3)]
    reports = step_owners(together, [True, False, True])
    assert reports == [alone[0].step(), alone[1].step(learns=False), alone[2].step()]
    for a, b in zip(together, alone, strict=True):
        for name, value in a.module.state_dict().items():
            torch.testing.assert_close(value, b.module.state_dict()[name], atol=0, rtol=0)


def test_batched_steps_are_torchs_own_clip_and_step_bit_for_bit():
    """Owners stepped together (norms in one sync, clipping only where the factor is below 1, one
    functional AdamW call per set of hyperparameters) end exactly where torch's `clip_grad_norm_` and
    each owner's own `optimizer.step()` leave them: small gradients, clipped ones, a non-finite one
    (skipped), a stale owner, and two learning rates (two batches)."""
    scales = [0.01, 1.0, 10.0, float("nan"), 1.0]
    learns = [True, True, True, True, False]
    torch.manual_seed(0)
    modules = [FFN(4, 8) for _ in scales]
    settings = [OptimizerSettings(lr=lr, weight_decay=0.1, grad_clip=0.5) for lr in (1e-2, 3e-3) * 3][
        : len(scales)
    ]
    owners = [ExpertOwner(copy.deepcopy(m), s) for m, s in zip(modules, settings, strict=True)]
    optimizers = [
        torch.optim.AdamW(m.parameters(), lr=s.lr, weight_decay=s.weight_decay, fused=True)
        for m, s in zip(modules, settings, strict=True)
    ]
    for step in range(3):
        expected = []
        for owner, module, optimizer, scale, learning in zip(
            owners, modules, optimizers, scales, learns, strict=True
        ):
            for target in (owner.module, module):
                (
                    target(torch.randn(5, 4, generator=torch.Generator().manual_seed(step))) * scale
                ).square().sum().backward()
            norm = float(torch.nn.utils.clip_grad_norm_(module.parameters(), 0.5)) if learning else None
            if learning and math.isfinite(norm):
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            expected.append(norm)
        reports = step_owners(owners, learns)
        assert [r.grad_norm for r in reports[:3]] == expected[:3]
        assert reports[3].skipped == "non-finite gradient"
        assert reports[4] == StepReport()
        for owner, module, optimizer in zip(owners, modules, optimizers, strict=True):
            for mine, theirs in zip(owner.module.parameters(), module.parameters(), strict=True):
                assert torch.equal(mine, theirs)
            for mine, theirs in zip(owner.optimizer.state.values(), optimizer.state.values(), strict=True):
                assert all(torch.equal(mine[key], theirs[key]) for key in theirs)
    assert [owner.steps for owner in owners] == [3, 3, 3, 0, 0]


def test_a_norm_just_below_the_clip_is_clipped_as_torch_clips_it():
    """At clip − 1e-6 torch's factor clip / (norm + 1e-6), computed in float32, can round to just
    below 1 while the same quotient computed otherwise gives exactly 1: the owner must scale as torch
    does (the review's case: clip 6.112760864703578, a norm of 6.112760066986084)."""
    clip, norm = 6.112760864703578, 6.112760066986084
    module = torch.nn.Linear(1, 1, bias=False)
    owner = ExpertOwner(copy.deepcopy(module), OptimizerSettings(lr=1e-2, grad_clip=clip))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, weight_decay=0.0, fused=True)
    for target in (owner.module, module):
        target.weight.grad = torch.full((1, 1), norm)
    torch.nn.utils.clip_grad_norm_(module.parameters(), clip)
    assert float(module.weight.grad) < norm  # torch scales this one
    optimizer.step()
    step_owners([owner], [True])
    assert torch.equal(owner.module.weight, module.weight)
    assert torch.equal(
        owner.optimizer.state[owner.module.weight]["exp_avg"], optimizer.state[module.weight]["exp_avg"]
    )


def test_state_round_trips_into_a_fresh_owner():
    owner = owner_with_gradients()
    owner.step()
    clone = ExpertOwner(FFN(4, 8), OptimizerSettings(lr=1.0))
    clone.load_state_dict(owner.state_dict())
    assert clone.optimizer.param_groups[0]["lr"] == 1e-2
    assert clone.steps == owner.steps == 1  # a restored miner reports the steps it had taken
    for a, b in zip(owner.module.parameters(), clone.module.parameters(), strict=True):
        assert torch.equal(a, b)


def test_a_state_without_a_step_count_leaves_the_count_as_it_is():
    owner = owner_with_gradients()
    owner.step()
    state = owner.state_dict()
    del state["steps"]  # a pool's layout (LocalPool, RemotePool checkpoints) keeps no counts
    owner.load_state_dict(state)
    assert owner.steps == 1


def test_an_audit_snapshot_is_the_optimizer_state_dict_copied():
    """The per-step commit's fast snapshot has `state_dict()`'s layout and values, in new storage."""
    from experts.commitments import optimizer_snapshot

    module = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)
    for _ in range(2):
        module(torch.randn(5, 4)).square().sum().backward()
        optimizer.step()
    snapshot, reference = optimizer_snapshot(optimizer), optimizer.state_dict()
    assert snapshot["param_groups"] == reference["param_groups"]
    assert snapshot["state"].keys() == reference["state"].keys()
    for index, entry in reference["state"].items():
        for key, value in entry.items():
            assert torch.equal(snapshot["state"][index][key], value)
            assert snapshot["state"][index][key].data_ptr() != value.data_ptr()
    fresh = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)
    fresh.load_state_dict(snapshot)  # what an audit's step replay does with it


def test_a_loaded_snapshot_is_placed_as_torchs_load_state_dict_places_it():
    """State off the wire (host tensors, any float dtype) lands in a fresh optimizer as torch's own
    `load_state_dict` would put it: on the parameter's device, in its dtype; `step` in float32."""
    from experts.commitments import load_optimizer_snapshot, optimizer_snapshot

    module = torch.nn.Linear(4, 3)
    trained = torch.optim.AdamW(module.parameters(), lr=1e-2, fused=True)
    module(torch.randn(5, 4)).square().sum().backward()
    trained.step()
    snapshot = optimizer_snapshot(trained)
    for entry in snapshot["state"].values():
        entry["exp_avg"] = entry["exp_avg"].double()  # a peer that sent float64
    fresh, reference = (torch.optim.AdamW(module.parameters(), lr=1.0, fused=True) for _ in range(2))
    load_optimizer_snapshot(fresh, snapshot)
    reference.load_state_dict(snapshot)
    for param in module.parameters():
        for key, value in reference.state[param].items():
            mine = fresh.state[param][key]
            assert (mine.dtype, mine.device) == (value.dtype, value.device), key
            assert torch.equal(mine, value), key
    assert fresh.param_groups[0]["lr"] == 1e-2
