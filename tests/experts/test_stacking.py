"""Stacked expert parameters (experts/stacking.py): rows of shared buffers that train exactly as separate
tensors, and batched commitments equal to each owner's own."""

from __future__ import annotations

import copy

import torch

from experts.commitments import param_sketch_P
from experts.modules import FFN
from experts.owner import ExpertOwner, OptimizerSettings, commit_owners, step_owners
from experts.pool import LocalPool
from experts.stacking import stack_parameters


def experts(sizes: list[int], seed: int = 0) -> list[FFN]:
    torch.manual_seed(seed)
    return [FFN(8, d_ff) for d_ff in sizes]


def own_sketch(module: torch.nn.Module) -> torch.Tensor:
    return param_sketch_P({name: p.detach() for name, p in module.named_parameters()})


def test_modules_of_one_layout_share_a_stack_and_keep_their_values():
    modules = experts([16, 16, 32, 16])
    before = [copy.deepcopy(m.state_dict()) for m in modules]
    placed = stack_parameters(modules)
    assert placed[2] is None  # the only expert of its shape: nothing to batch it with
    stack = placed[0][0]
    assert [p[1] for p in (placed[0], placed[1], placed[3])] == [0, 1, 2]
    assert placed[1][0] is stack
    assert placed[3][0] is stack
    for module, state in zip(modules, before, strict=True):
        for name, value in state.items():
            assert torch.equal(module.state_dict()[name], value)
    w_in = stack.buffers[stack.names.index("w_in.weight")]
    assert modules[3].w_in.weight.data_ptr() == w_in[2].data_ptr()
    assert all(stack.holds(row) for row in range(3))


def test_batched_sketches_equal_each_experts_own():
    modules = experts([16, 16, 16])
    stack = stack_parameters(modules)[0][0]
    sketches_GP = stack.sketches_GP()
    for row, module in enumerate(modules):
        torch.testing.assert_close(sketches_GP[row], own_sketch(module), rtol=1e-6, atol=1e-7)


def test_stacked_owners_train_as_separate_ones():
    """A pool's stacked experts step exactly as owners of unstacked copies given the same gradients."""
    modules = experts([16, 16, 16])
    reference = [ExpertOwner(copy.deepcopy(m), OptimizerSettings(lr=1e-2)) for m in modules]
    pool = LocalPool(modules, OptimizerSettings(lr=1e-2))
    assert all(owner.stacked is not None for owner in pool.owners)
    torch.manual_seed(1)
    for _ in range(3):
        x_aD = torch.randn(5, 8)
        for stacked, plain in zip(pool.owners, reference, strict=True):
            grad_aD = torch.randn(5, 8)
            stacked.forward(x_aD).backward(grad_aD)
            plain.forward(x_aD).backward(grad_aD)
        step_owners(pool.owners, [True] * 3)
        step_owners(reference, [True] * 3)
    for stacked, plain in zip(pool.owners, reference, strict=True):
        for (name, p), q in zip(stacked.module.named_parameters(), plain.module.parameters(), strict=True):
            assert torch.equal(p, q), name


def test_a_row_whose_storage_was_swapped_commits_its_own_sketch():
    pool = LocalPool(experts([16, 16, 16]))
    for owner in pool.owners:
        owner.keep_states(2)
    swapped = pool.owners[1].module.w_out.weight
    swapped.data = swapped.data.clone()  # no longer a view of the stack
    assert not pool.owners[1].stacked[0].holds(1)
    with torch.no_grad():
        swapped.add_(1.0)  # the stack's row 1 does not see this
    commit_owners(pool.owners)
    for owner in pool.owners:
        torch.testing.assert_close(owner.trail.latest[1], own_sketch(owner.module), rtol=1e-6, atol=1e-7)


def test_loading_a_pool_state_keeps_the_stack():
    source, target = LocalPool(experts([16, 16], seed=0)), LocalPool(experts([16, 16], seed=1))
    target.load_state_dict(source.state_dict())
    for mine, theirs in zip(target.owners, source.owners, strict=True):
        assert mine.stacked[0].holds(mine.stacked[1])
        for p, q in zip(mine.module.parameters(), theirs.module.parameters(), strict=True):
            assert torch.equal(p, q)


def test_one_stacked_experts_state_saves_its_own_parameters_only():
    """A view saved alone would carry its whole stack (torch.save writes whole storages)."""
    import io

    pool = LocalPool(experts([512] * 8))  # 32 KB per expert; the stack holds 256 KB
    buffer = io.BytesIO()
    torch.save(pool.owners[3].state_dict()["module"], buffer)
    own_bytes = sum(p.numel() * p.element_size() for p in pool.owners[3].module.parameters())
    assert own_bytes < len(buffer.getvalue()) < own_bytes + 8192  # the file's own framing: a few KB
