"""The README's quickstart is what CI runs, and its example commands compose."""

from __future__ import annotations

import re
import shlex

import pytest

from tests.helpers import REPO, compose

README = (REPO / "README.md").read_text()


def quickstart_commands() -> list[str]:
    block = README.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_quickstart_is_install_and_train_then_install_and_pytest():
    assert quickstart_commands() == [
        "pip install -e . && python train.py",
        'pip install -e ".[dev]" && pytest',
    ]


EXAMPLES = [
    line.split("#", 1)[0].strip()
    for line in re.findall(r"^python train\.py [^\n]*", README, flags=re.MULTILINE)
]


@pytest.mark.parametrize(
    "command",
    [
        c
        for c in EXAMPLES
        if " -m " not in c and "--cfg" not in c and "resume=" not in c and "<name>" not in c
    ],
)
def test_readme_train_examples_compose(command):
    compose(shlex.split(command)[2:])


def test_readme_generate_example_composes_and_keeps_the_prompt_space():
    line = next(
        line
        for line in README.splitlines()
        if line.startswith("python eval.py ckpt=") and "generate." in line
    )
    cfg = compose(shlex.split(line)[2:], config_name="eval")
    assert cfg.generate.prompt == "def "
    assert (cfg.generate.tokens, cfg.generate.temperature, cfg.generate.seed) == (200, 0.8, 0)
