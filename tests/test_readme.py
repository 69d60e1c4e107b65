"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def test_readme_python_example_runs(capsys) -> None:  # noqa: ANN001
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
    r1 = namespace["matrices"]["recall@1"]
    assert r1.shape == (3, 2)
    assert (r1[1:].diagonal() > 0.5).all()  # each task learned far above 1/128 chance
    assert isinstance(r1, torch.Tensor)


def test_same_config_and_seed_give_the_same_model_through_the_python_api() -> None:
    text = (ROOT / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    results = []
    for _ in range(2):
        namespace: dict = {}
        exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102
        results.append(namespace["matrices"]["recall@1"])
    assert torch.equal(results[0], results[1])
