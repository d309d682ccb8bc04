"""The synthetic `clusters` regression task: a problem with known expert structure.

Shape legend: B batch, I input dim, O output dim, L clusters, J hidden units of a cluster's target function.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe.data.sources import Batch, balanced_domains_B, check_batching, register_data, require
from router.seeds import torch_generator

_CLUSTER_SPREAD = 3.0
_CLUSTER_HIDDEN = 32
_CLUSTER_GAIN = 1.5


@dataclass
class ClustersDataConfig:
    """Synthetic regression: inputs from `num_clusters` Gaussian clusters, each with its own target function."""

    name: str = "clusters"
    num_clusters: int = 8
    input_dim: int = 16
    output_dim: int = 16
    batch_size: int = 64
    num_val_batches: int = 4
    noise: float = 0.01


class ClustersSource:
    """Regression on K Gaussian clusters; cluster k's target is its own random tanh MLP of the input's offset
    from the cluster centre, so an MoE that gives each cluster an expert can fit what one dense net cannot.
    The task (centres and target functions) and every batch are deterministic from the seed."""

    task = "regression"
    vocab_size = 0

    def __init__(self, cfg: ClustersDataConfig, seed: int):
        self.input_dim, self.output_dim = cfg.input_dim, cfg.output_dim
        self.domains = [f"cluster{k}" for k in range(cfg.num_clusters)]
        self.batch_size, self.noise, self.seed = cfg.batch_size, cfg.noise, seed
        k, d_in, hidden, d_out = cfg.num_clusters, cfg.input_dim, _CLUSTER_HIDDEN, cfg.output_dim
        generator = torch_generator(seed, "clusters-task")
        self.center_LI = _CLUSTER_SPREAD * torch.randn(k, d_in, generator=generator)
        self.w_in_LIJ = _CLUSTER_GAIN / math.sqrt(d_in) * torch.randn(k, d_in, hidden, generator=generator)
        self.bias_LJ = torch.randn(k, hidden, generator=generator)
        self.w_out_LJO = 1 / math.sqrt(hidden) * torch.randn(k, hidden, d_out, generator=generator)
        self._val_batches = [self._batch("val", index) for index in range(cfg.num_val_batches)]

    def target_function(self, x_BI: torch.Tensor, cluster_B: torch.Tensor) -> torch.Tensor:
        """The noiseless target of each input under its cluster's function."""
        offset_BI = x_BI - self.center_LI[cluster_B]
        hidden_BJ = torch.tanh(
            torch.einsum("bi,bij->bj", offset_BI, self.w_in_LIJ[cluster_B]) + self.bias_LJ[cluster_B]
        )
        return torch.einsum("bj,bjo->bo", hidden_BJ, self.w_out_LJO[cluster_B])

    def train_batch(self, step: int) -> Batch:
        return self._batch("train", step)

    def val_batches(self) -> list[Batch]:
        return list(self._val_batches)

    def _batch(self, purpose: str, index: int) -> Batch:
        generator = torch_generator(self.seed, purpose, index)
        cluster_B = balanced_domains_B(index * self.batch_size, self.batch_size, len(self.domains))
        x_BI = self.center_LI[cluster_B] + torch.randn(self.batch_size, self.input_dim, generator=generator)
        noise_BO = self.noise * torch.randn(self.batch_size, self.output_dim, generator=generator)
        return Batch(x_BI, self.target_function(x_BI, cluster_B) + noise_BO, cluster_B)


@register_data("clusters", ClustersDataConfig)
def build_clusters(cfg: ClustersDataConfig, seed: int) -> ClustersSource:
    """The synthetic clusters regression task."""
    check_batching(cfg)
    for key in ("num_clusters", "input_dim", "output_dim"):
        require(getattr(cfg, key) >= 1, key, getattr(cfg, key), "must be at least 1")
    require(cfg.noise >= 0, "noise", cfg.noise, "must not be negative")
    return ClustersSource(cfg, seed)
