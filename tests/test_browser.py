"""ComfyUI's real frontend in headless Chromium, served by the test server: it loads every shipped
workflow without a missing node or an error, turns each into the prompt our converter makes,
lists them in the template browser, and shows our help page for a node.

Needs Debian's `chromium` (scripts/setup.sh installs it when run as root) and the `playwright`
package (requirements-dev.txt); Playwright drives the system Chromium, never a downloaded one.
Screenshots of each workflow go to a temp folder, printed at the end of the test (pytest -s).
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest

from comfy_harness import PACK_NAME, REPO, ComfyServer
from runner.workflows import CHECKPOINT, executed_nodes, load, shipped, to_api, uses_toy_model

CHROMIUM = Path("/usr/bin/chromium")
# Offline: without the background-networking flags Chromium keeps trying hosts it cannot reach.
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
# The frontend asks the Comfy registry about node packs; offline, its CSP blocks those requests and
# logs an error. Missing optional files (user.css, userdata) are logged as failed loads.
OFFLINE_NOISE = ("Content Security Policy", "Failed to load resource")
WORKFLOWS = shipped()
NODE_IDS = sorted(p.stem for p in (REPO / "web" / "docs").glob("*.md"))


def _require_browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"Chromium is not installed at {CHROMIUM}: run `bash scripts/setup.sh` as root "
                    "(it installs Debian's chromium package), or `apt-get install chromium`.")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("The playwright package is missing: run `bash scripts/setup.sh` (requirements-dev.txt).")
    return sync_playwright


class Page:
    """One browser tab on the test server's frontend, with the errors it logged."""

    def __init__(self, page, server: ComfyServer):
        self.page, self.server = page, server
        self.errors: list[str] = []
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)

    def new_errors(self, since: int) -> list[str]:
        return [e for e in self.errors[since:] if not any(n in e for n in OFFLINE_NOISE)]

    def evaluate(self, script: str, arg=None):
        return self.page.evaluate(script, arg)


@pytest.fixture(scope="module")
def frontend(comfy_server):
    sync_playwright = _require_browser()
    # A returning user: no first-run template dialog over the canvas, no minimap, text at any zoom.
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "LiteGraph.Canvas.MinFontSizeForLOD": 0}
    request = urllib.request.Request(comfy_server.url + "/settings", data=json.dumps(settings).encode(), method="POST")
    urllib.request.urlopen(request, timeout=10).close()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1800, "height": 1100})
            tab = Page(page, comfy_server)
            page.goto(comfy_server.url)
            page.wait_for_function(
                "window.app?.graph && Object.keys(window.LiteGraph?.registered_node_types ?? {}).length > 100",
                timeout=60_000,
            )
            yield tab
        finally:
            browser.close()


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workflow-screenshots")
    yield folder
    print(f"\nworkflow screenshots: {folder}")


@pytest.fixture(scope="module")
def object_info(comfy_server) -> dict:
    return comfy_server.get("/object_info", timeout=30)


LOAD = """async (workflow) => {
    // Record what the frontend would warn about instead of opening its dialogs. Newer frontends
    // (1.4x) have no missing-models dialog: they list missing models in a store for a side panel.
    const warned = {nodes: [], models: []};
    const dialog = typeof Object.getPrototypeOf(app).showMissingModelsError === 'function';  // not our own stand-in
    const pinia = document.querySelector('#vue-app')?.__vue_app__?.config?.globalProperties?.$pinia;
    pinia?._s.get('missingModel')?.clearMissingModels?.();  // nothing left from the previous graph
    app.showMissingNodesError = (types) => warned.nodes.push(...types.map(t => t.type ?? t));
    app.showMissingModelsError = (models) => warned.models.push(...models.map(m => m.name));
    await app.loadGraphData(workflow);
    if (!dialog) {  // the store is made on first use and filled while the frontend checks the model folders
        let store;
        for (let waited = 0; waited < 10000 && !(store = pinia?._s.get('missingModel'))?.missingModelCandidates?.length; waited += 100) {
            await new Promise(resolve => setTimeout(resolve, 100));
        }
        warned.models.push(...(store?.missingModelCandidates ?? []).filter(m => m.isMissing && m.url).map(m => m.name));
    }
    await app.extensionManager.command.execute('Comfy.Canvas.FitView');
    app.canvas.setDirty(true, true);
    const registered = window.LiteGraph.registered_node_types;
    return {
        warned,
        types: app.graph.nodes.map(n => n.type),
        unknown: app.graph.nodes.filter(n => !(n.type in registered)).map(n => n.type),
        prompt: (await app.graphToPrompt()).output,
    };
}"""


@pytest.mark.slow
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem.split(" - ")[0])
def test_frontend_loads_the_workflow_with_every_node_known(path, frontend, object_info, screenshots):
    workflow = load(path)
    before = len(frontend.errors)
    loaded = frontend.evaluate(LOAD, workflow)
    frontend.page.wait_for_timeout(300)  # let the canvas draw before the screenshot
    frontend.page.screenshot(path=str(screenshots / f"{path.stem}.png"))

    assert loaded["warned"]["nodes"] == [] and loaded["unknown"] == []
    assert loaded["types"] == [n["type"] for n in workflow["nodes"]]
    # The only model the test server lacks is the SD1.5 checkpoint, and the frontend knows where
    # to download it from (the Note says which model the workflow expects, too). The toy model
    # ships with the pack.
    assert loaded["warned"]["models"] == ([] if uses_toy_model(workflow) else [CHECKPOINT])
    assert frontend.new_errors(before) == []
    assert frontend.page.locator(".p-dialog:visible, .p-toast-message-error").count() == 0
    # The frontend's own conversion is the prompt the server tests run (before their tiny-model
    # overrides): the UI file is the single source of both.
    ours = to_api(workflow, object_info)
    theirs = {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in loaded["prompt"].items()}
    assert theirs == {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in ours.items()}
    assert len(ours) == len(executed_nodes(workflow))


@pytest.mark.slow
def test_template_browser_lists_and_serves_our_workflows(frontend):
    names = sorted(p.stem for p in WORKFLOWS)
    templates = frontend.evaluate("async () => await app.api.getWorkflowTemplates()")
    assert sorted(templates[PACK_NAME]) == names
    # The template browser fetches a template from /api/workflow_templates/<pack>/<name>.json.
    served = frontend.evaluate(
        """async ([pack, names]) => Promise.all(names.map(async name => {
            const r = await fetch(app.api.apiURL(`/workflow_templates/${pack}/${name}.json`));
            return r.ok ? await r.json() : r.status;
        }))""",
        [PACK_NAME, names],
    )
    assert served == [load(p) for p in sorted(WORKFLOWS, key=lambda p: p.stem)]
    # ...and shows <name>.jpg from the same folder as the template's thumbnail.
    thumbnails = frontend.evaluate(
        """async ([pack, names]) => Promise.all(names.map(async name =>
            (await fetch(app.api.apiURL(`/workflow_templates/${pack}/${name}.jpg`))).headers.get('content-type')))""",
        [PACK_NAME, names],
    )
    assert thumbnails == ["image/jpeg"] * len(names)


def test_every_node_has_a_help_page_titled_with_its_name(object_info):
    ours = {k: v for k, v in object_info.items() if v["python_module"] == f"custom_nodes.{PACK_NAME}"}
    assert sorted(ours) == NODE_IDS
    for node_id, info in ours.items():
        page = (REPO / "web" / "docs" / f"{node_id}.md").read_text(encoding="utf-8")
        assert page.splitlines()[0] == f"# {info['display_name']}", node_id
        assert "## Inputs" in page and "## Outputs" in page, node_id
        declared = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        for name in declared:
            assert f"**{name}**" in page, f"{node_id}: input {name} is not described"
        for name in info["output_name"]:
            assert f"**{name}**" in page, f"{node_id}: output {name} is not described"


@pytest.mark.slow
def test_node_help_opens_from_the_selection_toolbox(frontend):
    # The frontend fetches a custom node's help from /extensions/<pack>/docs/<node id>.md (after
    # trying <node id>/<locale>.md); ComfyUI serves web/ there because __init__.py names it.
    urls = frontend.evaluate(
        """async ([pack, ids]) => Promise.all(ids.map(async id => {
            const r = await fetch(app.api.fileURL(`/extensions/${pack}/docs/${id}.md`));
            return [r.status, (await r.text()).split('\\n')[0]];
        }))""",
        [PACK_NAME, NODE_IDS],
    )
    assert all(status == 200 and first.startswith("# ACE ") for status, first in urls), urls

    frontend.evaluate(LOAD, load(WORKFLOWS[0]))
    frontend.evaluate("""() => {
        const node = app.graph.nodes.find(n => n.type === 'ACEErasure_EraseConcept');
        app.canvas.selectNode(node);
        app.canvas.setDirty(true, true);
    }""")
    frontend.page.locator('[data-testid="info-button"]').click()
    first_line = (REPO / "web" / "docs" / "ACEErasure_EraseConcept.md").read_text().split("\n\n")[1].split("\n")[0]
    frontend.page.get_by_text(first_line).wait_for(timeout=10_000)
    frontend.page.keyboard.press("Escape")
