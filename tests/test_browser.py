"""End to end in a real browser: the real ComfyUI server and frontend, Debian's headless Chromium.

1. Load an example workflow from the server's template list: no missing-node dialog.
2. Move the speed-up slider with the mouse: the schedule canvas's pixels and the speed-up text change.
3. Queue the graph with the Run button: the run completes, the output image and the pictures appear,
   and Apply Block Cache shows computed/total layer evaluations and the time saved.
4. Save and reload the workflow: the pictures come back from the saved data, without a run.
5. Switch to the Vue node renderer ("Nodes 2.0"): the pictures are there too.
6. Put Apply Block Cache into a subgraph and queue: its run summary (sent for node "12:5") reaches it.

It runs on two frontends: the one the host pins (comfyui-frontend-package 1.32.9 on ComfyUI 0.3.75,
1.49.6 on 0.33.0) and the newest, which scripts/setup.sh installs apart (FRONTEND_LATEST_VERSION)
and the server serves with --front-end-root. Screenshots go to tests/artifacts/<frontend>/. BLOCK_CACHE_THUMBNAILS=1
(`make thumbnails`) also writes the example workflows' thumbnails and the README's screenshots
(docs/), from the pinned frontend.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from importlib.metadata import version
from pathlib import Path

import pytest
from comfy_bootstrap import PACK_ROOT
from comfy_server import comfy_server, frontend_latest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
ARTIFACTS = PACK_ROOT / "tests" / "artifacts"
DEMO = "block_cache_demo_model_no_checkpoint"
THUMBNAILS = os.environ.get("BLOCK_CACHE_THUMBNAILS") == "1"
# CI sets this: there a missing browser is a failure, not a skip.
REQUIRED = os.environ.get("BLOCK_CACHE_REQUIRE_BROWSER") == "1"

try:
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover - set-up installs it
    sync_playwright = None
    PlaywrightTimeout = TimeoutError

if not REQUIRED and (sync_playwright is None or not CHROMIUM.exists()):
    pytest.skip("playwright or /usr/bin/chromium missing (scripts/setup.sh installs both)", allow_module_level=True)

LONG = 600_000  # ms: a shared 2-core CPU can be slow


@pytest.fixture(scope="module", params=["pinned", "latest"])
def frontend(request) -> tuple[str, Path | None]:
    """(name and version, --front-end-root or None for the pinned one)."""
    if request.param == "pinned":
        return f"pinned-{version('comfyui-frontend-package')}", None
    found = frontend_latest()
    if found is None:
        message = "the newest frontend is not installed (scripts/setup.sh installs it)"
        if REQUIRED:
            pytest.fail(message)
        pytest.skip(message)
    root, latest = found
    return f"latest-{latest}", root


@pytest.fixture(scope="module")
def server(tmp_path_factory, frontend):
    base = tmp_path_factory.mktemp("comfy_browser")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    # No first-run template dialog, the classic canvas first (the Vue renderer is checked later).
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": True, "Comfy.VueNodes.Enabled": False,
                                    "Comfy.Minimap.Visible": False}))
    with comfy_server(base, frontend_root=frontend[1]) as running:
        yield running


@pytest.fixture(scope="module")
def artifacts(frontend) -> Path:
    folder = ARTIFACTS / frontend[0]
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        page.set_default_timeout(120_000)
        errors: list[str] = []
        page.on("pageerror", lambda error: errors.append(str(error)))
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" and "block_cache" in m.text else None)
        page.block_cache_errors = errors
        try:
            yield page
        finally:
            browser.close()


def _open(page, url: str) -> None:
    page.goto(url, timeout=LONG)
    page.wait_for_function("() => window.app?.graph && window.app.extensionManager?.setting", timeout=LONG)
    # Newer frontends (1.49) publish window.app before they restore the last session's workflow tabs, behind
    # the loading spinner: a graph loaded before the spinner ends is replaced by the restored one.
    page.wait_for_function("() => window.app.extensionManager.spinner !== true", timeout=LONG)
    page.wait_for_function("() => window.app.extensions?.some(e => e.name === 'block_cache.pictures')")
    page.evaluate(CLOSE_BANNER)


# The "Introducing Nodes 2.0" announcement covers the top of the page: press its last button (x).
CLOSE_BANNER = """() => {
    const text = [...document.querySelectorAll('body *')].find(
        e => e.children.length === 0 && e.textContent.includes('Introducing Nodes 2.0'));
    let bar = text;
    while (bar && bar.querySelectorAll('button').length < 2) bar = bar.parentElement;
    const buttons = bar ? bar.querySelectorAll('button') : [];
    if (buttons.length) buttons[buttons.length - 1].click();
}"""


def _load_template(page, name: str, min_scale: float = 0.0) -> None:
    page.evaluate("""async (name) => {
        const list = await (await fetch('/api/workflow_templates')).json();
        if (!list.block_cache?.includes(name)) throw new Error('template not listed: ' + JSON.stringify(list));
        const workflow = await (await fetch(`/api/workflow_templates/block_cache/${name}.json`)).json();
        await window.app.loadGraphData(workflow, true, true, name);
    }""", name)
    page.wait_for_function("(n) => window.app.graph._nodes.length >= n", arg=5)
    _fit(page, min_scale)


def _fit(page, min_scale: float = 0.0) -> None:
    # Below a scale of about 0.6 LiteGraph draws nodes without text: thumbnails ask for more.
    page.evaluate("""(minScale) => { const c = window.app.canvas; c.deselectAll?.();
        const nodes = window.app.graph._nodes.filter(n => n.type !== 'MarkdownNote');
        const xs = nodes.flatMap(n => [n.pos[0], n.pos[0] + n.size[0]]);
        const ys = nodes.flatMap(n => [n.pos[1] - 30, n.pos[1] + n.size[1]]);
        const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
        const el = c.canvas.getBoundingClientRect();
        const scale = Math.max(minScale, Math.min((el.width - 120) / (x1 - x0), (el.height - 140) / (y1 - y0), 1));
        c.ds.scale = scale; c.ds.offset = [60 / scale - x0, 90 / scale - y0];
        c.setDirty(true, true); }""", min_scale)
    page.wait_for_timeout(500)


def _node_id(page, node_type: str, title: str | None = None) -> int:
    return page.evaluate("""([type, title]) => window.app.graph._nodes.find(
        n => n.type === type && (!title || n.title === title)).id""", [node_type, title])


def _picture(page, node_id: int) -> dict:
    """The node's picture: whether drawn, a pixel fingerprint, and its text."""
    return page.evaluate("""(id) => {
        const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === 'block_cache_picture');
        const c = w.canvas; const r = c.getBoundingClientRect();
        const drawn = c.style.display !== 'none' && c.width > 100;
        let coloured = 0;
        if (drawn) {
            const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
            for (let i = 0; i < d.length; i += 4) if (Math.max(d[i], d[i + 1], d[i + 2]) > 80) coloured++;
        }
        return {drawn, pixels: drawn ? c.toDataURL() : '', coloured, text: w.text.textContent,
                speedup: w.text.dataset.speedup ?? null, visible: r.width > 20 && r.height > 20};
    }""", node_id)


def _wait_drawn(page, node_id: int, why: str) -> None:
    """Waits until the node's picture is drawn and on screen (it redraws after a load, later on a busy machine)."""
    try:
        page.wait_for_function("""(id) => { const w = window.app.graph.getNodeById(id)?.widgets?.find(
            w => w.name === 'block_cache_picture'); const c = w?.canvas; if (!c) return false;
            const r = c.getBoundingClientRect();
            return c.style.display !== 'none' && c.width > 100 && r.width > 20 && r.height > 20; }""",
                               arg=node_id, timeout=60_000)
    except PlaywrightTimeout:
        raise AssertionError(f"{why}: {_picture(page, node_id)['text']}") from None


def _assert_no_alert(page) -> None:
    """The frontend raises toasts for workflows it finds malformed ("Invalid workflow against zod schema")."""
    page.wait_for_timeout(300)
    assert page.get_by_text("Invalid workflow", exact=False).count() == 0, "the frontend rejected the workflow"


def _screenshot(page, folder: Path, name: str) -> Path:
    path = folder / name
    page.screenshot(path=str(path))
    return path


def test_workflow_slider_run_reload_and_vue_nodes(server, page, frontend, artifacts):
    started = time.perf_counter()
    _open(page, server.url)
    _load_template(page, DEMO, min_scale=0.65)

    # 1. Loaded with nothing missing: every node type is known and no missing-nodes dialog shows.
    unknown = page.evaluate("""() => window.app.graph._nodes.filter(n => n.type !== 'MarkdownNote'
        && !window.LiteGraph?.registered_node_types?.[n.type]).map(n => n.type)""")
    assert unknown == []
    assert page.get_by_text("missing", exact=False).filter(visible=True).count() == 0, "a missing-node dialog showed"
    _assert_no_alert(page)
    profile_id, build_id = _node_id(page, "BlockCacheProfile"), _node_id(page, "BlockCacheBuildTargetSchedule")
    apply_id = _node_id(page, "BlockCacheApply")
    # The workflow carries its measured profile, so the pictures show before any run.
    page.wait_for_function("(id) => window.app.graph.getNodeById(id).widgets.find(w => w.name === "
                           "'block_cache_picture').text.dataset.speedup", arg=build_id)
    heatmap = _picture(page, profile_id)
    before = _picture(page, build_id)
    assert heatmap["drawn"] and heatmap["coloured"] > 500 and heatmap["visible"], heatmap["text"]
    assert before["drawn"] and before["visible"] and "estimated speed-up" in before["text"]
    shot_loaded = _screenshot(page, artifacts, "01_loaded.png")

    # 2. Drag the speed-up slider with the mouse, on the canvas, as a user does.
    box = page.evaluate("""(id) => { const n = window.app.graph.getNodeById(id);
        const w = n.widgets.find(w => w.name === 'speedup'); const ds = window.app.canvas.ds;
        const r = window.app.canvas.canvas.getBoundingClientRect();
        const at = (x, y) => [r.left + (x + ds.offset[0]) * ds.scale, r.top + (y + ds.offset[1]) * ds.scale];
        const h = w.computedHeight ?? 20;
        return {left: at(n.pos[0] + 15, n.pos[1] + w.y + h / 2), right: at(n.pos[0] + n.size[0] - 15, 0)[0],
                value: w.value}; }""", build_id)
    assert box["value"] == 2.25
    (x0, y), x1 = box["left"], box["right"]
    page.mouse.move(x0 + (x1 - x0) * 0.17, y)
    page.mouse.down()
    for fraction in (0.2, 0.25, 0.3, 0.35):
        page.mouse.move(x0 + (x1 - x0) * fraction, y, steps=3)
    page.mouse.up()
    speedup = page.evaluate("(id) => window.app.graph.getNodeById(id).widgets.find(w => w.name === "
                            "'speedup').value", build_id)
    assert speedup > 3.0, f"the slider did not move: {speedup}"
    page.wait_for_function("""([id, old]) => window.app.graph.getNodeById(id).widgets.find(
        w => w.name === 'block_cache_picture').text.dataset.speedup !== old""", arg=[build_id, before["speedup"]])
    after = _picture(page, build_id)
    assert after["pixels"] != before["pixels"], "the schedule picture did not change"
    assert float(after["speedup"]) > float(before["speedup"]), (before["text"], after["text"])
    assert "queue to use" in after["text"] and "uncached steps" in after["text"]
    shot_slider = _screenshot(page, artifacts, "02_speedup_moved.png")

    # 3. Queue the workflow as it is, with the Run button.
    done_before = len(server.get("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    deadline = time.time() + LONG / 1000
    while len(history := server.get("/history")) == done_before:
        assert time.time() < deadline, f"the run did not finish:\n{server.log()[-3000:]}"
        time.sleep(1)
    assert all(entry["status"]["status_str"] == "success" for entry in history.values()), history
    page.wait_for_function("""(id) => (window.app.graph.getNodeById(id).widgets.find(
        w => w.name === 'block_cache_picture').text.textContent || '').includes('uncached sampler')""",
                           arg=apply_id, timeout=60_000)
    summary = _picture(page, apply_id)["text"]
    assert "last run: computed" in summary and "layer evaluations" in summary, summary
    assert "uncached sampler" in summary, summary  # measured against the uncached KSampler in the graph
    outputs = page.evaluate("() => Object.values(window.app.nodeOutputs ?? {})")
    images = [image for output in outputs for image in output.get("images", [])]
    assert len(images) >= 2, outputs  # the cached and the uncached picture
    # ... and the browser really shows them: each preview node's image has loaded.
    page.wait_for_function("""() => window.app.graph._nodes.filter(n => n.type === 'PreviewImage').every(
        n => n.imgs?.length && n.imgs[0].complete && n.imgs[0].naturalWidth > 0)""", timeout=60_000)
    # Compare Pictures shows the cached picture's PSNR and SSIM against the uncached one.
    compare_id = _node_id(page, "BlockCacheComparePictures")
    page.wait_for_function("""(id) => (window.app.graph.getNodeById(id).widgets.find(
        w => w.name === 'block_cache_picture').text.textContent || '').includes('PSNR')""", arg=compare_id)
    assert "SSIM" in _picture(page, compare_id)["text"]
    ran = _picture(page, build_id)
    assert ran["drawn"] and "queue to use" not in ran["text"], ran["text"]
    assert _picture(page, profile_id)["drawn"]
    _fit(page, 0.65)
    shot_run = _screenshot(page, artifacts, "03_after_run.png")

    # 4. Save (serialize) and reload: the pictures come back from the workflow alone.
    # The JSON text that Save writes (as text: a Python round trip would turn undefined into null).
    saved = page.evaluate("async () => JSON.stringify((await window.app.graphToPrompt()).workflow)")
    _open(page, server.url)
    page.evaluate("async (w) => { await window.app.loadGraphData(JSON.parse(w), true, true, 'reloaded'); }", saved)
    _fit(page, 0.65)
    for node_id in (profile_id, build_id):
        _wait_drawn(page, node_id, f"node {node_id} lost its picture on reload")
    assert "last run: computed" in _picture(page, apply_id)["text"]
    assert "PSNR" in _picture(page, compare_id)["text"]
    _assert_no_alert(page)
    _screenshot(page, artifacts, "04_reloaded.png")

    # 5. The Vue node renderer draws the same canvases.
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', true); }")
    page.evaluate("async (w) => { await window.app.loadGraphData(JSON.parse(w), true, true, 'vue'); }", saved)
    page.wait_for_selector("[data-node-id] canvas.block-cache-canvas", state="visible", timeout=60_000)
    _fit(page, 0.65)
    _wait_drawn(page, build_id, "the Vue node did not draw its picture")
    vue = _picture(page, build_id)
    assert vue["drawn"] and vue["visible"], vue["text"]
    _assert_no_alert(page)
    # A value change from the node's own widget redraws there too.
    page.evaluate("""(id) => { const w = window.app.graph.getNodeById(id).widgets.find(w => w.name === 'speedup');
        w.value = 1.2; w.callback?.(1.2); }""", build_id)
    page.wait_for_function("""([id, old]) => window.app.graph.getNodeById(id).widgets.find(
        w => w.name === 'block_cache_picture').text.dataset.speedup !== old""", arg=[build_id, vue["speedup"]])
    shot_vue = _screenshot(page, artifacts, "05_vue_nodes.png")
    page.evaluate("async () => { await window.app.extensionManager.setting.set('Comfy.VueNodes.Enabled', false); }")

    assert not page.block_cache_errors, page.block_cache_errors
    if THUMBNAILS and frontend[1] is None:  # the pinned frontend's look
        docs = PACK_ROOT / "docs"
        docs.mkdir(exist_ok=True)
        for shot, name in [(shot_loaded, "frontend_loaded.png"), (shot_slider, "frontend_speedup.png"),
                           (shot_run, "frontend_after_run.png"), (shot_vue, "frontend_vue_nodes.png")]:
            shutil.copy(shot, docs / name)
        _thumbnails(page, server)
    (artifacts / "timing.txt").write_text(f"browser test on {frontend[0]} took {time.perf_counter() - started:.0f} s\n")


def test_run_summary_reaches_apply_inside_a_subgraph(server, page):
    _open(page, server.url)
    _load_template(page, DEMO)
    apply_id = _node_id(page, "BlockCacheApply")
    # The frontend's own "Convert to Subgraph"; the prompt then names the node "<subgraph node>:<inner id>".
    path = page.evaluate("""(id) => {
        const graph = window.app.rootGraph ?? window.app.graph;
        const converted = graph.convertToSubgraph(new Set([graph.getNodeById(id)]));
        const outer = converted.node ?? converted;
        const inner = outer.subgraph.nodes.find(n => n.type === 'BlockCacheApply');
        return `${outer.id}:${inner.id}`;
    }""", apply_id)
    done_before = len(server.get("/history"))
    page.get_by_role("button", name="Run", exact=True).first.click()
    deadline = time.time() + LONG / 1000
    while len(history := server.get("/history")) == done_before:
        assert time.time() < deadline, f"the run did not finish:\n{server.log()[-3000:]}"
        time.sleep(1)
    assert all(entry["status"]["status_str"] == "success" for entry in history.values()), history
    text = page.wait_for_function("""(path) => {
        const [outer, inner] = path.split(':').map(Number);
        const node = (window.app.rootGraph ?? window.app.graph).getNodeById(outer).subgraph.getNodeById(inner);
        const text = node.widgets.find(w => w.name === 'block_cache_picture').text.textContent || '';
        return text.includes('last run: computed') && text;
    }""", arg=path, timeout=60_000).json_value()
    assert "layer evaluations" in text, text
    assert not page.block_cache_errors, page.block_cache_errors


def _thumbnails(page, server) -> None:
    """example_workflows/<name>.jpg: each workflow as it opens (the demo one after its run)."""
    page.set_viewport_size({"width": 1600, "height": 900})
    for path in sorted((PACK_ROOT / "example_workflows").glob("*.json")):
        _open(page, server.url)
        _load_template(page, path.stem, min_scale=0.62)
        page.wait_for_timeout(1500)
        page.screenshot(path=str(path.with_suffix(".jpg")), type="jpeg", quality=80)
