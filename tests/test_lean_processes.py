"""Idle processes stay lean: the gunicorn master never imports torch, the embedded worker loads it on its first job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from rq import Worker

HEAVY = ("torch", "open_clip", "torchvision")

MASTER_IMPORTS = """
import json, sys
import gunicorn.app.base
import backend.cli
import maskclip_service.embedded_queue
from maskclip_service.settings import Settings
Settings.from_env()
import maskclip_engine
maskclip_engine.SegmentOptions(), maskclip_engine.MaskClipError
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))
"""

WORKER_IMPORTS = """
import json, sys
import workers.cli
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in %r)))
"""


def _loaded_after(script: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run([sys.executable, "-c", script % (HEAVY,)], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_gunicorn_master_imports_no_torch() -> None:
    # Everything `maskclip-backend serve` imports before gunicorn forks the serving process.
    assert _loaded_after(MASTER_IMPORTS) == []


def test_worker_command_imports_no_torch_until_a_job_needs_it() -> None:
    assert _loaded_after(WORKER_IMPORTS) == []


def test_engine_names_still_import_on_first_use() -> None:
    import maskclip_engine

    assert maskclip_engine.Segmenter.__name__ == "Segmenter"
    assert "Segmenter" in maskclip_engine.__all__


def test_embedded_worker_waits_idle_without_torch(tmp_path: Path) -> None:
    from backend.cli import embedded_worker_command
    from maskclip_service.embedded_queue import EmbeddedQueue

    queue = EmbeddedQueue(tmp_path / "queue", embedded_worker_command())
    try:
        deadline = time.monotonic() + 60
        while not Worker.all(connection=queue.redis):  # registered: past start-up, waiting for jobs
            assert queue.worker.poll() is None, "the embedded worker exited"
            assert time.monotonic() < deadline, "the embedded worker did not start within 60 s"
            time.sleep(0.2)
        maps = Path(f"/proc/{queue.worker.pid}/maps").read_text()
        assert "libtorch" not in maps
    finally:
        queue.stop()
