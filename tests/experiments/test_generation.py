"""Text generation from a checkpoint (`eval.py ckpt=<run> generate.*`): seeded, greedy = argmax of a
plain forward, the experts where the run ran them (in-process, or worker processes torn down after),
kept in the run's report, and bad requests named.

Legend: T time (bytes), Y vocabulary.
"""

from __future__ import annotations

import json
from collections import Counter

import psutil
import pytest
import torch

from moe.engine.config import GenerateConfig
from moe.errors import ConfigError
from moe.experiments.generation import (
    SAMPLES_FILE,
    decode,
    generate,
    generate_sample,
    next_token,
    printable,
    prompt_ids,
)
from moe.experiments.trained import load_trained
from tests.helpers import TINY, compose, run_cli

SEQ_LEN = 32
SHORT = [f"data.seq_len={SEQ_LEN}"]
PROCESS = ["transport=process", "trainer.threads=1", "transport.threads=1"]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    """One tiny in-process byte-LM run, shared: the tests write their samples and reports elsewhere."""
    from moe.engine.loop import train

    run_dir = tmp_path_factory.mktemp("lm") / "run"
    train(compose([*TINY, f"run_dir={run_dir}", *SHORT]))
    return run_dir


def request(**overrides) -> GenerateConfig:
    return GenerateConfig(**{"prompt": "def ", "tokens": 24, "temperature": 0.8, "seed": 0, **overrides})


def greedy_reference(model, prompt_T: torch.Tensor, tokens: int, window: int) -> torch.Tensor:
    """A plain loop: the model's forward on the last `window` ids, the argmax of the last position."""
    model.eval()
    ids_T = prompt_T.clone()
    with torch.no_grad():
        for _ in range(tokens):
            logits_1TY, _ = model(ids_T[None, -window:])
            ids_T = torch.cat([ids_T, logits_1TY[0, -1].argmax().view(1)])
    return ids_T


def test_in_process_sample_is_seeded_and_kept_in_the_report(lm_run, tmp_path):
    from moe.experiments.run_report import write_run_report

    first, out = generate_sample(lm_run, request(seed=0), out_dir=tmp_path)
    again, _ = generate_sample(lm_run, request(seed=0), out_dir=tmp_path)
    other, _ = generate_sample(lm_run, request(seed=1), out_dir=tmp_path)
    assert out == tmp_path
    assert first.text == again.text
    assert first.text != other.text
    assert first.text.startswith("def ")
    assert first.experts == "in-process (transport=local)"
    assert first.step == 6
    kept = [json.loads(line) for line in (tmp_path / SAMPLES_FILE).read_text().splitlines()]
    assert [s["seed"] for s in kept] == [0, 1]  # the repeated request replaced its earlier sample
    write_run_report(lm_run, out_dir=tmp_path)
    report = (tmp_path / "report.md").read_text()
    samples = report.split("## Samples", 1)[1]
    assert 'prompt "def ", 24 bytes, temperature 0.8, seed 0' in samples
    assert printable(first.text) in samples
    assert printable(other.text) in samples


def test_greedy_is_the_argmax_of_a_plain_forward_and_the_window_slides(lm_run):
    run, _ = load_trained(lm_run)
    prompt_T = prompt_ids("int main", SEQ_LEN)
    tokens = SEQ_LEN + 8  # past the window: the context slides
    greedy = generate(run.model, prompt_T, tokens=tokens, temperature=0, seed=0, window=SEQ_LEN)
    assert torch.equal(greedy, greedy_reference(run.model, prompt_T, tokens, SEQ_LEN))
    other_seed = generate(run.model, prompt_T, tokens=tokens, temperature=0, seed=7, window=SEQ_LEN)
    assert torch.equal(greedy, other_seed)


def test_sampling_draws_from_the_tempered_softmax():
    logits_Y = torch.tensor([0.0, 1.0, 2.0, 3.0])
    temperature, draws = 0.5, 20_000
    generator = torch.Generator().manual_seed(0)
    counts = Counter(int(next_token(logits_Y, temperature, generator)) for _ in range(draws))
    expected_Y = (logits_Y / temperature).softmax(-1)
    for token, p in enumerate(expected_Y.tolist()):
        assert counts[token] / draws == pytest.approx(p, abs=0.01)
    assert int(next_token(logits_Y, 0.0, generator)) == 3


def test_bytes_decode_safely():
    assert decode(torch.tensor([0x68, 0xFF, 0x69, 0xE2, 0x82])) == "h\ufffdi\ufffd"
    assert decode(torch.tensor(list("é€".encode()))) == "é€"
    assert printable("a\x1b[2Jb\r\n\tc\x7f\x9b") == "a␛[2Jb␍\n\tc␡\ufffd"


def test_bad_requests_are_clear_errors(lm_run, run_tiny, tmp_path):
    cases = {
        "generate.prompt is empty": request(prompt=""),
        "generate.tokens=0 must be at least 1": request(tokens=0),
        "generate.temperature=-1.0 must be ≥ 0": request(temperature=-1.0),
        "generate.prompt is 34 bytes; the model reads at most 32": request(prompt="é" * 17),
    }
    for message, bad in cases.items():
        with pytest.raises(ConfigError, match=message):
            generate_sample(lm_run, bad, out_dir=tmp_path)
    _, clusters_dir = run_tiny("data=clusters", name="clusters")
    with pytest.raises(
        ConfigError, match=r"holds a 'regression' model \(data=clusters\); generation needs a byte LM"
    ):
        generate_sample(clusters_dir, request(), out_dir=tmp_path)
    assert not (tmp_path / SAMPLES_FILE).exists()


def test_cli_prints_the_sample_and_adds_it_to_the_report(lm_run, tmp_path):
    args = [
        f"ckpt={lm_run}",
        f"out={tmp_path}",
        f"hydra.run.dir={tmp_path / 'h'}",
        "generate.tokens=8",
        "generate.temperature=0",
    ]
    result = run_cli("eval.py", *args, 'generate.prompt="def "')
    assert result.returncode == 0, result.stderr
    sample = result.stdout.split("sample:\n", 1)[1]
    assert sample.startswith("def ")
    assert sample.rstrip("\n") in (tmp_path / "report.md").read_text()
    empty = run_cli("eval.py", *args, 'generate.prompt=""')
    assert empty.returncode != 0
    assert "error: generate.prompt is empty" in empty.stderr
    assert "Traceback" not in empty.stderr


@pytest.mark.timeout(240)
def test_process_run_generates_on_restarted_workers_as_in_process(run_tiny, monkeypatch):
    import experts.remote.spawn as spawn

    _, run_dir = run_tiny(*PROCESS, *SHORT)
    started = []

    def spawn_and_keep(*args, **kwargs):
        started.append(spawn_worker(*args, **kwargs))
        return started[-1]

    spawn_worker = spawn.spawn_worker
    monkeypatch.setattr(spawn, "spawn_worker", spawn_and_keep)
    sample, _ = generate_sample(run_dir, request(tokens=16))
    assert sample.experts == "in 2 worker processes (transport=process)"
    assert len(started) == 2  # the run's workers were started again for this generation
    assert all(worker.poll() is not None for worker in started)  # and are gone again
    assert psutil.Process().children(recursive=True) == []
    run, state = load_trained(run_dir)  # the same checkpoint with every expert in this process
    in_process = generate(
        run.model,
        prompt_ids("def ", SEQ_LEN),
        tokens=16,
        temperature=0.8,
        seed=0,
        window=SEQ_LEN,
        step=state["step"],
    )
    assert sample.text == decode(in_process)
