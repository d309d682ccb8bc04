"""Prefix evaluation: the causal val loss of a byte LM, every val token scored from its prefix alone.

Token t of a val sequence x is predicted by the model (evaluation mode) run on x[:t+1] only, its last
position's logits: exactly what generation computes (`TransformerLM.next_token_logits`, the path
`moe.experiments.generation` samples with). No router can look ahead there, so for a router whose
evaluation routing is not causal (`Router.causal_in_eval`, e.g. expert_choice) this is the loss the
model really has as a causal LM; for a causal router whose choices are per token it equals the
full-sequence val loss (routers whose choices depend on the batch, through capacity drops or random
draws, score a sequence alone differently without looking ahead: a short prefix overflows a capacity
buffer sooner). Cost: val sequences × seq_len prefixes; the prefixes of one length go through one
forward, each sequence routed alone so the batch changes nothing.

`causal_val_loss(run)` caches its result in the run dir (`causal_eval.json`, keyed by the checkpoint's
name and digest), so re-rendering a comparison is cheap.

Legend: S val sequences, T time, R rows of one forward, Y vocabulary.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moe.engine.checkpoint import find_checkpoint, run_dir_of
from moe.engine.validation import LN2, evaluate
from moe.errors import ConfigError
from moe.experiments.trained import context_window, load_trained
from moe.nn.model import TransformerLM

log = logging.getLogger(__name__)

CAUSAL_EVAL_FILE = "causal_eval.json"
TOKENS_PER_FORWARD = 16_384  # prefixes of one length are batched up to this many tokens per forward
LOG_EVERY_S = 10.0


@torch.no_grad()
def prefix_loss(model: TransformerLM, batches: list, *, window: int, step: int = 0) -> float:
    """Mean over every target of `batches` of its loss (nats) given the model run on its prefix alone."""
    inputs_ST = torch.cat([batch.inputs for batch in batches])
    targets_ST = torch.cat([batch.targets for batch in batches])
    num_seqs, seq_len = inputs_ST.shape
    was_training = model.training
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    start = last_log = time.perf_counter()
    try:
        for t in range(seq_len):
            rows = max(1, TOKENS_PER_FORWARD // (t + 1))
            for first in range(0, num_seqs, rows):
                logits_RY = model.next_token_logits(
                    inputs_ST[first : first + rows, : t + 1], window, step=step
                )
                target_R = targets_ST[first : first + rows, t].to(logits_RY.device)
                loss_sum += F.cross_entropy(logits_RY, target_R, reduction="sum").double().cpu()
            if time.perf_counter() - last_log > LOG_EVERY_S or t + 1 == seq_len:
                last_log = time.perf_counter()
                log.info(
                    "prefix evaluation: %d/%d prefix lengths of %d val sequences, %.0f s",
                    t + 1, seq_len, num_seqs, last_log - start,
                )  # fmt: skip
    finally:
        model.train(was_training)
    return float(loss_sum / targets_ST.numel())


def causal_val_loss(run_dir_or_ckpt: str | Path) -> dict:
    """The run's (newest) checkpoint's `val/causal_loss` and `val/causal_bpb` by prefix evaluation on its
    val set, with its full-sequence `val/loss` beside them; cached in the run dir's `causal_eval.json`."""
    path = find_checkpoint(run_dir_or_ckpt)
    cache_file = run_dir_of(path) / CAUSAL_EVAL_FILE
    digest = file_digest(path)
    cache = read_cache(cache_file)
    entry = cache.get(path.name)
    if entry is not None and entry.get("digest") == digest:
        return entry
    entry = {"digest": digest, **evaluate_prefixes(path)}
    cache[path.name] = entry
    tmp = cache_file.with_suffix(".tmp")
    tmp.write_text(json.dumps(cache, indent=1))
    tmp.replace(cache_file)
    return entry


def evaluate_prefixes(path: Path) -> dict:
    run, state = load_trained(path)
    try:
        model = run.accelerator.unwrap_model(run.model)
        if run.model.task != "lm":
            raise ConfigError(f"{path} holds a '{model.task}' model: prefix evaluation needs a byte LM")
        step, batches = int(state["step"]), run.data.val_batches()
        log.info("prefix evaluation of %s (step %d)", path, step)
        causal = prefix_loss(model, batches, window=context_window(run.cfg), step=step)
        full = evaluate(model, batches, run.data.domains, step=step)["val/loss"]
    finally:
        run.transport.close()
    tokens = sum(batch.targets.numel() for batch in batches)
    return {
        "step": step,
        "tokens": tokens,
        "val/causal_loss": causal,
        "val/causal_bpb": causal / LN2,
        "val/loss": full,
    }


def read_cache(path: Path) -> dict:
    """checkpoint name → entry; an unreadable cache counts as empty (it is recomputed)."""
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def file_digest(path: Path) -> str:
    with open(path, "rb") as file:
        return hashlib.file_digest(file, "blake2b").hexdigest()[:32]
