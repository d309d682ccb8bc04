"""A worker's own checkpoint file (safetensors): experts round-trip bit-exactly with their optimizer
state, and a missing, truncated or corrupt file is a CheckpointError naming its path."""

from __future__ import annotations

import pytest
import torch

from experts.modules import FFN
from experts.owner import ExpertOwner, OptimizerSettings
from experts.remote.checkpoint import load_messages, save_messages
from experts.remote.wire import Kind, Message, expert_state_from, expert_state_message
from moe.errors import CheckpointError

pytestmark = pytest.mark.timeout(60)


def trained_owner(seed: int) -> ExpertOwner:
    torch.manual_seed(seed)
    owner = ExpertOwner(FFN(4, 8), OptimizerSettings(lr=1e-2, grad_clip=1.0))
    for _ in range(2):
        owner.module(torch.randn(3, 4)).square().sum().backward()
        owner.step()
    return owner


def state_message(owner: ExpertOwner, expert: int) -> Message:
    state = owner.state_dict()
    meta = {"layer_name": "layer0", "spec": {"kind": "ffn"}, "steps": owner.steps}
    return expert_state_message(
        Kind.STATE, state["module"], state["optimizer"], meta=meta, layer=1, expert=expert
    )


def test_experts_and_optimizer_state_round_trip_through_the_file(tmp_path):
    path = tmp_path / "experts.safetensors"
    owners = [trained_owner(seed) for seed in range(3)]
    save_messages(path, [state_message(owner, e) for e, owner in enumerate(owners)])
    back = load_messages(path)
    got = [(m.kind, m.layer, m.expert, m.meta["steps"]) for m in back]
    assert got == [(Kind.STATE, 1, e, 2) for e in range(3)]
    for owner, message in zip(owners, back, strict=True):
        params, optimizer_state = expert_state_from(message)
        clone = ExpertOwner(FFN(4, 8), OptimizerSettings(lr=1.0))
        clone.load_state_dict({"module": params, "optimizer": optimizer_state})
        assert clone.optimizer.param_groups[0]["lr"] == 1e-2  # hyperparameters came from the file
        for a, b in zip(owner.module.parameters(), clone.module.parameters(), strict=True):
            assert torch.equal(a, b)
            assert torch.equal(owner.optimizer.state[a]["exp_avg_sq"], clone.optimizer.state[b]["exp_avg_sq"])
            assert torch.equal(owner.optimizer.state[a]["step"], clone.optimizer.state[b]["step"])


def test_a_missing_truncated_or_corrupt_file_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "experts.safetensors"
    with pytest.raises(CheckpointError, match="experts.safetensors"):
        load_messages(path)
    save_messages(path, [state_message(trained_owner(0), 0)])
    data = bytearray(path.read_bytes())
    flipped = bytearray(data)
    flipped[-3] ^= 0xFF  # inside the tensor bytes: safetensors alone would load it silently
    path.write_bytes(bytes(flipped))
    with pytest.raises(CheckpointError, match="experts.safetensors"):
        load_messages(path)
    path.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CheckpointError, match="experts.safetensors"):
        load_messages(path)
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="experts.safetensors"):
        load_messages(path)
