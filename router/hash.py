"""Hash routing (Roller et al. 2021): each token id always goes to the same expert; no parameters.

Legend: N tokens, D model width, E experts, Y vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from router.common import Router, check_config, check_no_router_losses, plan_from_token_choices
from router.plan import DispatchPlan
from router.registry import RouterConfig, register
from router.seeds import torch_generator


@dataclass
class HashConfig(RouterConfig):
    name: str = "hash"
    vocab_size: int = 256  # token ids must lie in [0, vocab_size); byte-level data by default
    seed: int = 0  # which fixed random permutation of the vocabulary; not the training seed on purpose


@register("hash", HashConfig)
class HashRouter(Router):
    """Token id v goes to expert perm(v) mod E for a fixed random permutation of the vocabulary, so every
    expert owns ⌊V/E⌋ or ⌈V/E⌉ ids (balanced over the vocabulary, not over a batch's frequencies) and
    the hash is unrelated to id order. Gate 1: the token's output is its expert's output. Real text
    uses ids unevenly (bytes: space and 'e' dominate), so the load per batch is not balanced; Roller et
    al.'s frequency-balanced hash would need corpus statistics.

    The selection bias is ignored: the expert is a fixed function of the token id, by definition.
    """

    config: HashConfig

    def __init__(self, d_model: int, num_experts: int, config: HashConfig):
        check_no_router_losses(config)
        check_config(config.vocab_size >= 1, f"router.vocab_size={config.vocab_size} must be >= 1")
        super().__init__(num_experts, config)
        generator = torch_generator(config.seed, "hash")
        permutation_Y = torch.randperm(config.vocab_size, generator=generator)
        # A function of the config, rebuilt on construction; not part of the checkpoint.
        self.register_buffer("expert_of_id_Y", permutation_Y % num_experts, persistent=False)

    def route_tokens(self, x_ND, token_ids_N, selection_bias_E) -> DispatchPlan:
        self._check_ids(token_ids_N, x_ND.shape[0])
        expert_N1 = self.expert_of_id_Y[token_ids_N][:, None]
        gate_N1 = torch.ones(expert_N1.shape, dtype=torch.float32, device=x_ND.device)
        return plan_from_token_choices(expert_N1, gate_N1, num_experts=self.num_experts)

    def _check_ids(self, token_ids_N: torch.Tensor | None, num_tokens: int) -> None:
        check_config(
            token_ids_N is not None,
            "router 'hash' routes by token id, but this model passes none (e.g. the regression MLP "
            "of data=clusters); choose another router",
        )
        if token_ids_N.shape != (num_tokens,):
            raise ValueError(
                f"hash router: {num_tokens} tokens but token ids of shape {tuple(token_ids_N.shape)}"
            )
        if token_ids_N.numel() and not (
            int(token_ids_N.min()) >= 0 and int(token_ids_N.max()) < self.config.vocab_size
        ):
            raise ValueError(
                f"token ids span [{int(token_ids_N.min())}, {int(token_ids_N.max())}] "
                f"outside router.vocab_size={self.config.vocab_size}"
            )
