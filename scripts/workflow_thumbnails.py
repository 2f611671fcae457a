"""Write the template browser's thumbnails: workflows/<name>.jpg for each workflows/<name>.json.

    .venv/bin/python scripts/workflow_thumbnails.py

Starts the test ComfyUI server (tiny checkpoint, this pack), opens its frontend in headless
Chromium, loads each workflow and photographs the canvas around its first ACE node, at a zoom where
the widgets read. Run it after changing a workflow's layout; it needs what tests/test_browser.py
needs (scripts/setup.sh installs it).
"""
from __future__ import annotations

import json
import sys
import tempfile
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import comfy_harness  # noqa: E402
from test_browser import CHROMIUM, CHROMIUM_FLAGS  # noqa: E402
from ui_workflows import shipped  # noqa: E402

SIDE = 720  # pixels of the square thumbnail
SCALE = 0.8  # canvas zoom

SHOOT = """async ([workflow, side, scale]) => {
    app.showMissingModelsError = () => {};
    await app.loadGraphData(workflow);
    const ace = app.graph.nodes.filter(n => n.type.startsWith('ACEErasure_')).sort((a, b) => a.id - b.id)[0];
    const [x, y] = [ace.pos[0] + ace.size[0] / 2, ace.pos[1] + ace.size[1] / 2];
    const [w, h] = [window.innerWidth, window.innerHeight];
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [w / 2 / scale - x, h / 2 / scale - y];
    app.canvas.deselectAll();
    app.canvas.setDirty(true, true);
    return {x: w / 2 - side / 2, y: h / 2 - side / 2, width: side, height: side};
}"""


def main() -> None:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as base, comfy_harness.ComfyServer(Path(base), [comfy_harness.tiny_sd15_checkpoint()]) as server, sync_playwright() as p:
        settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
        urllib.request.urlopen(urllib.request.Request(server.url + "/settings", data=json.dumps(settings).encode(), method="POST")).close()
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1800, "height": 1200})
        page.goto(server.url)
        page.wait_for_function("window.app?.graph && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100", timeout=60_000)
        for path in shipped():
            clip = page.evaluate(SHOOT, [json.loads(path.read_text()), SIDE, SCALE])
            page.wait_for_timeout(300)
            target = path.with_suffix(".jpg")
            page.screenshot(path=str(target), clip=clip, type="jpeg", quality=80)
            print(f"wrote {target.relative_to(REPO)}")
        browser.close()


if __name__ == "__main__":
    main()
