"""Student version names: the engine's registry writes them and is the one place that reads them back."""

from __future__ import annotations

import pytest

from ls_integration.versions import is_student_version as ls_is_student_version
from maskclip_engine.students.registry import (
    ModelRegistry,
    is_student_version,
    parse_student_version,
    student_version_name,
)


@pytest.mark.parametrize(("project", "number"), [(12, 3), ("7", 1), (424242, 10)])
def test_a_written_name_parses_back(project, number) -> None:
    name = student_version_name(project, number)
    assert name == f"student-p{project}-v{number}" == ModelRegistry.version_name(project, number)
    assert parse_student_version(name) == (str(project), number)
    assert is_student_version(name) and ls_is_student_version(name)


@pytest.mark.parametrize(
    "name",
    [None, "", "maskclip-ViT-B-16-openai-ks-pd-l3fa9", "student-", "student-p12", "student-p12-v0", "student-p-v1",
     "student-p12-v3-extra", "xstudent-p12-v3"],
)  # fmt: skip
def test_other_names_are_maskclips(name) -> None:
    assert parse_student_version(name) is None
    assert not is_student_version(name) and not ls_is_student_version(name)
