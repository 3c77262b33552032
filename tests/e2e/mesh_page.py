#!/usr/bin/env python3
"""Drives headless Chromium over the DevTools protocol to check the mesh page.

Standard library only: Chromium speaks the protocol on a pipe
(`--remote-debugging-pipe`: it reads commands on fd 3 and writes on fd 4,
each message JSON ending in a NUL byte), so no websocket client is needed.

    mesh_page.py URL --model NAME --ids ID,ID,... [--key KEY] [--follow] [--screenshot PNG]

Opens URL, waits until the page shows exactly the model and instance ids
given, and prints `shown`. With --follow it then reads lines from stdin,
`expect ID,ID,...` (the ids the page should now show, after a worker left
or joined), waits for each, and prints `changed after N.N s`, until `done`.
With --key, the page must first ask for an API key (its JSON answers 401),
which is typed into its form. With --screenshot it writes a PNG of the
whole page. Fails (exit 1, the reason on stdout) on a timeout, or if the
page logged any console error or threw. Every wait has a deadline.
"""

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time

# How long the page may take to show what is expected (first load, or a
# worker leaving: discovery notices within a lease, the page polls each second).
SHOW_DEADLINE = 15.0
CHANGE_DEADLINE = 8.0
# Longest wait for one answer from Chromium.
COMMAND_DEADLINE = 10.0

# What the page shows, read from its DOM (the test's view, not the JSON's).
READ_PAGE = """JSON.stringify({
  ids: [...document.querySelectorAll('[data-instance]')].map(e => e.dataset.instance).sort(),
  models: [...document.querySelectorAll('[data-model]')].map(e => e.dataset.model),
  status: (document.getElementById('status') || {}).textContent || ''
})"""


class Browser:
    """One headless Chromium and one page in it, driven over the pipe."""

    def __init__(self, binary, width=1280, height=900, expected_401=False):
        to_chrome_r, self.to_chrome = os.pipe()
        self.from_chrome, from_chrome_w = os.pipe()
        # The child's ends go to fds 3 and 4; copied above 10 first so the
        # dup2 calls below cannot overwrite one with the other.
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 11)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 11)
        for fd in (to_chrome_r, from_chrome_w):
            os.close(fd)

        def in_child():
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.profile = tempfile.mkdtemp(prefix="switchyard-chromium-")
        self.process = subprocess.Popen(
            [
                binary,
                "--headless=new",
                "--remote-debugging-pipe",
                "--no-sandbox",  # root in containers and CI; only loopback pages are opened
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--user-data-dir=" + self.profile,
                f"--window-size={width},{height}",
                "about:blank",
            ],
            pass_fds=(3, 4),
            preexec_fn=in_child,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(child_r)
        os.close(child_w)
        self.buffer = b""
        self.next_id = 0
        self.session = None
        self.problems = []  # console errors and exceptions, as text
        # With a key to give, the page's first polls are refused: Chromium
        # logs each refused load as an error, which is expected then.
        self.expected_401 = expected_401
        targets = self.call("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        self.call("Page.enable")
        self.call("Runtime.enable")
        self.call("Log.enable")

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except Exception:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)
        shutil.rmtree(self.profile, ignore_errors=True)

    def call(self, method, session=True, **params):
        """Sends one command and returns its result, noting events meanwhile."""
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session and self.session:
            message["sessionId"] = self.session
        os.write(self.to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + COMMAND_DEADLINE
        while True:
            reply = self._read(deadline)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self._note(reply)

    def _read(self, deadline):
        while b"\0" not in self.buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.from_chrome], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_chrome, 1 << 16)
            if not chunk:
                raise RuntimeError("Chromium closed the pipe (did it start?)")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def _note(self, event):
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.problems.append("console." + params["type"] + ": " + args)
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.problems.append("exception: " + text)
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
            entry = params["entry"]
            refused = "status of 401" in entry.get("text", "") and "/api/mesh" in entry.get("url", "")
            if refused and self.expected_401:
                return
            self.problems.append(f"log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}")

    def page(self):
        """What the page shows now: its instance ids, models and status."""
        result = self.call("Runtime.evaluate", expression=READ_PAGE, returnByValue=True)
        return json.loads(result["result"]["value"])

    def wait_for(self, what, check, deadline):
        end = time.monotonic() + deadline
        while True:
            shown = self.page()
            if check(shown):
                return shown
            if time.monotonic() > end:
                fail(f"timed out after {deadline} s waiting for {what}; the page shows {shown}")
            time.sleep(0.1)

    def screenshot(self, path):
        size = self.call("Page.getLayoutMetrics")["cssContentSize"]
        shot = self.call(
            "Page.captureScreenshot",
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        )
        with open(path, "wb") as out:
            out.write(base64.b64decode(shot["data"]))


def fail(reason):
    print("FAIL: " + reason, flush=True)
    sys.exit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("--model", required=True)
    parser.add_argument("--ids", required=True, help="comma-separated instance ids, hex")
    parser.add_argument("--key", help="the API key to type into the page when it asks")
    parser.add_argument("--follow", action="store_true")
    parser.add_argument("--screenshot")
    parser.add_argument("--settle", type=float, default=0.0, help="seconds to wait before the screenshot")
    args = parser.parse_args()
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if not binary:
        fail("chromium is not installed (Debian package `chromium`; `make test-deps` installs it)")
    ids = sorted(args.ids.split(","))
    browser = Browser(binary, expected_401=bool(args.key))
    try:
        browser.call("Page.navigate", url=args.url)
        if args.key:
            # Null until the page has loaded: asked again until then.
            asks = "(f => !!f && !f.hidden)(document.getElementById('key-form'))"
            end = time.monotonic() + SHOW_DEADLINE
            while not browser.call("Runtime.evaluate", expression=asks, returnByValue=True)["result"]["value"]:
                if time.monotonic() > end:
                    fail("the page never asked for the API key")
                time.sleep(0.1)
            type_key = (
                f"document.getElementById('key').value = {json.dumps(args.key)};"
                "document.getElementById('key-form').requestSubmit()"
            )
            browser.call("Runtime.evaluate", expression=type_key)
            print("key given", flush=True)
        browser.wait_for(
            f"model {args.model} with instances {ids}",
            lambda shown: shown["ids"] == ids and args.model in shown["models"],
            SHOW_DEADLINE,
        )
        print("shown", flush=True)
        while args.follow:
            line = sys.stdin.readline().split()
            if line == ["done"]:
                break
            if len(line) != 2 or line[0] != "expect":
                fail(f"expected `expect ID,ID,...` or `done` on stdin, got {line}")
            now = sorted(line[1].split(","))
            started = time.monotonic()
            browser.wait_for(f"the page to show instances {now}", lambda shown: shown["ids"] == now, CHANGE_DEADLINE)
            print(f"changed after {time.monotonic() - started:.1f} s", flush=True)
        if args.screenshot:
            time.sleep(args.settle)
            browser.page()  # collects any event logged meanwhile
            browser.screenshot(args.screenshot)
            print("screenshot " + args.screenshot, flush=True)
        browser.page()
        if browser.problems:
            fail("the page logged errors:\n  " + "\n  ".join(browser.problems))
        print("mesh page checks passed", flush=True)
    finally:
        browser.close()


if __name__ == "__main__":
    main()
