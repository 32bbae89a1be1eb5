"""Headless Chromium driven over the Chrome DevTools Protocol (CDP), with nothing but the
``websocket-client`` package (a ComfyUI / comfy-cli dependency).

    with Chromium.launch() as browser:
        browser.navigate("http://127.0.0.1:8188/")
        browser.wait_for("!!window.app")
        value = browser.evaluate("1 + 1")
        png = browser.screenshot()

One page per browser. ``evaluate`` awaits promises and returns values by JSON; a script that
throws raises ``JSError`` with the page's own message and stack.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

import websocket

if TYPE_CHECKING:  # typing.Self is Python 3.11+
    from typing_extensions import Self

# Flags for a closed network: without the background-networking ones Chromium's own
# connections (component updates, sync, QUIC probes) are refused and slow everything down.
HEADLESS_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--hide-scrollbars", "--mute-audio")


def find_chromium() -> str | None:
    """$CHROMIUM, else /usr/bin/chromium, else a chromium / chrome on PATH; None if none."""
    candidates = [os.environ.get("CHROMIUM"), "/usr/bin/chromium"]
    candidates += [shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")]
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


class CDPError(RuntimeError):
    pass


class JSError(RuntimeError):
    pass


class Chromium:
    def __init__(self, proc: subprocess.Popen, profile: Path, ws: websocket.WebSocket, log_path: Path):
        self.proc, self.profile, self.ws, self.log_path = proc, profile, ws, log_path
        self._ids = itertools.count(1)
        self.events: list[dict] = []  # CDP events received while waiting for replies

    # -- life cycle -----------------------------------------------------------------------
    @classmethod
    def launch(cls, executable: str | None = None, width: int = 1400, height: int = 900,
               timeout: float = 60.0) -> Chromium:
        executable = executable or find_chromium()
        if executable is None:
            raise FileNotFoundError("no chromium executable found")
        profile = Path(tempfile.mkdtemp(prefix="dmd2-chromium-"))
        log_path = profile / "chromium.log"
        cmd = [executable, *HEADLESS_FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0",
               "--remote-debugging-address=127.0.0.1", f"--window-size={width},{height}", "about:blank"]
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            port = _devtools_port(proc, profile / "DevToolsActivePort", log_path, timeout)
            page = _page_target(port, timeout)
            ws = websocket.create_connection(page["webSocketDebuggerUrl"], timeout=timeout, suppress_origin=True)
        except BaseException:
            _terminate(proc)
            shutil.rmtree(profile, ignore_errors=True)
            raise
        browser = cls(proc, profile, ws, log_path)
        browser.send("Page.enable")
        browser.send("Runtime.enable")
        browser.send("Emulation.setDeviceMetricsOverride",
                     {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": False})
        return browser

    def close(self) -> None:
        try:
            self.ws.close()
        finally:
            _terminate(self.proc)
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- protocol -------------------------------------------------------------------------
    def send(self, method: str, params: dict | None = None, timeout: float = 60.0) -> dict:
        """Send one CDP command to the page and return its result (events are kept in .events)."""
        msg_id = next(self._ids)
        self.ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"CDP {method}: no reply in {timeout}s")
            self.ws.settimeout(left)
            reply = json.loads(self.ws.recv())
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise CDPError(f"CDP {method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self.events.append(reply)

    def evaluate(self, expression: str, timeout: float = 60.0):
        """Evaluate a JS expression in the page (promises awaited); return its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True, "userGesture": True,
                                                "timeout": int(timeout * 1000)}, timeout=timeout + 5)
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            exc = details.get("exception", {})
            raise JSError(exc.get("description") or exc.get("value") or details.get("text") or str(details))
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0, interval: float = 0.2):
        """Poll a JS expression until it is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last_error = None
        while time.monotonic() < deadline:
            try:
                value = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
                if value:
                    return value
            except JSError as e:  # e.g. during navigation, before globals exist
                last_error = e
            time.sleep(interval)
        raise TimeoutError(f"{expression!r} not true in {timeout}s (last error: {last_error}); "
                           f"page errors: {self.page_errors()[-5:]}")

    def navigate(self, url: str, timeout: float = 60.0) -> None:
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise CDPError(f"navigate {url}: {result['errorText']}")
        self.wait_for("document.readyState === 'complete'", timeout=timeout)

    def type_text(self, text: str) -> None:
        """Type into the focused element as the keyboard would (input events, one per text)."""
        self.send("Input.insertText", {"text": text})

    def screenshot(self) -> bytes:
        """PNG of the viewport."""
        return base64.b64decode(self.send("Page.captureScreenshot", {"format": "png"})["data"])

    def page_errors(self) -> list[str]:
        """Uncaught exceptions and console.error messages seen so far."""
        errors = []
        for ev in self.events:
            if ev["method"] == "Runtime.exceptionThrown":
                d = ev["params"]["exceptionDetails"]
                errors.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif ev["method"] == "Runtime.consoleAPICalled" and ev["params"]["type"] == "error":
                errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in ev["params"]["args"]))
        return errors

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _devtools_port(proc: subprocess.Popen, port_file: Path, log_path: Path, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with {proc.returncode}:\n{log_path.read_text(errors='replace')[-3000:]}")
        try:
            lines = port_file.read_text().splitlines()
            if lines and lines[0].strip().isdigit():
                return int(lines[0])
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"chromium wrote no DevToolsActivePort in {timeout}s:\n{log_path.read_text(errors='replace')[-3000:]}")


def _page_target(port: int, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as r:
                pages = [t for t in json.loads(r.read()) if t.get("type") == "page"]
            if pages:
                return pages[0]
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"chromium on port {port} shows no page target")


def _terminate(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
