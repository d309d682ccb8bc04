"""Text from a byte LM's checkpoint: `python eval.py ckpt=<run> 'generate.prompt="def "'
generate.tokens=200 generate.temperature=0.8 generate.seed=0` prints a sample and adds it to the run's
report (the samples live in `samples.jsonl` beside `report.md`, which shows them all).

The experts run where the run ran them: in this process for `transport=local`, and for
`transport=process` in worker processes started and loaded from the checkpoint as resume does, then
torn down. Every byte comes from the model in evaluation mode run on the text so far (its last
`context_window` bytes), a full recompute per byte: routing sees only the prefix, exactly what prefix
evaluation (`moe.experiments.prefix_eval`) scores.

Legend: T time (bytes), Y vocabulary (256 byte values).
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from moe.data import build_data
from moe.errors import ConfigError
from moe.experiments.trained import checkpoint_config, context_window, open_trained
from moe.nn.model import TransformerLM
from router.seeds import torch_generator

log = logging.getLogger(__name__)

SAMPLES_FILE = "samples.jsonl"


@dataclass
class Sample:
    """One generated text and everything that made it."""

    step: int  # the checkpoint's training step
    prompt: str
    tokens: int
    temperature: float
    seed: int
    experts: str  # where the experts ran
    text: str  # prompt + continuation, decoded (invalid UTF-8 → U+FFFD); shown through `printable`

    def settings(self) -> tuple:
        return self.step, self.prompt, self.tokens, self.temperature, self.seed


def check_request(gen) -> None:
    """The `generate.*` values, checked before anything is loaded."""
    if not gen.prompt:
        raise ConfigError(
            "generate.prompt is empty: give the text to continue, quoted to keep its spaces, e.g. "
            "'generate.prompt=\"def \"'"
        )
    if gen.tokens < 1:
        raise ConfigError(f"generate.tokens={gen.tokens} must be at least 1")
    if not (math.isfinite(gen.temperature) and gen.temperature >= 0):
        raise ConfigError(f"generate.temperature={gen.temperature} must be ≥ 0 (0: greedy)")


def prompt_ids(prompt: str, window: int) -> torch.Tensor:
    """The prompt's UTF-8 bytes as token ids [T]; longer than the model's window is an error."""
    data = prompt.encode("utf-8")
    if len(data) > window:
        raise ConfigError(
            f"generate.prompt is {len(data)} bytes; the model reads at most {window} "
            "(its trained context, data.seq_len): shorten the prompt"
        )
    return torch.tensor(list(data), dtype=torch.long)


def decode(ids_T: torch.Tensor) -> str:
    """Bytes to text; a byte sequence that is not valid UTF-8 becomes U+FFFD, never an error."""
    return bytes(ids_T.tolist()).decode("utf-8", errors="replace")


def printable(text: str) -> str:
    """`text` safe for a terminal and a markdown page: control characters other than newline and tab
    become their visible symbols (ESC → ␛, DEL → ␡; C1 controls → U+FFFD), so a sample cannot move the
    cursor or start an escape sequence."""
    return text.translate(_CONTROL_PICTURES)


_CONTROL_PICTURES = (
    {c: 0x2400 + c for c in range(0x20) if chr(c) not in "\n\t"}
    | {0x7F: 0x2421}
    | dict.fromkeys(range(0x80, 0xA0), 0xFFFD)
)


def next_token(logits_Y: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The argmax at temperature 0, else a draw from softmax(logits / temperature)."""
    if temperature == 0:
        return logits_Y.argmax()
    probs_Y = (logits_Y.double() / temperature).softmax(-1)
    return torch.multinomial(probs_Y, 1, generator=generator)[0]


@torch.no_grad()
def generate(
    model: TransformerLM,
    prompt_T: torch.Tensor,
    *,
    tokens: int,
    temperature: float,
    seed: int,
    window: int,
    step: int = 0,
) -> torch.Tensor:
    """`prompt_T` followed by `tokens` generated ids, each from the model in evaluation mode on the last
    `window` ids so far; draws come from the stream (seed, "generate")."""
    generator = torch_generator(seed, "generate")
    was_training = model.training
    model.eval()
    ids_T = prompt_T.clone()
    try:
        for _ in range(tokens):
            logits_Y = model.next_token_logits(ids_T[None], window, step=step)[0]
            ids_T = torch.cat([ids_T, next_token(logits_Y.cpu(), temperature, generator).view(1)])
    finally:
        model.train(was_training)
    return ids_T


def generate_sample(ckpt: str | Path, gen, out_dir: str | Path | None = None) -> tuple[Sample, Path]:
    """Sample from the checkpoint with the experts where the run ran them and keep the sample in
    `samples.jsonl` in `out_dir` (default: the run dir); returns it and that folder."""
    check_request(gen)
    path, state, cfg = checkpoint_config(ckpt, in_process=False)
    data = build_data(cfg.data, seed=cfg.seed)
    if data.task != "lm":
        raise ConfigError(
            f"{path} holds a '{data.task}' model (data={cfg.data.name}); generation needs a byte LM "
            "(data=mixture or data=text)"
        )
    window = context_window(cfg)
    prompt_T = prompt_ids(gen.prompt, window)
    run = open_trained(path, state, cfg, data)  # starts the workers of a transport=process run
    try:
        start = time.perf_counter()
        model = run.accelerator.unwrap_model(run.model)
        ids_T = generate(
            model,
            prompt_T,
            tokens=gen.tokens,
            temperature=gen.temperature,
            seed=gen.seed,
            window=window,
            step=int(state["step"]),
        )
        log.info("generated %d bytes in %.1f s", gen.tokens, time.perf_counter() - start)
    finally:
        run.transport.close()
    sample = Sample(
        int(state["step"]),
        gen.prompt,
        gen.tokens,
        float(gen.temperature),
        gen.seed,
        experts_line(cfg),
        decode(ids_T),
    )
    out = Path(out_dir) if out_dir else run.run_dir
    save_sample(out, sample)
    return sample, out


def experts_line(cfg) -> str:
    if cfg.transport.name == "process":
        workers = cfg.transport.workers + cfg.transport.external_workers
        return f"in {workers} worker process{'es' if workers != 1 else ''} (transport=process)"
    return f"in-process (transport={cfg.transport.name})"


def read_samples(folder: Path) -> list[Sample]:
    path = Path(folder) / SAMPLES_FILE
    if not path.exists():
        return []
    return [Sample(**json.loads(line)) for line in path.read_text().splitlines() if line.strip()]


def save_sample(folder: Path, sample: Sample) -> Path:
    """Add `sample` to the folder's samples, replacing one with the same checkpoint step and settings."""
    kept = [s for s in read_samples(folder) if s.settings() != sample.settings()]
    path = Path(folder) / SAMPLES_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(asdict(s), ensure_ascii=False) + "\n" for s in [*kept, sample]))
    tmp.replace(path)
    return path


def samples_section(folder: Path) -> list[str]:
    """The report's `## Samples`: every sample kept in the folder, with the settings that made it."""
    samples = read_samples(folder)
    if not samples:
        return []
    lines = ["", "## Samples", ""]
    for s in samples:
        lines += [
            f"Checkpoint step {s.step}, prompt {json.dumps(s.prompt, ensure_ascii=False)}, {s.tokens} bytes, "
            f"temperature {s.temperature:g}{' (greedy)' if s.temperature == 0 else ''}, seed {s.seed}, "
            f"experts {s.experts}:",
            "",
            *fenced(printable(s.text)),
            "",
        ]
    return lines


def fenced(text: str) -> list[str]:
    """A markdown code block holding `text` verbatim (its fence longer than any backtick run inside)."""
    longest = max((len(run) for run in re.findall("`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence + "text", text, fence]
