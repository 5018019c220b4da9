"""Smart tools in a real browser, on tasks the workers pre-annotated, in Label Studio 1.23.2's labeling page.

A pre-annotated task opens with the backend's proposals copied into the
annotator's draft as ordinary regions, and in 1.23.2 those regions take plain
clicks for themselves: a click of the smart keypoint over a brush or polygon
proposal selects the proposal and never reaches the tool (``BrushRegion``'s
click handler selects and stops the event; the tool-aware guard that used to
let it through is behind a feature flag that 1.23.2 forces on). What does
reach the backend, and what these tests hold the product to:

* a Ctrl/Cmd-click (with no region selected) passes through to the smart
  keypoint: Label Studio asks the backend and the mask becomes a region of
  the clicked label;
* a smart box dragged over a brush proposal draws and asks; over a polygon
  proposal the press is not forwarded, so there the box too needs Ctrl/Cmd;
* the text area's phrase and negative (Alt) clicks reach the backend as well.

Each test works on its own task, opened fresh. Evidence comes from three
places: the interactive requests the page sent (and their replies), the
backend's own request counter (``GET /metrics``), and the editor's store.

``SMART_TOOLS_DOCS_IMAGES=docs/images`` also writes the annotators' how-to
pictures (``docs/smart-tools.md``) while the tests run.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image, ImageDraw

from tests.browser import SMART_KEYPOINT, SMART_RECTANGLE, Browser, find_chromium
from tests.label_studio_server import PASSWORD, USER, Backend, LabelStudio
from tests.scenes import make_scene
from tests.test_label_studio_e2e import backend_env


def _missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (it is in the dev extra)"
    if find_chromium() is None:
        return "chromium and chromedriver are missing (`make test` installs them)"
    return None


# Skipped on a developer's machine without a browser; under CI the fixtures fail loudly instead.
pytestmark = pytest.mark.skipif(_missing() is not None and not os.environ.get("CI"), reason=_missing() or "")

LABELS = ("ground", "red disc", "blue box")
WIDTH, HEIGHT = 320, 240
DOCS = os.environ.get("SMART_TOOLS_DOCS_IMAGES")
PREANNOTATE_TIMEOUT_S = 180  # the first task waits for the worker to load the model


def label_config(output: str) -> str:
    """The README's smart-tools config: proposals in ``output`` (BrushLabels/PolygonLabels), smart click and box."""
    plain = "".join(f'<Label value="{label}"/>' for label in LABELS)
    smart = "".join(f'<Label value="{label}" smart="true"/>' for label in LABELS)
    return f"""<View>
  <Image name="image" value="$image"/>
  <{output} name="tag" toName="image">{plain}</{output}>
  <KeyPointLabels name="click" toName="image" smart="true">{smart}</KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">{plain}</RectangleLabels>
  <TextArea name="prompt" toName="image" editable="true" rows="1" maxSubmissions="1" showSubmitButton="true"
            placeholder="describe what to select"/>
</View>"""


@pytest.fixture(scope="module")
def backend(label_studio: LabelStudio, documents: Path, tiny_vit, tmp_path_factory: pytest.TempPathFactory):
    """``maskclip-backend serve`` with no REDIS_URL: its embedded queue and worker pre-annotate imports."""
    env = backend_env(
        tiny_vit,
        label_studio,
        documents,
        tmp_path_factory.mktemp("browser-cache"),
        MASKCLIP_SHORT_SIDE="64",
        MODEL_DIR=str(tmp_path_factory.mktemp("browser-models")),
        MASKCLIP_TORCH_THREADS="1",
        REDIS_URL="",
    )
    server = Backend(env, tmp_path_factory.mktemp("browser-backend") / "backend.log")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser(label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory):
    shots = tmp_path_factory.mktemp("browser-screenshots")
    with Browser(label_studio.url, shots) as page:
        page.login(USER, PASSWORD)
        yield page


def preannotated_project(
    label_studio: LabelStudio, backend: Backend, documents: Path, output: str, tasks: int
) -> tuple[int, list[dict]]:
    """A project whose imported tasks the backend's workers pre-annotated (waits until each has its prediction)."""
    title = f"smart tools {output}"
    folder = documents / f"browser-{output.lower()}"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(tasks):
        image, _ = make_scene(8100 + i, HEIGHT, WIDTH)
        Image.fromarray(image).save(folder / f"{i}.png")
    pid = label_studio.api("POST", "/api/projects", json={"title": title, "label_config": label_config(output)}).json()[
        "id"
    ]
    # The browser reads /data/local-files/ only under a local storage of the project (the backend reads the disk).
    label_studio.api(
        "POST",
        "/api/storages/localfiles",
        json={"project": pid, "path": str(folder), "use_blob_urls": True, "title": "images"},
    )
    ml = label_studio.api(
        "POST", "/api/ml", json={"url": backend.url, "project": pid, "title": "MaskCLIP", "is_interactive": True}
    ).json()
    connection = label_studio.api("GET", f"/api/ml/{ml['id']}").json()
    assert connection["state"] == "CO" and connection["is_interactive"], connection
    version = connection["model_version"]
    asked = predict_requests(backend)
    label_studio.api(
        "POST",
        f"/api/projects/{pid}/import",
        json=[{"image": f"/data/local-files/?d={folder.name}/{i}.png"} for i in range(tasks)],
    )  # TASKS_CREATED reaches the backend's /webhook; its worker writes the predictions
    deadline = time.monotonic() + PREANNOTATE_TIMEOUT_S
    while True:
        found = label_studio.api(
            "GET", "/api/tasks", params={"project": pid, "page_size": 100, "fields": "all"}
        ).json()["tasks"]
        if len(found) == tasks and all(
            [p["model_version"] for p in t["predictions"]] == [version] and t["predictions"][0]["result"] for t in found
        ):
            break
        assert time.monotonic() < deadline, f"the workers did not pre-annotate {title!r} in time: {found}"
        time.sleep(0.5)
    assert predict_requests(backend) == asked, "pre-annotation on import does not go through /predict"
    return pid, sorted(found, key=lambda t: t["id"])


@pytest.fixture(scope="module")
def brush_project(label_studio, backend, documents):
    return preannotated_project(label_studio, backend, documents, "BrushLabels", tasks=6)


@pytest.fixture(scope="module")
def polygon_project(label_studio, backend, documents):
    return preannotated_project(label_studio, backend, documents, "PolygonLabels", tasks=2)


def predict_requests(backend: Backend, status: str | None = None) -> int:
    """How many /predict requests the backend answered (with ``status``, or any)."""
    text = requests.get(f"{backend.url}/metrics", timeout=10).text
    total = 0.0
    for found, count in re.findall(
        r'maskclip_http_requests_total\{route="/predict",status="(\d+)"\} ([0-9.e+]+)', text
    ):
        if status is None or found == status:
            total += float(count)
    return int(total)


def proposal_masks(task: dict) -> list[tuple[str, np.ndarray]]:
    """The task's prediction as (label, mask) pairs, brush RLE or polygons alike."""
    masks = []
    for region in task["predictions"][0]["result"]:
        value = region["value"]
        if region["type"] == "brushlabels":
            flat = np.asarray(decode_rle(value["rle"]))
            mask = flat.reshape(HEIGHT, WIDTH, 4)[:, :, 3] > 0
            masks.append((value["brushlabels"][0], mask))
        else:
            canvas = Image.new("L", (WIDTH, HEIGHT))
            ImageDraw.Draw(canvas).polygon([(x * WIDTH / 100, y * HEIGHT / 100) for x, y in value["points"]], fill=1)
            masks.append((value["polygonlabels"][0], np.asarray(canvas) > 0))
    return masks


def deepest_point(mask: np.ndarray) -> tuple[int, tuple[int, int]]:
    """``(depth, (row, col))``: a pixel of ``mask`` as far from its edge as any (erosions it survives)."""
    depth, current, last = 0, mask.copy(), mask
    while current.any():
        last = current
        inner = current.copy()
        inner[1:] &= current[:-1]
        inner[:-1] &= current[1:]
        inner[:, 1:] &= current[:, :-1]
        inner[:, :-1] &= current[:, 1:]
        inner[0, :] = inner[-1, :] = inner[:, 0] = inner[:, -1] = False
        current, depth = inner, depth + 1
    rows, cols = np.nonzero(last)
    middle = len(rows) // 2
    return depth, (int(rows[middle]), int(cols[middle]))


def inside_a_proposal(task: dict, min_depth: int = 12) -> tuple[str, float, float, str, int]:
    """A point well inside the task's deepest proposal: ``(its label, x %, y %, another label, depth in px)``.

    Every pixel within ``depth - 1`` steps (city-block) of the point lies in that proposal.
    """
    best = max(((deepest_point(m), name) for name, m in proposal_masks(task)), key=lambda t: t[0][0])
    (depth, (row, col)), label = best
    assert depth >= min_depth, f"no proposal is wide enough to click inside (deepest {depth} px)"
    other = next(name for name in LABELS if name != label)
    return label, (col + 0.5) * 100 / WIDTH, (row + 0.5) * 100 / HEIGHT, other, depth


def box_inside(x: float, y: float, depth: int) -> tuple[tuple[float, float], tuple[float, float]]:
    """The corners of a square around ``(x, y)`` whose corners are still inside the proposal there."""
    half = (depth - 1) // 2
    dx, dy = half * 100 / WIDTH, half * 100 / HEIGHT
    return (x - dx, y - dy), (x + dx, y + dy)


def region_mask(result: dict) -> np.ndarray:
    flat = np.asarray(decode_rle(result["value"]["rle"]))
    assert flat.size == WIDTH * HEIGHT * 4, "the RLE does not decode to the image size"
    return flat.reshape(HEIGHT, WIDTH, 4)[:, :, 3] > 0


def answered(page: Browser, count: int) -> list[dict]:
    """The page's interactive requests once ``count`` of them have their reply."""
    return page.wait_for(
        lambda: (lambda sent: sent if len(sent) >= count and all(r["reply"] for r in sent[:count]) else None)(
            page.interactive_requests()
        ),
        f"{count} interactive replies",
    )


def backend_result(request: dict) -> list[dict]:
    """The backend's /predict result inside Label Studio's interactive reply."""
    assert request["status"] == 200, request
    reply = request["reply"]
    assert isinstance(reply, dict) and "errors" not in reply, reply
    return reply["data"]["result"]


def doc_picture(page: Browser, name: str, **kwargs) -> None:
    """A picture for docs/smart-tools.md, when SMART_TOOLS_DOCS_IMAGES asks for them."""
    if DOCS:
        page.picture(Path(DOCS) / f"{name}.png", **kwargs)


def work_area(page: Browser) -> tuple[int, int, int, int]:
    """The canvas, its toolbar, the label rows and the region panels: what a result picture shows."""
    canvas = page.screen_point(0, 0)
    bottom = page.js(
        "return Math.max(...[...document.querySelectorAll('.lsf-labels')].map((e) => e.getBoundingClientRect().bottom))"
    )
    return round(canvas["left"]) - 4, round(canvas["top"]) - 4, 1280, round(bottom) + 4


def on_screen(page: Browser, *points: tuple[float, float]) -> list[tuple[float, float]]:
    """Image points (percent) as screen points, for marks in a picture."""
    return [(p["x"], p["y"]) for p in (page.screen_point(x, y) for x, y in points)]


def open_fresh(page: Browser, project: int, task: int) -> None:
    page.open_task(project, task)
    page.set_auto_annotation(True)
    page.set_auto_accept(True)
    # The proposals are copied into the draft a moment after the task's image is on the canvas.
    state = page.wait_for(
        lambda: (lambda st: st if st["regions"] else None)(page.state()), "the proposals in the draft"
    )
    assert all(r["origin"] == "prediction" for r in state["regions"]), state


def test_a_plain_click_selects_the_proposal_and_asks_nothing(browser: Browser, backend: Backend, brush_project):
    """How Label Studio 1.23.2 routes a plain click of the smart keypoint over a brush proposal (recorded)."""
    pid, tasks = brush_project
    task = tasks[0]
    label, x, y, other, _ = inside_a_proposal(task)
    with browser.step("open the pre-annotated task"):
        open_fresh(browser, pid, task["id"])
        doc_picture(browser, "pre-annotated-task", max_width=1024)
        doc_picture(browser, "auto-annotation-toggles", box=browser.element_box(css=".lsf-model-actions"), pad=10)
    with browser.step("choose the smart keypoint"):
        browser.choose_smart_tool(SMART_KEYPOINT)
        if DOCS:
            browser.open_auto_detect_flyout()
            boxes = [browser.element_box(css=".lsf-toolbar"), browser.element_box(css=".lsf-tool__extra")]
            boxes.append(
                browser.element_box(
                    xpath="//*[contains(@class,'lsf-tool__tooltip-body')][.//*[contains(@class,'lsf-tool__extra')]]"
                )
            )
            box = (
                min(b[0] for b in boxes) - 120,
                min(b[1] for b in boxes),
                max(b[2] for b in boxes),
                max(b[3] for b in boxes),
            )
            doc_picture(browser, "auto-detect-flyout", box=box, pad=12)
        browser.pick_label("click", other)
    before = predict_requests(backend)
    with browser.step("plain click over the proposal"):
        browser.click(x, y)
        selected = browser.wait_for(lambda: browser.state()["selected"], "the click to select a region", timeout=10)
        time.sleep(2)  # a keypoint notifies at once: a request would have been sent by now
        state = browser.state()
        [region] = [r for r in state["regions"] if r["id"] in selected]
        assert region["type"] == "brushregion" and region["origin"] == "prediction" and region["label"] == label, region
        assert not [r for r in state["regions"] if r["type"] == "keypointregion"], "the tool made no keypoint"
        assert browser.interactive_requests() == [], "the page asked for nothing"
        assert predict_requests(backend) == before, "the backend got no /predict"
        if DOCS:
            marks = on_screen(browser, (x, y))
            doc_picture(browser, "plain-click-selects-proposal", box=work_area(browser), max_width=900, marks=marks)


def test_a2_a_selected_proposal_takes_a_label_from_row_one_and_goes_with_backspace(
    browser: Browser, backend: Backend, brush_project
):
    """What a plain click is good for: fixing a proposal by hand (the how-to tells annotators so)."""
    from selenium.webdriver.common.keys import Keys

    pid, tasks = brush_project
    task = tasks[5]
    label, x, y, other, _ = inside_a_proposal(task)
    with browser.step("open and select a proposal"):
        open_fresh(browser, pid, task["id"])
        browser.choose_smart_tool(SMART_KEYPOINT)
        browser.unselect()
        browser.click(x, y)
        [selected] = browser.wait_for(lambda: browser.state()["selected"], "the click to select a proposal")
    before = predict_requests(backend)
    with browser.step("relabel it from row 1"):
        browser.click_label("tag", other)
        browser.wait_for(
            lambda: [r["label"] for r in browser.regions() if r["id"] == selected] == [other], "the new label"
        )
    with browser.step("delete it with Backspace"):
        browser.press(Keys.BACKSPACE)
        browser.wait_for(lambda: selected not in {r["id"] for r in browser.regions()}, "the proposal to go")
    assert predict_requests(backend) == before and browser.interactive_requests() == []


def test_b_ctrl_click_with_the_smart_keypoint_reaches_the_backend(browser: Browser, backend: Backend, brush_project):
    pid, tasks = brush_project
    task = tasks[1]
    _, x, y, other, _ = inside_a_proposal(task)
    with browser.step("open and choose"):
        open_fresh(browser, pid, task["id"])
        browser.choose_smart_tool(SMART_KEYPOINT)
        browser.pick_label("click", other)
        if DOCS:
            label_rows_picture(browser, Path(DOCS) / "label-rows.png")
    before_regions = {r["id"] for r in browser.regions()}
    before = predict_requests(backend, "200")
    with browser.step("ctrl-click over the proposal"):
        browser.unselect()
        browser.click(x, y, ctrl=True)
        region = browser.wait_for_region("brushregion", other, exclude=before_regions)
        [request] = answered(browser, 1)
    [prompt] = request["context"]["result"]
    assert prompt["type"] == "keypointlabels" and prompt["from_name"] == "click" and prompt["is_positive"] is True
    assert prompt["value"]["keypointlabels"] == [other]
    assert abs(prompt["value"]["x"] - x) < 1 and abs(prompt["value"]["y"] - y) < 1, (prompt["value"], x, y)
    assert predict_requests(backend, "200") == before + 1, "one interactive /predict, answered"
    [result] = backend_result(request)
    assert result["type"] == "brushlabels" and result["value"]["brushlabels"] == [other]
    row, col = int(prompt["value"]["y"] * HEIGHT / 100), int(prompt["value"]["x"] * WIDTH / 100)
    assert region_mask(result)[row, col], "the mask holds the clicked pixel"
    assert region["origin"] == "manual" and not region["dynamic"], region  # accepted: a region like any other
    assert not [r for r in browser.regions() if r["type"] == "keypointregion"], "the prompt keypoint is gone"
    assert len([r for r in browser.regions() if r["origin"] == "prediction"]) == len(before_regions), "proposals stay"
    if DOCS:
        marks = on_screen(browser, (prompt["value"]["x"], prompt["value"]["y"]))
        doc_picture(browser, "ctrl-click-result", box=work_area(browser), max_width=900, marks=marks)


def test_c_a_smart_box_dragged_over_a_brush_proposal_reaches_the_backend(
    browser: Browser, backend: Backend, brush_project
):
    """A plain drag over a brush proposal asks the backend, but the proposal is selected on release and its label
    overrides the box's; a Ctrl/Cmd-drag asks and keeps the box's label."""
    pid, tasks = brush_project
    task = tasks[2]
    label, x, y, other, depth = inside_a_proposal(task)
    start, end = box_inside(x, y, depth)  # press and release on the same proposal
    with browser.step("open and choose"):
        open_fresh(browser, pid, task["id"])
        browser.choose_smart_tool(SMART_RECTANGLE)
        browser.pick_label("box", other)
    proposals = {r["id"] for r in browser.regions()}
    before = predict_requests(backend, "200")
    with browser.step("plain drag over the proposal"):
        browser.drag(start, end)
        plain = browser.wait_for_region("brushregion", exclude=proposals)
        [request] = answered(browser, 1)
    [prompt] = request["context"]["result"]
    assert prompt["type"] == "rectanglelabels" and prompt["value"]["rectanglelabels"] == [other]
    assert predict_requests(backend, "200") == before + 1
    [result] = backend_result(request)
    assert result["type"] == "brushlabels" and result["value"]["brushlabels"] == [other]  # the backend kept it
    # Recorded Label Studio 1.23.2 behaviour: press and release on one proposal make Konva fire a click on it, which
    # selects it (its label lights up in the brush row) before the reply comes; Auto-Accept then gives the accepted
    # region the labels active at that moment, the proposal's.
    state = browser.state()
    assert [r["label"] for r in state["regions"] if r["id"] in state["selected"]] == [label], state
    assert browser.wait_for_region("brushregion", exclude=proposals)["label"] == label, plain

    with browser.step("ctrl-drag over the proposal"):
        browser.pick_label("box", other)  # Esc first: the proposal is selected
        done = {r["id"] for r in browser.regions()}
        browser.drag(start, end, ctrl=True)
        region = browser.wait_for_region("brushregion", other, exclude=done)
        second = answered(browser, 2)[1]
    assert second["context"]["result"][0]["type"] == "rectanglelabels"
    assert predict_requests(backend, "200") == before + 2
    [result] = backend_result(second)
    assert result["value"]["brushlabels"] == [other] and region["origin"] == "manual"
    assert not browser.state()["selected"], "with Ctrl/Cmd held the proposal is not selected"
    mask, value = region_mask(result), second["context"]["result"][0]["value"]
    rows, cols = np.nonzero(mask)
    assert rows.size, "the box got a mask"
    x0, x1 = value["x"] * WIDTH / 100, (value["x"] + value["width"]) * WIDTH / 100
    y0, y1 = value["y"] * HEIGHT / 100, (value["y"] + value["height"]) * HEIGHT / 100
    assert x0 - 1 <= cols.min() and cols.max() <= x1 + 1 and y0 - 1 <= rows.min() and rows.max() <= y1 + 1
    if DOCS:
        (left, top), (right, bottom) = on_screen(
            browser, (value["x"], value["y"]), (value["x"] + value["width"], value["y"] + value["height"])
        )
        doc_picture(browser, "box-result", box=work_area(browser), max_width=900, frames=[(left, top, right, bottom)])


def test_d_the_phrase_reaches_the_backend(browser: Browser, backend: Backend, brush_project):
    pid, tasks = brush_project
    task = tasks[3]
    with browser.step("open"):
        open_fresh(browser, pid, task["id"])
    before_regions = {r["id"] for r in browser.regions()}
    before = predict_requests(backend, "200")
    with browser.step("type a phrase"):
        browser.type_phrase("the blue box")
        region = browser.wait_for_region("brushregion", "blue box", exclude=before_regions)
        [request] = answered(browser, 1)
    [prompt] = request["context"]["result"]
    assert prompt["type"] == "textarea" and prompt["value"]["text"] == ["the blue box"]
    assert predict_requests(backend, "200") == before + 1
    [result] = backend_result(request)
    assert result["value"]["brushlabels"] == ["blue box"]  # the label the phrase names
    assert region["origin"] == "manual"
    # The documented config takes one phrase per annotation (maxSubmissions="1"): the input gives way to the phrase.
    assert not browser.driver.find_elements("css selector", "[data-testid=textarea-input]")
    if DOCS:
        canvas = browser.screen_point(0, 0)
        text = browser.element_box(css="[data-testid=textarea-control]")
        box = (round(canvas["left"]) - 4, max(round(canvas["top"]), 96), 1280, text[3] + 4)
        doc_picture(browser, "phrase-result", box=box, pad=0, max_width=900)


def test_e_alt_clicks_are_negative_and_add_up_while_auto_accept_is_off(
    browser: Browser, backend: Backend, brush_project
):
    """With Auto-Accept off the prompt keypoints stay and every click sends them all; Alt marks one negative."""
    pid, tasks = brush_project
    task = tasks[4]
    _, x, y, other, _ = inside_a_proposal(task)
    far = (min(x + 25, 95) if x < 50 else max(x - 25, 5), y)
    with browser.step("open with Auto-Accept off"):
        open_fresh(browser, pid, task["id"])
        browser.set_auto_accept(False)  # the next test's page turns it on again
        browser.choose_smart_tool(SMART_KEYPOINT)
    with browser.step("positive ctrl-click"):
        browser.pick_label("click", other)
        browser.click(x, y, ctrl=True)
        answered(browser, 1)
        browser.wait_for(lambda: browser.state()["suggestions"], "a suggestion")
    with browser.step("negative ctrl+alt-click"):
        browser.pick_label("click", other)
        browser.click(*far, ctrl=True, alt=True)
        first, second = answered(browser, 2)[:2]
        browser.wait_for(lambda: browser.state()["suggestions"], "the new suggestion")
    if DOCS:
        doc_picture(browser, "suggestion-with-negative-click", max_width=900, marks=on_screen(browser, (x, y), far))
    assert [p["is_positive"] for p in first["context"]["result"]] == [True]
    assert [p["is_positive"] for p in second["context"]["result"]] == [True, False], second["context"]
    backend_result(second)
    state = browser.state()
    assert [r["negative"] for r in state["regions"] if r["type"] == "keypointregion"] == [False, True]
    assert all(s["type"] == "brushregion" for s in state["suggestions"]), state["suggestions"]


def test_f_polygon_proposals_take_ctrl_clicks_and_ctrl_boxes(browser: Browser, backend: Backend, polygon_project):
    pid, tasks = polygon_project
    task = tasks[0]
    _, x, y, other, depth = inside_a_proposal(task)
    with browser.step("open and choose"):
        open_fresh(browser, pid, task["id"])
        browser.choose_smart_tool(SMART_KEYPOINT)
        browser.pick_label("click", other)
    before = predict_requests(backend, "200")
    with browser.step("plain click over a polygon"):
        browser.click(x, y)
        selected = browser.wait_for(lambda: browser.state()["selected"], "the click to select a polygon", timeout=10)
        time.sleep(2)
        assert [r["type"] for r in browser.regions() if r["id"] in selected] == ["polygonregion"]
        assert browser.interactive_requests() == [] and predict_requests(backend, "200") == before
    before_regions = {r["id"] for r in browser.regions()}
    with browser.step("ctrl-click over a polygon"):
        browser.pick_label("click", other)  # unselects first
        browser.click(x, y, ctrl=True)
        browser.wait_for_region("polygonregion", other, exclude=before_regions, origin="manual")
        [request] = answered(browser, 1)
    assert request["context"]["result"][0]["type"] == "keypointlabels"
    results = backend_result(request)
    assert results and all(r["type"] == "polygonlabels" and r["value"]["polygonlabels"] == [other] for r in results)
    assert predict_requests(backend, "200") == before + 1

    box_label = next(name for name in LABELS if name != other)
    start, end = box_inside(x, y, depth)
    with browser.step("plain box drag over a polygon"):
        browser.choose_smart_tool(SMART_RECTANGLE)
        browser.pick_label("box", box_label)
        browser.drag(start, end)
        time.sleep(2)
        # The press lands on the polygon, which does not forward it to the tool: no box, no request.
        assert len(browser.interactive_requests()) == 1 and predict_requests(backend, "200") == before + 1
        assert not [r for r in browser.regions() if r["label"] == box_label and r["origin"] == "manual"]
    before_regions = {r["id"] for r in browser.regions()}
    with browser.step("ctrl box drag over a polygon"):
        browser.pick_label("box", box_label)
        browser.drag(start, end, ctrl=True)
        browser.wait_for_region("polygonregion", box_label, exclude=before_regions, origin="manual")
        second = answered(browser, 2)[1]
    assert second["context"]["result"][0]["type"] == "rectanglelabels"
    assert all(r["value"]["polygonlabels"] == [box_label] for r in backend_result(second))
    assert predict_requests(backend, "200") == before + 2
    if DOCS:
        doc_picture(browser, "polygon-result", box=work_area(browser), max_width=900, marks=on_screen(browser, (x, y)))


def label_rows_picture(page: Browser, path: Path) -> None:
    """The labels panel's rows, each captioned with the tool it belongs to (the page does not say)."""
    from PIL import ImageFont

    tools = {
        "tag": "proposals / brush fixes (BrushLabels)",
        "click": "smart keypoint (Auto-Detect)",
        "box": "smart box (Auto-Detect)",
    }
    rows = page.label_rows()
    boxes = [page.element_box(xpath=f"(//div[contains(@class,'lsf-labels')])[{i + 1}]") for i in range(len(rows))]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right = max(
        page.js(
            "return [...arguments[0].querySelectorAll('.lsf-label')].pop().getBoundingClientRect().right",
            page.driver.find_elements("css selector", ".lsf-labels")[i],
        )
        for i in range(len(rows))
    )
    bottom = max(b[3] for b in boxes)
    page.picture(path, box=(left, top, round(right), bottom), pad=6)
    image = Image.open(path).convert("RGB")
    caption = 350
    out = Image.new("RGB", (image.width + caption, image.height), "white")
    out.paste(image, (0, 0))
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default(size=15)
    for (control, _), box in zip(rows, boxes):
        middle = (box[1] + box[3]) / 2 - top + 6
        draw.line((image.width + 4, middle, image.width + 26, middle), fill=(40, 40, 40), width=2)
        draw.polygon(
            [(image.width + 2, middle), (image.width + 9, middle - 5), (image.width + 9, middle + 5)], fill=(40, 40, 40)
        )
        draw.text(
            (image.width + 34, middle),
            tools.get(control, control),
            fill=(40, 40, 40),
            font=font,
            anchor="lm",
        )
    out.quantize(colors=256).save(path, optimize=True)
