"""The real Label Studio server, started for end-to-end tests on 127.0.0.1.

It runs from its own virtualenv (``make label-studio`` installs it; its pins
clash with ours) with a preset user and legacy token.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "e2e0123456789abcdef0123456789abcdef01234"
USER = "e2e@example.com"
PASSWORD = "e2e-password-123"


def label_studio_binary() -> Path:
    return Path(os.environ.get("LABEL_STUDIO_BIN", ROOT / ".venv-label-studio" / "bin" / "label-studio"))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a server started in its own session, with everything it started."""
    if process.poll() is None:
        os.killpg(process.pid, 15)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
            process.wait()


def wait_until_up(url: str, process: subprocess.Popen, timeout: float, log: Path) -> None:
    """Poll ``url`` until it answers 200; fail early if the process dies."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url} exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s:\n{log.read_text()[-4000:]}")


class LabelStudio:
    """A running server and a small API client for it."""

    def __init__(self, data_dir: Path, document_root: Path) -> None:
        binary = label_studio_binary()
        if not binary.exists():
            raise RuntimeError(f"{binary} is missing: run `make label-studio` (the README's test command does).")
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        data_dir.mkdir(parents=True, exist_ok=True)
        self.log = data_dir / "label-studio.log"
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("LABEL_STUDIO_", "DJANGO_"))},
            "LABEL_STUDIO_BASE_DATA_DIR": str(data_dir),
            "LABEL_STUDIO_USERNAME": USER,
            "LABEL_STUDIO_PASSWORD": PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
            "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(document_root),
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "ML_TIMEOUT_PREDICT": "300",
            "ML_TIMEOUT_SETUP": "30",
            "ML_TIMEOUT_HEALTH": "10",
        }
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen(
                [str(binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(self.port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_until_up(f"{self.url}/health", self.process, timeout=300, log=self.log)
        except Exception:
            self.stop()
            raise
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Token {TOKEN}"

    def api(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.session.request(method, f"{self.url}{path}", timeout=300, **kwargs)
        if response.status_code >= 400:
            raise AssertionError(f"{method} {path} -> {response.status_code}: {response.text[:2000]}")
        return response

    def stop(self) -> None:
        stop_process_group(self.process)


class Backend:
    """``maskclip-backend serve`` as a user starts it, in a subprocess."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = shutil.which("maskclip-backend", path=str(Path(os.sys.executable).parent))
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [command, "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env={**os.environ, **env},
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        try:
            wait_until_up(f"{self.url}/health", self.process, timeout=120, log=log)
        except Exception:
            self.stop()
            raise

    def stop(self) -> None:
        stop_process_group(self.process)


def project_version(backend_url: str, project: int) -> str:
    """MaskCLIP's model version for a connected project (it names the project's label set)."""
    return requests.post(f"{backend_url}/versions", json={"project": str(project)}, timeout=10).json()["versions"][0]


def brush_results(labels: np.ndarray, names: list[str], from_name: str = "tag", to_name: str = "image") -> list[dict]:
    """A label map as Label Studio brush results, one per label present (as an annotator would submit)."""
    height, width = labels.shape
    results = []
    for index, name in enumerate(names):
        mask = labels == index
        if mask.any():
            results.append(
                {
                    "from_name": from_name,
                    "to_name": to_name,
                    "type": "brushlabels",
                    "original_width": width,
                    "original_height": height,
                    "image_rotation": 0,
                    "value": {"format": "rle", "rle": mask2rle(mask.astype(np.uint8) * 255), "brushlabels": [name]},
                }
            )
    return results


def brush_config(names: list[str]) -> str:
    labels = "".join(f'<Label value="{name}"/>' for name in names)
    control = f'<BrushLabels name="tag" toName="image">{labels}</BrushLabels>'
    return f'<View><Image name="image" value="$image"/>{control}</View>'


def scene_project(
    server: LabelStudio, documents: Path, title: str, annotated: int, plain: int
) -> tuple[int, list[dict]]:
    """A project of synthetic scenes under the local-files root; the first ``annotated`` get annotations."""
    from tests.scenes import CLASSES, make_scene

    folder = documents / title.replace(" ", "-")
    folder.mkdir(parents=True, exist_ok=True)
    project = server.api("POST", "/api/projects", json={"title": title, "label_config": brush_config(CLASSES)}).json()
    scenes = {}
    for i in range(annotated + plain):
        image, labels = make_scene(3000 + i)
        Image.fromarray(image).save(folder / f"scene{i}.png")
        scenes[f"{folder.name}/scene{i}.png"] = labels
    server.api(
        "POST",
        f"/api/projects/{project['id']}/import",
        json=[{"image": f"/data/local-files/?d={name}"} for name in scenes],
    )
    tasks = server.api("GET", "/api/tasks", params={"project": project["id"], "page_size": 1000}).json()["tasks"]
    tasks.sort(key=lambda t: t["id"])
    for task in tasks[:annotated]:
        labels = scenes[task["data"]["image"].split("?d=", 1)[1]]
        server.api("POST", f"/api/tasks/{task['id']}/annotations", json={"result": brush_results(labels, CLASSES)})
    return project["id"], tasks
