"""Open a page in headless Chromium over the DevTools protocol: console errors, images, a screenshot."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def _devtools_port(profile: Path, proc: subprocess.Popen, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    port_file = profile / "DevToolsActivePort"
    while time.monotonic() < deadline:
        if port_file.is_file() and port_file.read_text().strip():
            return int(port_file.read_text().split()[0])
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}")
        time.sleep(0.2)
    raise TimeoutError("chromium did not open its DevTools port")


def render_page(browser: str, page: Path, screenshot: Path, *, timeout: float = 60.0) -> dict:
    """Load ``page`` and return ``{"errors": [...], "images": [{src, complete, width}], "title": str}``;
    write a full-page PNG screenshot to ``screenshot``."""
    import websocket  # websocket-client

    import tempfile

    profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=screenshot.parent))  # fresh: no stale port file
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}", "--window-size=1280,1600",
                             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "HOME": str(profile)})
    try:
        port = _devtools_port(profile, proc, timeout)
        targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10).read())
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page")
        ws = websocket.create_connection(ws_url, timeout=timeout, suppress_origin=True)
        ids = iter(range(1, 10_000))
        errors: list[str] = []
        loaded = False

        def call(method: str, **params) -> dict:
            nonlocal loaded
            key = next(ids)
            ws.send(json.dumps({"id": key, "method": method, "params": params}))
            while True:
                message = json.loads(ws.recv())
                if message.get("id") == key:
                    return message.get("result", {})
                event, p = message.get("method"), message.get("params", {})
                if event == "Runtime.exceptionThrown":
                    errors.append(p["exceptionDetails"].get("text", "exception"))
                elif event == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
                    errors.append(" ".join(str(a.get("value", a.get("description"))) for a in p.get("args", [])))
                elif event == "Log.entryAdded" and p["entry"].get("level") == "error":
                    errors.append(f"{p['entry'].get('text')} {p['entry'].get('url', '')}")
                elif event == "Page.loadEventFired":
                    loaded = True

        for domain in ("Page", "Runtime", "Log"):
            call(f"{domain}.enable")
        call("Page.navigate", url=page.resolve().as_uri())
        deadline = time.monotonic() + timeout
        while not loaded and time.monotonic() < deadline:
            call("Runtime.evaluate", expression="1")
            time.sleep(0.1)
        images = call("Runtime.evaluate", returnByValue=True, expression=(
            "Array.from(document.images).map(i => ({src: i.getAttribute('src'), complete: i.complete, "
            "width: i.naturalWidth}))"))["result"]["value"]
        title = call("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
        shot = call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        screenshot.write_bytes(base64.b64decode(shot["data"]))
        ws.close()
        return {"errors": errors, "images": images, "title": title, "loaded": loaded}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
