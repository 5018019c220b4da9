"""A headless Chromium driving Label Studio's labeling page, for end-to-end tests of the smart tools.

It talks to the page the way an annotator does (clicks, drags, keys) and reads
what happened from the editor's own store (``window.Htx``), never from pixels.
Coordinates are in percent of the image, like Label Studio's results, and are
turned into screen positions with the canvas's own transform (zoom and pan
included).

Needs ``chromium`` and ``chromedriver`` (Debian's packages; ``make test``
installs them) and ``selenium``. Chromium runs headless in a fresh profile,
with everything that would reach outside the machine switched off.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)

# The editor's tool buttons are named by their aria-label; the smart copies sit in the Auto-Detect flyout.
SMART_KEYPOINT = "key-point-tool"
SMART_RECTANGLE = "rectangle-tool"
SMART_BRUSH = "brush-tool"

AUTO_DETECT = "//div[contains(@class,'lsf-toolbar__group')]/button[contains(@class,'lsf-tool_smart')]"

# Every interactive request the page sends to Label Studio (which forwards it to the backend's /predict),
# with its body and status: what the annotator's gesture actually asked for.
_RECORD_INTERACTIVE = """
if (!window.__interactiveRequests) {
  window.__interactiveRequests = [];
  const original = window.fetch;
  window.fetch = function (resource, options) {
    const url = String((resource && resource.url) || resource);
    const call = original.apply(this, arguments);
    if (!/\\/interactive-annotating/.test(url)) return call;
    const entry = {url, body: options && options.body, status: null, reply: null};
    window.__interactiveRequests.push(entry);
    return call.then((response) => {
      entry.status = response.status;
      response.clone().json().then((reply) => { entry.reply = reply; }, () => { entry.reply = 'not json'; });
      return response;
    }, (error) => { entry.status = -1; throw error; });
  };
}
"""

_STATE = """
const annotation = window.Htx && Htx.annotationStore && Htx.annotationStore.selected;
if (!annotation) return null;
const region = (r) => ({
  id: r.id,
  type: r.type,
  label: r.labelName || null,
  from_name: r.results && r.results[0] ? r.results[0].from_name.name : null,
  origin: r.origin || null,
  dynamic: !!r.dynamic,
  negative: !!r.negative,
  selected: !!r.selected,
});
const tool = window.ToolManager && ToolManager.getInstance({name: arguments[0]});
const selectedTool = tool && tool.findSelectedTool();
return {
  regions: annotation.regions.map(region),
  suggestions: Array.from(annotation.suggestions.values()).map(region),
  selected: annotation.selectedRegions.map((r) => r.id),
  tool: selectedTool ? selectedTool.fullName : null,
  labels: Object.fromEntries(Array.from(annotation.names.values())
    .filter((t) => t.type && t.type.endsWith('labels')).map((t) => [t.name, t.selectedValues()])),
  autoAnnotation: !!Htx.autoAnnotation,
  autoAccept: !!Htx.autoAcceptSuggestions,
};
"""

_SCREEN_POINT = """
const img = Htx.annotationStore.selected.names.get(arguments[0]);
const stage = img.stageRef;
const box = stage.container().getBoundingClientRect();
const p = stage.getAbsoluteTransform().point({x: arguments[1] / 100 * img.stageWidth,
                                               y: arguments[2] / 100 * img.stageHeight});
return {x: box.left + p.x, y: box.top + p.y, left: box.left, top: box.top, width: box.width, height: box.height};
"""


class BrowserError(AssertionError):
    """A step in the page did not happen in time; the message names the screenshot taken then."""


def find_chromium() -> tuple[str, str] | None:
    """``(chromium, chromedriver)`` from ``CHROMIUM_BIN``/``CHROMEDRIVER_BIN`` or the PATH, or ``None``."""
    chromium = os.environ.get("CHROMIUM_BIN") or shutil.which("chromium") or shutil.which("chromium-browser")
    driver = os.environ.get("CHROMEDRIVER_BIN") or shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


class Browser:
    """One headless Chromium window on a Label Studio server."""

    def __init__(
        self,
        base_url: str,
        shots: Path,
        width: int = 1280,
        height: int = 800,
        timeout: float = 30.0,
        to_name: str = "image",
    ) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        found = find_chromium()
        if found is None:
            raise RuntimeError("chromium and chromedriver are missing: `make test` installs them (Debian packages).")
        self.base_url = base_url.rstrip("/")
        self.shots = shots
        self.shots.mkdir(parents=True, exist_ok=True)
        self.timeout = timeout
        self.to_name = to_name
        self._profile = tempfile.mkdtemp(prefix="chromium-profile-")
        options = webdriver.ChromeOptions()
        options.binary_location = found[0]
        for flag in CHROMIUM_FLAGS:
            options.add_argument(flag)
        options.add_argument(f"--user-data-dir={self._profile}")
        options.add_argument(f"--window-size={width},{height}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self._service = Service(found[1], log_output=str(shots / "chromedriver.log"))
        try:
            self.driver = webdriver.Chrome(service=self._service, options=options)
        except Exception:
            shutil.rmtree(self._profile, ignore_errors=True)
            raise
        self.driver.set_page_load_timeout(timeout * 2)
        self.driver.set_script_timeout(timeout)
        # The viewport itself is width x height (--window-size counts the window's frame in some builds).
        self.driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False},
        )

    def close(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self._profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- waiting and evidence -------------------------------------------------------------------------------------

    def screenshot(self, name: str) -> Path:
        """The whole viewport as a PNG under ``shots``; its path is printed (pytest shows it on failure)."""
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        print(f"screenshot: {path}")
        return path

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[None]:
        """Run a step; if it fails, save a screenshot named after it and say where it is."""
        try:
            yield
        except Exception as exc:
            try:
                path = self.screenshot(f"failed-{_slug(name)}")
            except Exception as shot_error:  # the browser itself is gone
                path = f"(no screenshot: {shot_error})"
            raise BrowserError(f"step {name!r} failed ({exc}); screenshot: {path}") from exc

    def wait_for(self, check: Callable[[], Any], what: str, timeout: float | None = None, every: float = 0.2) -> Any:
        """Poll ``check`` until it returns something truthy, at most ``timeout`` seconds."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        last_error: Exception | None = None
        while True:
            try:
                value = check()
                if value:
                    return value
            except Exception as exc:  # the page may be between renders
                last_error = exc
            if time.monotonic() > deadline:
                path = self.screenshot(f"timeout-{_slug(what)}")
                detail = f"; last error: {last_error}" if last_error else ""
                raise BrowserError(f"gave up waiting for {what}{detail}; screenshot: {path}")
            time.sleep(every)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def state(self) -> dict[str, Any] | None:
        """The selected annotation's regions, suggestions, selection, tool and chosen labels, from the store."""
        return self.js(_STATE, self.to_name)

    def regions(self) -> list[dict[str, Any]]:
        state = self.state()
        return state["regions"] if state else []

    def serialized(self) -> list[dict[str, Any]]:
        """The annotation's results as Label Studio would save them (RLE, points, labels)."""
        return self.js("return Htx.annotationStore.selected.serializeAnnotation()")

    def wait_for_region(
        self,
        type: str,
        label: str | None = None,
        exclude: set[str] | frozenset[str] = frozenset(),
        timeout: float | None = None,
        **fields: Any,
    ) -> dict[str, Any]:
        """A region of ``type`` (e.g. ``brushregion``) with ``label`` that is not in ``exclude``, once it exists."""

        def found() -> dict[str, Any] | None:
            for region in self.regions():
                if region["id"] in exclude or region["type"] != type:
                    continue
                if label is not None and region["label"] != label:
                    continue
                if all(region.get(k) == v for k, v in fields.items()):
                    return region
            return None

        return self.wait_for(found, f"a {type} labelled {label!r}", timeout)

    def interactive_requests(self) -> list[dict[str, Any]]:
        """Each interactive request the page sent since the task opened: its ``context``, status and the reply
        (Label Studio's answer, which holds the backend's ``/predict`` result under ``data``)."""
        entries = self.js("return window.__interactiveRequests || []")
        out = []
        for entry in entries:
            body = json.loads(entry["body"]) if entry.get("body") else {}
            out.append(
                {
                    "status": entry.get("status"),
                    "task": body.get("task"),
                    "context": body.get("context"),
                    "reply": entry.get("reply"),
                }
            )
        return out

    # -- pages ----------------------------------------------------------------------------------------------------

    def login(self, email: str, password: str) -> None:
        from selenium.webdriver.common.by import By

        self.driver.get(f"{self.base_url}/user/login/")
        self.wait_for(lambda: self.driver.find_elements(By.NAME, "email"), "the login form")
        self.driver.find_element(By.NAME, "email").send_keys(email)
        self.driver.find_element(By.NAME, "password").send_keys(password)
        self.driver.find_element(By.CSS_SELECTOR, "button[type=submit], input[type=submit]").click()
        self.wait_for(lambda: "/user/login" not in self.driver.current_url, "the login to finish")

    def open_task(self, project: int, task: int, tab: int | None = None) -> None:
        """The labeling page of ``task``, once its image is on the canvas and the predictions are in the store."""
        query = f"tab={tab}&task={task}" if tab is not None else f"task={task}"
        self.driver.get(f"{self.base_url}/projects/{project}/data?{query}")
        self.wait_for(
            lambda: self.js(
                """const s = window.Htx && Htx.annotationStore; const a = s && s.selected;
                   const img = a && a.names.get(arguments[0]);
                   return !!(Htx.task && Htx.task.id === arguments[1] && img && img.stageRef
                             && img.imageIsLoaded && img.stageWidth > 1);""",
                self.to_name,
                task,
            ),
            f"task {task} to load",
            timeout=self.timeout * 2,
        )
        self.js(_RECORD_INTERACTIVE)
        self.wait_for(self._canvas_settled, "the canvas to settle")

    def _canvas_settled(self) -> bool:
        """True once two reads a moment apart find the canvas at the same place and size (layout done)."""
        first = self.js(_SCREEN_POINT, self.to_name, 100, 100)
        time.sleep(0.3)
        return first == self.js(_SCREEN_POINT, self.to_name, 100, 100)

    # -- the labeling page's controls -----------------------------------------------------------------------------

    def _toggle(self, testid: str, on: bool, flag: str) -> None:
        from selenium.webdriver.common.by import By

        def flip() -> bool:
            box = self.driver.find_element(By.CSS_SELECTOR, f"[data-testid={testid}]")
            if box.is_selected() != on:
                box.find_element(By.XPATH, "ancestor::label[1]").click()
            return self.state()[flag] == on

        self.wait_for(flip, f"{testid} to be {'on' if on else 'off'}")

    def set_auto_annotation(self, on: bool = True) -> None:
        """The Auto-Annotation toggle (bottom bar): smart tools appear in the toolbar's Auto-Detect flyout."""
        self._toggle("bottombar-auto-annotation-toggle", on, "autoAnnotation")

    def set_auto_accept(self, on: bool = True) -> None:
        """Auto-Accept Suggestions (next to Auto-Annotation): the backend's answer becomes a region at once."""
        self._toggle("bottombar-auto-accept-toggle", on, "autoAccept")

    def choose_smart_tool(self, name: str = SMART_KEYPOINT) -> None:
        """Pick a smart tool (``key-point-tool``, ``rectangle-tool``...) from the Auto-Detect flyout.

        The flyout opens on hover, but only while the Auto-Detect button shows no tool controls (the smart
        brush shows a size slider instead): the Move tool is chosen first so that it always opens.
        """
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        wanted = {SMART_KEYPOINT: "KeyPointTool", SMART_RECTANGLE: "RectangleTool", SMART_BRUSH: "BrushTool"}
        wanted_tool = wanted.get(name, "") + "-dynamic"

        def choose() -> bool:
            if self.state()["tool"] == wanted_tool:
                return True
            move = self.driver.find_elements(By.CSS_SELECTOR, ".lsf-toolbar button[aria-label=move-tool]")
            if move and self.state()["tool"] != "MoveTool":
                move[0].click()
            auto_detect = self.driver.find_element(By.XPATH, AUTO_DETECT)
            ActionChains(self.driver).move_to_element(auto_detect).pause(0.4).perform()
            item = self.driver.find_element(By.CSS_SELECTOR, f".lsf-tool__extra button[aria-label={name}]")
            ActionChains(self.driver).move_to_element(item).click().perform()
            return self.state()["tool"] == wanted_tool

        self.wait_for(choose, f"the smart {name} to be chosen", every=0.5)

    def open_auto_detect_flyout(self) -> None:
        """Hover the Auto-Detect button so that its flyout shows (for screenshots)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.by import By

        auto_detect = self.driver.find_element(By.XPATH, AUTO_DETECT)
        ActionChains(self.driver).move_to_element(auto_detect).pause(0.4).perform()
        self.wait_for(
            lambda: any(
                e.is_displayed() for e in self.driver.find_elements(By.CSS_SELECTOR, ".lsf-tool__extra button")
            ),
            "the Auto-Detect flyout",
        )

    def label_rows(self) -> list[tuple[str, list[str]]]:
        """The labels panel's rows, top to bottom, each as ``(control name, its labels)``.

        The page does not name a row's control: rows come in the order of the label controls in the config,
        which is the order of the store's tags.
        """
        controls = self.js(
            """return Array.from(Htx.annotationStore.selected.names.values())
                 .filter((t) => t.type && t.type.endsWith('labels') && t.visible !== false).map((t) => t.name);"""
        )
        rows = self.js(
            """return Array.from(document.querySelectorAll('.lsf-labels')).map((row) =>
                 Array.from(row.querySelectorAll('.lsf-label__text')).map((e) => e.textContent.trim()));"""
        )
        if len(controls) != len(rows):
            raise BrowserError(f"{len(rows)} label rows on the page for the label controls {controls}")
        return list(zip(controls, rows))

    def pick_label(self, control: str, label: str) -> None:
        """Click ``label`` in ``control``'s row of the labels panel, with no region selected."""
        self.unselect()  # a label clicked while a region is selected relabels that region
        self.wait_for(
            lambda: self.click_label(control, label) or label in self.state()["labels"].get(control, []),
            f"label {label!r} of {control!r} to be picked",
            every=0.5,
        )

    def click_label(self, control: str, label: str) -> None:
        """Click ``label`` in ``control``'s row as it is (it relabels a selected region), unless it is lit already."""
        from selenium.webdriver.common.by import By

        names = [name for name, _ in self.label_rows()]
        row = self.driver.find_elements(By.CSS_SELECTOR, ".lsf-labels")[names.index(control)]
        target = next(e for e in row.find_elements(By.CSS_SELECTOR, ".lsf-label") if e.text.split("\n")[0] == label)
        if label not in self.state()["labels"].get(control, []):
            self.reveal(target)
            target.click()

    def press(self, key: str) -> None:
        """A key pressed on the page (``Keys.BACKSPACE``...), as a hotkey."""
        from selenium.webdriver.common.action_chains import ActionChains

        self.js("document.activeElement && document.activeElement.blur && document.activeElement.blur()")
        ActionChains(self.driver).send_keys(key).perform()

    def unselect(self) -> None:
        """Esc: no region selected, so that a Ctrl/Cmd-click reaches the tool."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        if self.state()["selected"]:
            ActionChains(self.driver).send_keys(Keys.ESCAPE).perform()
        self.wait_for(lambda: not self.state()["selected"], "no region to be selected")

    def reveal(self, element: Any) -> None:
        """Scroll ``element`` to the middle of its panel unless it is already clickable where it is (the bottom bar
        covers the panel's last rows)."""
        self.js(
            """const e = arguments[0], r = e.getBoundingClientRect();
               const hit = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
               if (!hit || !(hit === e || e.contains(hit))) e.scrollIntoView({block: 'center'});""",
            element,
        )

    # -- gestures on the image ------------------------------------------------------------------------------------

    def screen_point(self, x: float, y: float) -> dict[str, float]:
        """Where the image point ``(x, y)`` (percent of the image) is on the screen, and the canvas box."""
        return self.js(_SCREEN_POINT, self.to_name, x, y)

    def _offset(self, x: float, y: float) -> tuple[Any, int, int]:
        """The canvas element and the point's offset from its centre (what selenium moves by)."""
        point = self.screen_point(x, y)
        inside = point["left"] <= point["x"] < point["left"] + point["width"]
        inside = inside and point["top"] <= point["y"] < point["top"] + point["height"]
        if not inside:
            raise BrowserError(f"image point ({x}, {y}) is off the visible canvas: {point}")
        element = self.js(
            "return Htx.annotationStore.selected.names.get(arguments[0]).stageRef.container()", self.to_name
        )
        dx = round(point["x"] - (point["left"] + point["width"] / 2))
        dy = round(point["y"] - (point["top"] + point["height"] / 2))
        return element, dx, dy

    def click(self, x: float, y: float, ctrl: bool = False, alt: bool = False) -> None:
        """A click at ``(x, y)`` percent of the image, with Ctrl (Cmd's stand-in here) and/or Alt held."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        element, dx, dy = self._offset(x, y)
        keys = [k for k, held in ((Keys.CONTROL, ctrl), (Keys.ALT, alt)) if held]
        actions = ActionChains(self.driver).move_to_element_with_offset(element, dx, dy)
        for key in keys:
            actions = actions.key_down(key)
        actions = actions.click()
        for key in reversed(keys):
            actions = actions.key_up(key)
        actions.perform()

    def drag(self, start: tuple[float, float], end: tuple[float, float], steps: int = 6, ctrl: bool = False) -> None:
        """Press at ``start``, move in ``steps`` to ``end`` and release (percent of the image)."""
        from selenium.webdriver.common.action_chains import ActionChains
        from selenium.webdriver.common.keys import Keys

        element, x0, y0 = self._offset(*start)
        _, x1, y1 = self._offset(*end)
        actions = ActionChains(self.driver).move_to_element_with_offset(element, x0, y0)
        if ctrl:
            actions = actions.key_down(Keys.CONTROL)
        actions = actions.click_and_hold()
        for i in range(1, steps + 1):
            actions = actions.move_to_element_with_offset(
                element, round(x0 + (x1 - x0) * i / steps), round(y0 + (y1 - y0) * i / steps)
            )
        actions = actions.release()
        if ctrl:
            actions = actions.key_up(Keys.CONTROL)
        actions.perform()

    def type_phrase(self, text: str) -> None:
        """Type into the labeling page's text area and submit it (Enter)."""
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        box = self.driver.find_element(By.CSS_SELECTOR, "[data-testid=textarea-input]")
        self.reveal(box)
        box.click()
        box.send_keys(text)
        box.send_keys(Keys.ENTER)

    # -- pictures for the docs ------------------------------------------------------------------------------------

    def element_box(self, css: str | None = None, xpath: str | None = None) -> tuple[int, int, int, int]:
        """An element's ``(left, top, right, bottom)`` on the screen."""
        from selenium.webdriver.common.by import By

        element = self.driver.find_element(By.CSS_SELECTOR, css) if css else self.driver.find_element(By.XPATH, xpath)
        r = self.js(
            "const r = arguments[0].getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]", element
        )
        return tuple(round(v) for v in r)  # type: ignore[return-value]

    def picture(
        self,
        path: Path,
        box: tuple[int, int, int, int] | None = None,
        pad: int = 8,
        max_width: int | None = None,
        colors: int = 256,
        marks: list[tuple[float, float]] = (),  # type: ignore[assignment]
        frames: list[tuple[float, float, float, float]] = (),  # type: ignore[assignment]
    ) -> Path:
        """The viewport (or ``box`` of it, padded) as a small PNG: cropped, scaled down, a palette of ``colors``.

        ``marks`` (screen points) get a ring and ``frames`` (screen ``left, top, right, bottom``) an outline, to
        show where a click or a box went.
        """
        from PIL import Image, ImageDraw

        image = Image.open(io.BytesIO(self.driver.get_screenshot_as_png())).convert("RGB")
        draw = ImageDraw.Draw(image)
        for x, y in marks:
            for radius, colour in ((11, "white"), (9, (230, 0, 120)), (6, "white")):
                draw.ellipse((x - radius, y - radius, x + radius, y + radius), outline=colour, width=2)
        for frame in frames:
            draw.rectangle(frame, outline="white", width=4)
            draw.rectangle(frame, outline=(230, 0, 120), width=2)
        if box is not None:
            left, top, right, bottom = box
            image = image.crop(
                (max(0, left - pad), max(0, top - pad), min(image.width, right + pad), min(image.height, bottom + pad))
            )
        if max_width and image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        image = image.quantize(colors=colors, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        return path


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60]
