from __future__ import annotations

import os

# No test may reach a model hub: huggingface_hub reads this when first imported.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.pop("MASKCLIP_CACHE_DIR", None)

import socket  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from maskclip_engine import Segmenter  # noqa: E402
from tests.tiny_models import TinyModel, make_tiny_model  # noqa: E402

_real_connect = socket.socket.connect


def _local_only_connect(sock: socket.socket, address):  # type: ignore[no-untyped-def]
    if sock.family == socket.AF_UNIX:
        return _real_connect(sock, address)
    host = address[0]
    if host in ("127.0.0.1", "localhost", "::1") or str(host).startswith("127."):
        return _real_connect(sock, address)
    raise ConnectionRefusedError(f"tests may not connect to {address}: no network beyond this machine")


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _local_only_connect)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_vit(models_dir: Path) -> TinyModel:
    return make_tiny_model("tiny-vit", models_dir)


@pytest.fixture(scope="session")
def tiny_vit12(models_dir: Path) -> TinyModel:
    return make_tiny_model("tiny-vit-12", models_dir)


def _fp32_segmenter(model: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    # float32: these tests compare paths exactly; tests/test_precision.py covers bf16 and "auto"
    cache = tmp_path_factory.mktemp("cache")
    return Segmenter.from_pretrained(str(model.config), str(model.state_dict), precision="fp32", cache_dir=cache)


@pytest.fixture(scope="session")
def vit12_segmenter(tiny_vit12: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    """A tiny ViT with ViT-B/16's 12 blocks: the dense modes that read middle blocks run on it."""
    return _fp32_segmenter(tiny_vit12, tmp_path_factory)


@pytest.fixture(scope="session")
def tiny_rn(models_dir: Path) -> TinyModel:
    return make_tiny_model("tiny-rn", models_dir)


@pytest.fixture(scope="session")
def vit_segmenter(tiny_vit: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return _fp32_segmenter(tiny_vit, tmp_path_factory)


@pytest.fixture(scope="session")
def rn_segmenter(tiny_rn: TinyModel, tmp_path_factory: pytest.TempPathFactory) -> Segmenter:
    return _fp32_segmenter(tiny_rn, tmp_path_factory)


def scene(height: int = 96, width: int = 160, seed: int = 0) -> np.ndarray:
    """A synthetic photo-like image: two coloured regions with texture."""
    rng = np.random.default_rng(seed)
    image = np.zeros((height, width, 3), dtype=np.float64)
    image[:, : width // 2] = (200, 60, 40)
    image[:, width // 2 :] = (40, 160, 70)
    image[height // 3 : 2 * height // 3, width // 4 : 3 * width // 4] = (60, 80, 220)
    image += rng.normal(0, 20, image.shape)
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="session")
def documents(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The local-files document root shared by Label Studio and the backend in end-to-end tests."""
    return tmp_path_factory.mktemp("documents")


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory, documents: Path):
    """The real Label Studio server, started once for the whole run."""
    from tests.label_studio_server import LabelStudio

    server = LabelStudio(tmp_path_factory.mktemp("label-studio"), documents)
    yield server
    server.stop()
