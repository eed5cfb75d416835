"""Every ``HYBRIDCN_*`` variable the README documents is read by the code that it names."""

from __future__ import annotations

import re
from pathlib import Path

from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
#: Variables read outside the gateway's settings, with the file that reads each.
ELSEWHERE = {"HYBRIDCN_CACHE": "engine/triton_server.py", "HYBRIDCN_ORT_THREADS": "export/triton_models.py",
             "HYBRIDCN_DEBUG": "hybridcn/cli/__init__.py", "HYBRIDCN_MAX_SLIDE_PIXELS": "batch/inputs.py",
             "HYBRIDCN_REPOSITORY": "hybridcn/config.py", "HYBRIDCN_DECODE_MEMORY_BYTES": "preprocessing/decode.py",
             "HYBRIDCN_LEDGER": "batch/cli.py"}


def test_every_documented_variable_is_read():
    documented = set(re.findall(r"HYBRIDCN_[A-Z_]+[A-Z]", (ROOT / "README.md").read_text()))
    fields = {f"HYBRIDCN_{name.upper()}" for name in GatewaySettings.model_fields}
    unread = [name for name in sorted(documented) if name not in fields and not (
        name in ELSEWHERE and name in (ROOT / ELSEWHERE[name]).read_text())]
    assert unread == []


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("HYBRIDCN_MAX_QUEUE", "7")
    monkeypatch.setenv("HYBRIDCN_ALLOWED_ORIGINS", '["https://lab.example"]')
    monkeypatch.setenv("HYBRIDCN_MAX_PIXELS", "1000000")
    settings = GatewaySettings()
    assert settings.max_queue == 7 and settings.allowed_origins == ["https://lab.example"]
    assert settings.max_pixels == 1_000_000
