"""Models: a small decoder-only byte LM whose FFNs are MoE layers, and an MLP with one MoE layer.

Legend: B batch, T time, D model width, H heads, k head width (D / H), Z batch·heads, Y vocabulary, I/O
regression input/output width.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from moe.errors import ConfigError
from moe.nn.layer import MoELayer

MoEFactory = Callable[[str, int], MoELayer]  # (layer name, d_model) -> layer


@dataclass
class ModelConfig:
    arch: str = "auto"  # auto (by the data's task) | transformer | mlp
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    moe_layers: list[int] | None = None  # transformer blocks with an MoE FFN; None = every block
    dense_d_ff: int = 512  # FFN width of the blocks without MoE
    max_seq_len: int = 512
    # auto: under CPU bf16 autocast the way measured fastest for the heads' size (`attention_way`), else
    # torch's fused kernel; or always one of ATTENTION_WAYS: scores (explicit bf16 scores: faster for
    # short sequences, less precise where scores peak), fused, fused_fp32
    attention: str = "auto"


# Under CPU bf16 autocast, torch 2.13's fused (flash) attention is slow in bf16 for short sequences: a
# fixed cost per (batch, head) outweighs the cheaper arithmetic. Measured (forward + backward, B·T = 2048,
# 1 and 2 threads; benchmarks/moe_layer.py --sections attention; single runs swing by 30 % on this shared
# machine, so only repeated orderings count):
# - up to T = 512 with heads of 32 and more, explicit bf16 scores (one batched matmul that also scales and
#   masks, a softmax, a matmul) are mostly the fastest: at T=128 0.35-0.55x the best fused time for k=128,
#   0.5-0.9x for k=64; for k=32 from 0.65x to 1.3x by run, and in the default LM's training step (k=32,
#   T=128) 3 % faster than fused fp32 (paired blocks, two runs);
# - heads of 16 are faster fused in fp32 (explicit scores 1.04-1.9x in all runs but one);
# - beyond T = 512 the fused kernel is fastest: in fp32 for small heads (k² · T < 2^21), as its fixed cost
#   is per head, in bf16 for larger ones; explicit scores there cost up to 3x the best.
CPU_BF16_SCORES_MAX_SEQ_LEN = 512  # the longest sequence whose attention runs as explicit scores
CPU_BF16_SCORES_MIN_HEAD = 32  # the smallest head that does
CPU_BF16_FUSED_MIN_SIZE = 2**21  # otherwise: head size² · sequence length from which fused bf16 is faster


def attention_way(x_BHTk: torch.Tensor) -> str:
    """How attention on `x_BHTk` is computed: "scores", "fused_fp32" or "fused" (`ATTENTION_WAYS`). Under
    CPU bf16 autocast, the way measured fastest for its sequence length and head size; otherwise "fused",
    torch's kernel in the ambient precision."""
    cpu_bf16_autocast = (
        x_BHTk.device.type == "cpu"
        and torch.is_autocast_enabled("cpu")
        and torch.get_autocast_dtype("cpu") == torch.bfloat16
    )
    seq_len, head_size = x_BHTk.shape[-2:]
    if not cpu_bf16_autocast:
        return "fused"
    if seq_len <= CPU_BF16_SCORES_MAX_SEQ_LEN and head_size >= CPU_BF16_SCORES_MIN_HEAD:
        return "scores"
    return "fused_fp32" if head_size**2 * seq_len < CPU_BF16_FUSED_MIN_SIZE else "fused"


def scores_attention(q_BHTk: torch.Tensor, k_BHTk: torch.Tensor, v_BHTk: torch.Tensor) -> torch.Tensor:
    """Causal softmax attention with its [T, T] scores materialised, computed in bf16 whatever the inputs'
    dtype (as the eager attention of common bf16 training code) and returned in theirs: the scale and the
    mask are applied inside the scores' matmul, which accumulates in fp32 and rounds the scores to bf16;
    the softmax accumulates in fp32 and rounds its probabilities to bf16. The fused bf16 kernel keeps
    scores in fp32, so peaked scores cost this way precision: relative error against float64 on the same
    bf16 inputs (T=128, k=32) 3.1e-3 vs the fused kernel's 1.9e-3 at score std ~1, 8.6e-3 vs 1.6e-3 at
    std ~8 (`model.attention=fused` or `fused_fp32` trades the speed back for it)."""
    batch, heads, seq_len, head_size = q_BHTk.shape
    q_ZTk, k_ZTk, v_ZTk = (
        t.to(torch.bfloat16).reshape(batch * heads, seq_len, head_size) for t in (q_BHTk, k_BHTk, v_BHTk)
    )
    mask_TT = torch.full((seq_len, seq_len), float("-inf"), dtype=torch.bfloat16, device=q_BHTk.device)
    scores_ZTT = torch.baddbmm(mask_TT.triu(1), q_ZTk, k_ZTk.transpose(1, 2), alpha=head_size**-0.5)
    y_ZTk = torch.softmax(scores_ZTT, dim=-1) @ v_ZTk
    return y_ZTk.view(batch, heads, seq_len, head_size).to(q_BHTk.dtype)


def fused_attention(q_BHTk: torch.Tensor, k_BHTk: torch.Tensor, v_BHTk: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q_BHTk, k_BHTk, v_BHTk, is_causal=True)


def fused_fp32_attention(q_BHTk: torch.Tensor, k_BHTk: torch.Tensor, v_BHTk: torch.Tensor) -> torch.Tensor:
    with torch.autocast(q_BHTk.device.type, enabled=False):
        return fused_attention(q_BHTk.float(), k_BHTk.float(), v_BHTk.float())


ATTENTION_WAYS = {"scores": scores_attention, "fused": fused_attention, "fused_fp32": fused_fp32_attention}


def causal_attention(
    q_BHTk: torch.Tensor, k_BHTk: torch.Tensor, v_BHTk: torch.Tensor, way: str | None = None
) -> torch.Tensor:
    """Causal softmax attention, computed `way` (a key of `ATTENTION_WAYS`; None: as `attention_way` says
    is fastest for these heads)."""
    return ATTENTION_WAYS[way or attention_way(q_BHTk)](q_BHTk, k_BHTk, v_BHTk)


class Attention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, way: str = "auto"):
        super().__init__()
        if d_model % n_heads:
            raise ConfigError(f"model.d_model={d_model} is not divisible by model.n_heads={n_heads}")
        if way != "auto" and way not in ATTENTION_WAYS:
            raise ConfigError(f"model.attention={way!r}; valid: auto, {', '.join(ATTENTION_WAYS)}")
        self.n_heads, self.way = n_heads, None if way == "auto" else way
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model, bias=False)

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        q_BHTk, k_BHTk, v_BHTk = rearrange(
            self.qkv(x_BTD), "b t (three h k) -> three b h t k", three=3, h=self.n_heads
        )
        y_BHTk = causal_attention(q_BHTk, k_BHTk, v_BHTk, self.way)
        return self.proj(rearrange(y_BHTk, "b h t k -> b t (h k)"))


class DenseFFN(nn.Module):
    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_model, d_ff), nn.GELU(), nn.Linear(d_ff, d_model))

    def forward(self, x_BTD: torch.Tensor, token_ids_BT=None, step: int = 0) -> tuple[torch.Tensor, dict]:
        return self.net(x_BTD), {}


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, ffn: nn.Module, attention: str = "auto"):
        super().__init__()
        self.ln_attn = nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, attention)
        self.ln_ffn = nn.LayerNorm(d_model)
        self.ffn = ffn

    def forward(
        self, x_BTD: torch.Tensor, token_ids_BT: torch.Tensor, step: int = 0
    ) -> tuple[torch.Tensor, dict]:
        x_BTD = x_BTD + self.attn(self.ln_attn(x_BTD))
        y_BTD, aux = self.ffn(self.ln_ffn(x_BTD), token_ids_BT, step)
        return x_BTD + y_BTD, aux


class MoEModel(nn.Module):
    """Common surface for the trainer: `forward(inputs, step=0) -> (prediction, aux losses)` and
    `moe_layers()`. `step` is the training step, passed down to every expert pool call."""

    task: str

    def moe_layers(self) -> list[MoELayer]:
        return [m for m in self.modules() if isinstance(m, MoELayer)]

    @contextmanager
    def sequences_routed_alone(self) -> Iterator[None]:
        """Inside, every MoE layer routes each sequence of a batch as if it were alone in it."""
        with ExitStack() as stack:
            for layer in self.moe_layers():
                stack.enter_context(layer.sequences_routed_alone())
            yield

    def loss_per_example(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean loss per example [B]: next-byte cross-entropy (nats) or mean squared error."""
        batch = targets.shape[0]
        return self.loss_per_token(pred, targets).view(batch, -1).mean(-1)

    def loss_per_token(self, pred: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Loss of every token [N], in the order the MoE layers see them (b t): next-byte cross-entropy
        (nats) or, for a regression example (one token), its mean squared error."""
        if self.task == "lm":
            # a row per token: cross_entropy would copy a (b v t) view of the logits, transposed
            logits_NY = rearrange(pred.float(), "b t y -> (b t) y")
            return F.cross_entropy(logits_NY, rearrange(targets, "b t -> (b t)"), reduction="none")
        return (pred.float() - targets).square().mean(-1)


class TransformerLM(MoEModel):
    task = "lm"

    def __init__(self, cfg: ModelConfig, vocab_size: int, make_moe: MoEFactory):
        super().__init__()
        moe_blocks = set(range(cfg.n_layers) if cfg.moe_layers is None else cfg.moe_layers)
        bad = sorted(i for i in moe_blocks if not 0 <= i < cfg.n_layers)
        if bad:
            raise ConfigError(f"model.moe_layers {bad} out of range for model.n_layers={cfg.n_layers}")
        self.max_seq_len = cfg.max_seq_len
        self.embed = nn.Embedding(vocab_size, cfg.d_model)
        self.pos = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(
                cfg.d_model,
                cfg.n_heads,
                make_moe(f"layer{i}", cfg.d_model)
                if i in moe_blocks
                else DenseFFN(cfg.d_model, cfg.dense_d_ff),
                cfg.attention,
            )
            for i in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens_BT: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        seq_len = tokens_BT.shape[1]
        if seq_len > self.max_seq_len:
            raise ConfigError(f"sequence length {seq_len} exceeds model.max_seq_len={self.max_seq_len}")
        x_BTD = self.embed(tokens_BT) + self.pos(torch.arange(seq_len, device=tokens_BT.device))
        aux_losses: dict[str, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x_BTD, aux = block(x_BTD, tokens_BT, step)
            aux_losses.update({f"layer{i}/{name}": loss for name, loss in aux.items()})
        logits_BTY = F.linear(self.ln_f(x_BTD), self.embed.weight)  # tied embedding
        return logits_BTY, aux_losses

    @torch.no_grad()
    def next_token_logits(self, tokens_BT: torch.Tensor, window: int, step: int = 0) -> torch.Tensor:
        """Logits [B, Y] of the token after each row, from the model (in its current mode) run on the
        row's last `window` tokens alone, each row routed on its own: what generating one sequence
        computes, so nothing after the row's end can reach them, whatever the router."""
        with self.sequences_routed_alone():
            logits_BTY, _ = self(tokens_BT[:, -window:], step=step)
        return logits_BTY[:, -1].float()


class MixtureMLP(MoEModel):
    """in-projection → one residual MoE layer → out-projection, for the `clusters` regression task."""

    task = "regression"

    def __init__(self, cfg: ModelConfig, input_dim: int, output_dim: int, make_moe: MoEFactory):
        super().__init__()
        self.inp = nn.Sequential(nn.Linear(input_dim, cfg.d_model), nn.GELU())
        self.ln = nn.LayerNorm(cfg.d_model)
        self.moe = make_moe("layer0", cfg.d_model)
        self.out = nn.Linear(cfg.d_model, output_dim)

    def forward(self, x_BI: torch.Tensor, step: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        h_BD = self.inp(x_BI)
        y_B1D, aux = self.moe(self.ln(h_BD)[:, None, :], None, step)
        h_BD = h_BD + y_B1D[:, 0, :]
        return self.out(h_BD), {f"layer0/{name}": loss for name, loss in aux.items()}


ARCHS = {"transformer": "lm", "mlp": "regression"}


def build_model(cfg: ModelConfig, data, make_moe: MoEFactory) -> MoEModel:
    """The architecture follows the data's task unless `model.arch` names one explicitly."""
    arch = cfg.arch
    if arch == "auto":
        arch = "transformer" if data.task == "lm" else "mlp"
    if arch not in ARCHS:
        raise ConfigError(f"unknown model.arch '{cfg.arch}'; valid: auto, {', '.join(ARCHS)}")
    if ARCHS[arch] != data.task:
        raise ConfigError(f"model.arch={arch} does not fit data task '{data.task}'; use model.arch=auto")
    if arch == "transformer":
        return TransformerLM(cfg, data.vocab_size, make_moe)
    return MixtureMLP(cfg, data.input_dim, data.output_dim, make_moe)
