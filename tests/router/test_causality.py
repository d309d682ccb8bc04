"""Causality of every router, as declared: changing only the future tokens of one sequence never changes
the routing of that sequence's past in a mode the router declares causal, and does change it, for some
such change, in a mode it declares non-causal (see `Router` in router/common.py for the definition).

The batch is B sequences of T tokens flattened as the MoE layer flattens it, `(b t) d`; "the past" is
positions ≤ t0 of one sequence, "the future" its positions > t0. Routing compared: each past token's
experts and gates, and whether it was dropped.

Legend: B sequences, T positions, D model width, E experts, N = B·T tokens, Y vocabulary.
"""

from __future__ import annotations

import copy

import pytest
import torch
from einops import rearrange

import router
from router.plan import DispatchPlan

B, T, D, E, VOCAB = 3, 24, 16, 8, 256
PAST_ENDS = (5, 17)  # t0: the last position of "the past"
TIGHT = {"capacity_factor": 0.5, "eval_capacity_factor": 0.5}  # buffers overflow often: drops to test

# Every registered router with its defaults, plus the options that change causality or stress it.
CASES = [(name, {}) for name in router.names()] + [
    ("gshard", {"order": "paper", **TIGHT}),
    ("gshard", TIGHT),
    ("switch", TIGHT),
    ("base", {"eval_routing": "balanced"}),
]


def case_id(case) -> str:
    name, options = case
    return name + "".join(f"-{k}={v}" for k, v in options.items())


Routing = dict[int, tuple[tuple[int, float], ...]]


def routing_of(plan: DispatchPlan, tokens: range) -> tuple[Routing, list[int]]:
    """Per token in `tokens`: its (expert, gate) pairs, gates to 1e-6; and which of them were dropped."""
    routes: dict[int, list[tuple[int, float]]] = {t: [] for t in tokens}
    for token, expert, gate in zip(
        plan.token_idx.tolist(), plan.expert_idx.tolist(), plan.gate.tolist(), strict=True
    ):
        if token in routes:
            routes[token].append((expert, round(gate, 6)))
    dropped = sorted(t for t in plan.dropped.tolist() if t in tokens)
    return {t: tuple(sorted(pairs)) for t, pairs in routes.items()}, dropped


def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(B, T, D, generator=generator), torch.randint(0, VOCAB, (B, T), generator=generator)


def route_batch(module, x_BTD: torch.Tensor, ids_BT: torch.Tensor) -> DispatchPlan:
    """Route from a copy, so every call starts from the same state (step counters, balancing biases)."""
    with torch.no_grad():
        return copy.deepcopy(module)(rearrange(x_BTD, "b t d -> (b t) d"), rearrange(ids_BT, "b t -> (b t)"))


def future_changes(module, x_BTD: torch.Tensor, ids_BT: torch.Tensor, seq: int, t0: int):
    """Copies of the batch that differ only at positions > t0 of sequence `seq`: fresh random tokens, and
    for every expert e, tokens aimed at e (along its gate row, for a learned router) that crowd its buffer."""
    generator = torch.Generator().manual_seed(seq * 100 + t0)
    aims_ED = (
        module.gate.weight.detach() if hasattr(module, "gate") else torch.randn(E, D, generator=generator)
    )
    count = T - t0 - 1
    futures_FD = [torch.randn(count, D, generator=generator) * 2]
    for aim_D in aims_ED:
        futures_FD.append(
            4 * D**0.5 * aim_D / aim_D.norm() + 0.1 * torch.randn(count, D, generator=generator)
        )
    for future_FD in futures_FD:
        x2_BTD, ids2_BT = x_BTD.clone(), ids_BT.clone()
        x2_BTD[seq, t0 + 1 :] = future_FD
        ids2_BT[seq, t0 + 1 :] = torch.randint(0, VOCAB, (count,), generator=generator)
        yield x2_BTD, ids2_BT


def past_routing_changes(module, training: bool) -> tuple[bool, bool]:
    """(whether any future change moved the past's routing, whether any moved the future's own routing)."""
    module.train(training)
    x_BTD, ids_BT = make_batch()
    plan = route_batch(module, x_BTD, ids_BT)
    past_moved = future_moved = False
    for seq in (0, B - 1):
        for t0 in PAST_ENDS:
            past, future = range(seq * T, seq * T + t0 + 1), range(seq * T + t0 + 1, (seq + 1) * T)
            for x2_BTD, ids2_BT in future_changes(module, x_BTD, ids_BT, seq, t0):
                changed = route_batch(module, x2_BTD, ids2_BT)
                past_moved |= routing_of(plan, past) != routing_of(changed, past)
                future_moved |= routing_of(plan, future) != routing_of(changed, future)
    return past_moved, future_moved


@pytest.mark.parametrize("training", [True, False], ids=["training", "eval"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_future_tokens_change_past_routing_exactly_when_declared_non_causal(case, training):
    name, options = case
    torch.manual_seed(0)
    module = router.build(name, D, E, **options)
    past_moved, future_moved = past_routing_changes(module, training)
    declared = module.is_causal(training)
    assert declared == type(module).causal_for(module.config, training)
    assert past_moved == (not declared), (
        f"router '{case_id(case)}' declares causal={declared} "
        f"{'in training' if training else 'at evaluation'}, but future tokens "
        f"{'changed' if past_moved else 'never changed'} the past's routing"
    )
    if name != "random":  # random routing ignores the tokens: nothing to move
        assert future_moved, "the changes did not even reach the changed tokens' routing: a vacuous test"


DEFAULT_CAUSALITY = {  # what the test above establishes for each router's defaults: (training, eval)
    "base": (False, True),
    "bias_balanced": (True, True),
    "expert_choice": (False, False),
    "gshard": (True, True),
    "hash": (True, True),
    "random": (True, True),
    "sinkhorn": (False, True),
    "switch": (True, True),
    "topk": (True, True),
}


@pytest.mark.parametrize("name", router.names())
def test_every_router_declares_its_causality_per_mode(name):
    factory, config = router.lookup(name).factory, router.registry.make_config(name)
    assert (factory.causal_for(config, True), factory.causal_for(config, False)) == DEFAULT_CAUSALITY[name]


def test_base_evaluates_as_trained_when_asked():
    torch.manual_seed(0)
    module = router.build("base", D, E, eval_routing="balanced")
    x_ND = torch.randn(64, D) + 2.0 * module.gate.weight[0].detach()  # most tokens prefer expert 0
    trained, evaluated = module.train()(x_ND), module.eval()(x_ND)
    assert evaluated.counts.tolist() == [64 // E] * E
    assert torch.equal(evaluated.token_idx, trained.token_idx)
    assert torch.equal(evaluated.expert_idx, trained.expert_idx)


@pytest.mark.parametrize(
    ("case", "depends"),
    [(("switch", TIGHT), True), (("gshard", TIGHT), True), (("topk", {}), False)],
    ids=lambda v: case_id(v) if isinstance(v, tuple) else str(v),
)
def test_capacity_routers_are_causal_yet_depend_on_earlier_sequences(case, depends):
    """What the definition allows: a buffer filled by an earlier sequence drops a later sequence's
    token, so a batched score differs from one-sequence generation, with no look-ahead in its own text."""
    name, options = case
    torch.manual_seed(0)
    module = router.build(name, D, E, **options).train()
    x_BTD, ids_BT = make_batch()
    later_sequences = range(T, B * T)
    plan = route_batch(module, x_BTD, ids_BT)
    moved = False
    for changed_batch in future_changes(module, x_BTD, ids_BT, seq=0, t0=-1):  # all of sequence 0 changes
        moved |= routing_of(plan, later_sequences) != routing_of(
            route_batch(module, *changed_batch), later_sequences
        )
    assert moved == depends
    assert module.is_causal()
