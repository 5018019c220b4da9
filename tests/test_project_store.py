"""Project links live in the shared model folder: another process sees what /setup stored."""

from __future__ import annotations

import stat
import subprocess
import sys
from pathlib import Path

import pytest

from ls_integration.project_links import ProjectLink, ProjectLinks


def test_a_link_saved_by_one_store_is_read_by_another_process(tmp_path: Path) -> None:
    link = ProjectLink(hostname="http://ls.example:8080", access_token="tok", label_config="<View/>")
    ProjectLinks(tmp_path).save("12", link)
    path = ProjectLinks(tmp_path).path(12)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # it holds an API token
    code = (
        "import sys; from ls_integration.project_links import ProjectLinks; "
        "link = ProjectLinks(sys.argv[1]).load('12'); print(link.hostname, link.access_token, link.label_config)"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["http://ls.example:8080", "tok", "<View/>"]


def test_a_changed_link_replaces_the_cached_one(tmp_path: Path) -> None:
    reader, writer = ProjectLinks(tmp_path), ProjectLinks(tmp_path)
    assert reader.load(3) is None
    writer.save(3, ProjectLink(hostname="http://a"))
    assert reader.load(3).hostname == "http://a"
    writer.save(3, ProjectLink(hostname="http://b", label_config="<View></View>"))
    assert reader.load(3) == ProjectLink(hostname="http://b", label_config="<View></View>")
    assert "tok" not in repr(ProjectLink(access_token="tok"))


def test_unreadable_links_and_bad_ids(tmp_path: Path) -> None:
    store = ProjectLinks(tmp_path)
    store.path(5).parent.mkdir(parents=True)
    store.path(5).write_text("{half")
    assert store.load(5) is None
    with pytest.raises(ValueError, match="project id"):
        store.load("../etc")
