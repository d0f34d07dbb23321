"""A real headless Chromium for UI tests, driven through chromedriver's W3C WebDriver HTTP API with
`requests` (no extra Python package). Debian's `chromium` + `chromium-driver` (.ci/run installs them).
Flags: as the machine notes say works here (no sandbox as root, no background networking)."""
from __future__ import annotations

import base64
import shutil
import subprocess
import time
from pathlib import Path

import requests

from services import free_port

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1600,1000"]


def available() -> bool:
    return Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()


class Browser:
    """One chromedriver process and one browser session; use as a context manager."""

    def __init__(self, user_data_dir: Path):
        self.port = free_port()
        self.user_data_dir = user_data_dir
        self.proc = None
        self.session = None

    def __enter__(self):
        self.proc = subprocess.Popen([CHROMEDRIVER, f"--port={self.port}"], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                if requests.get(f"{self.base}/status", timeout=2).json()["value"]["ready"]:
                    break
            except (requests.RequestException, ValueError, KeyError):
                pass
            if time.monotonic() > deadline:
                raise TimeoutError("chromedriver did not start")
            time.sleep(0.2)
        caps = {"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": CHROMIUM, "args": [*FLAGS, f"--user-data-dir={self.user_data_dir}"]}}}}
        r = requests.post(f"{self.base}/session", json=caps, timeout=120)
        r.raise_for_status()
        self.session = f"{self.base}/session/{r.json()['value']['sessionId']}"
        return self

    def __exit__(self, *exc):
        try:
            if self.session:
                requests.delete(self.session, timeout=30)
        finally:
            if self.proc is not None:
                self.proc.terminate()
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()

    def _post(self, path: str, body: dict, timeout: float = 120):
        r = requests.post(f"{self.session}/{path}", json=body, timeout=timeout)
        r.raise_for_status()
        return r.json()["value"]

    def open(self, url: str) -> None:
        self._post("url", {"url": url})

    def script(self, js: str, *args):
        return self._post("execute/sync", {"script": js, "args": list(args)})

    def text(self) -> str:
        return self.script("return document.body ? document.body.innerText : '';")

    def url(self) -> str:
        return requests.get(f"{self.session}/url", timeout=30).json()["value"]

    def wait_for_text(self, needles: list[str], timeout: float = 120) -> str:
        deadline = time.monotonic() + timeout
        text = ""
        while time.monotonic() < deadline:
            text = self.text()
            if all(n in text for n in needles):
                return text
            time.sleep(0.5)
        missing = [n for n in needles if n not in text]
        raise AssertionError(f"not on the page after {timeout:.0f} s: {missing}\n--- page text ---\n{text[:3000]}")

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        r = requests.get(f"{self.session}/screenshot", timeout=60)
        r.raise_for_status()
        path.write_bytes(base64.b64decode(r.json()["value"]))
        return path
