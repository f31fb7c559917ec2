"""Measure `emf serve`: keystroke -> 1-step image latency in a headless Chromium, and a load test on 127.0.0.1.

    python tools/serve_bench.py --ckpt runs/demo/runs/minilm_shapes/version_0/checkpoints/last.ckpt \\
        --clients 8 --duration 30 --typed-prompts 40 --out runs/serve_bench.json

It starts `emf serve --ckpt ... --port 0` as a child process (the same niceness and thread settings as this
one), then:
  1. browser: types each prompt into the page (Selenium, the system's /usr/bin/chromium and chromedriver; nothing
     is downloaded) and reads the page's own record of the time from the last keystroke to the 1-step image drawn;
  2. sequential: one client, one 1-step request after the other, for --duration seconds;
  3. concurrent: --clients clients at once for --duration seconds (each a keep-alive connection; a new request
     as soon as its last one is answered).
It prints a Markdown table and writes every number as JSON. --no-browser skips step 1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import random
import re
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "cyan"]
SHAPES = ["circle", "square", "triangle"]
SIZES = ["small", "large"]
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def prompts(n: int, seed: int = 0) -> list[str]:
    """Shapes-world prompts in the training grammar's style, e.g. "a large red circle"."""
    rng = random.Random(seed)
    return [f"a {rng.choice(SIZES)} {rng.choice(COLOURS)} {rng.choice(SHAPES)}" for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]); NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


# --------------------------------------------------------------------------------------------------- server


class ServerProcess:
    """`emf serve` in a child process on a free port; ``url`` once it is listening."""

    def __init__(self, args: list[str], timeout_s: float = 600.0):
        emf = Path(sys.executable).with_name("emf")
        command = [str(emf)] if emf.exists() else [sys.executable, "-m", "emf_lightning.cli"]
        self.process = subprocess.Popen(
            [*command, "serve", "--port", "0", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.output: list[str] = []
        deadline = time.monotonic() + timeout_s
        self.url = ""
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            self.output.append(line)
            found = re.search(r"serving (http://\S+)", line)
            if found:
                self.url = found.group(1)
                break
        if not self.url:
            self.stop()
            raise RuntimeError("emf serve did not start:\n" + "".join(self.output[-30:]))
        # Keep reading so that a full pipe never blocks the server.
        threading.Thread(target=lambda: [self.output.append(x) for x in self.process.stdout], daemon=True).start()

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its finished children (Linux /proc); NaN elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------------------------- load test


@dataclass
class LoadResult:
    clients: int
    duration_s: float
    ok: int = 0
    busy: int = 0
    failed: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    batch_sizes: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    server_cpu_s: float = float("nan")  # CPU time the server process used in this phase (when known)

    @property
    def images_per_s(self) -> float:
        return self.ok / self.duration_s

    def summary(self) -> dict:
        return {
            "clients": self.clients,
            "duration_s": round(self.duration_s, 2),
            "ok": self.ok,
            "busy": self.busy,
            "failed": self.failed,
            "p50_ms": round(percentile(self.latencies_ms, 50), 1),
            "p95_ms": round(percentile(self.latencies_ms, 95), 1),
            "images_per_s": round(self.images_per_s, 2),
            "mean_batch": round(sum(self.batch_sizes) / max(1, len(self.batch_sizes)), 2),
            # Load-independent: what an image costs the server, and so the rate one idle core would reach.
            "server_cpu_ms_per_image": round(1e3 * self.server_cpu_s / max(1, self.ok), 2),
            "errors": self.errors[:5],
        }


def post_image(conn: http.client.HTTPConnection, payload: dict) -> tuple[int, dict]:
    conn.request("POST", "/api/image", body=json.dumps(payload), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


def load_test(
    url: str, clients: int, duration_s: float, steps: int = 1, seed: int = 0, server_pid: int | None = None
) -> LoadResult:
    """``clients`` threads, each sending 1-step requests back to back for ``duration_s`` seconds."""
    parsed = urlparse(url)
    result = LoadResult(clients=clients, duration_s=duration_s)
    lock = threading.Lock()
    words = prompts(64, seed)
    start = time.perf_counter()
    stop_at = start + duration_s

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
        while time.perf_counter() < stop_at:
            payload = {"prompt": rng.choice(words), "steps": steps, "seed": rng.randrange(1 << 16), "cfg": 1.0}
            sent = time.perf_counter()
            try:
                status, answer = post_image(conn, payload)
            except (OSError, http.client.HTTPException, json.JSONDecodeError) as err:
                status, answer = -1, {"error": f"{type(err).__name__}: {err}"}
                conn.close()
                conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=120)
            elapsed = (time.perf_counter() - sent) * 1e3
            with lock:
                if status == 200:
                    result.ok += 1
                    result.latencies_ms.append(elapsed)
                    result.batch_sizes.append(answer["batch_size"])
                elif status == 503:
                    result.busy += 1
                else:
                    result.failed += 1
                    result.errors.append(f"{status}: {answer.get('error')}")
        conn.close()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    cpu_before = cpu_seconds(server_pid) if server_pid else float("nan")
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.duration_s = time.perf_counter() - start  # the last answers arrive after stop_at
    if server_pid:
        result.server_cpu_s = cpu_seconds(server_pid) - cpu_before
    return result


# ------------------------------------------------------------------------------------------------- browser


def chromium_driver(width: int = 1100, height: int = 900):
    """Headless Chromium from the system packages, driven by Selenium through the system's chromedriver."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"):
        options.add_argument(flag)
    options.add_argument(f"--window-size={width},{height}")
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def wait_for(driver, script: str, timeout_s: float = 60.0, *args):
    """Poll a JavaScript expression until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = driver.execute_script(script, *args)
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"the page did not reach: {script}")


SHOWN = """
const [prompt, model, steps] = arguments;
return window.emfLatencies.find((r) => r.prompt === prompt && r.model === model && r.steps === steps) || null;
"""


ALL_SHOWN = "return [...document.querySelectorAll('figure')].every((f) => f.dataset.prompt === arguments[0])"


def type_prompt(driver, prompt: str, timeout_s: float = 60.0, model: str = "A", steps: int = 1) -> dict:
    """Replace the prompt box's text by ``prompt`` (typed key by key) and wait for that prompt's image;
    returns the page's record of it (``ms``: last keystroke to image drawn)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    box = driver.find_element(By.ID, "prompt")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.DELETE)
    driver.execute_script("window.emfLatencies.length = 0")
    box.send_keys(prompt)
    return wait_for(driver, SHOWN, timeout_s, prompt, model, steps)


def keystroke_latency(url: str, typed: list[str], timeout_s: float = 60.0) -> list[dict]:
    """Type each prompt into the page; the page's record of each prompt's 1-step image."""
    driver = chromium_driver()
    try:
        driver.get(url)
        wait_for(driver, "return document.querySelectorAll('figure').length > 0", timeout_s)
        type_prompt(driver, "warm up the page", timeout_s)  # the first draw pays for the browser's own start-up
        records = []
        for prompt in typed:
            records.append(type_prompt(driver, prompt, timeout_s))
            # Let the 2- and 4-step images of this prompt finish, as a user reading the result would.
            wait_for(driver, ALL_SHOWN, timeout_s, prompt)
        return records
    finally:
        driver.quit()


def screenshot(url: str, path: str, prompt: str = "a large red circle", timeout_s: float = 120.0) -> None:
    """The page after typing ``prompt`` and every image drawn, as a PNG (the README's picture)."""
    driver = chromium_driver(width=1000, height=620)
    try:
        driver.get(url)
        wait_for(driver, "return document.querySelectorAll('figure').length > 0", timeout_s)
        type_prompt(driver, prompt, timeout_s)
        wait_for(driver, ALL_SHOWN, timeout_s, prompt)
        time.sleep(0.3)  # let the last caption's text settle
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    finally:
        driver.quit()


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="checkpoint to serve")
    p.add_argument("--export", help="export folder to serve (instead of --ckpt)")
    p.add_argument("--url", help="measure a server that is already running instead of starting one")
    p.add_argument("--server-pid", type=int, default=None, help="with --url: the server's process id, for its CPU time")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--duration", type=float, default=30.0, help="seconds of each load phase")
    p.add_argument("--typed-prompts", type=int, default=40, help="prompts typed in the browser (0: no browser)")
    p.add_argument("--no-browser", action="store_true")
    p.add_argument("--serve-args", default="", help="extra `emf serve` arguments, e.g. '--threads 1'")
    p.add_argument("--out", default=None, help="JSON file for every number")
    p.add_argument("--screenshot", default=None, help="also save a PNG of the page here")
    args = p.parse_args(argv)
    if not (args.url or args.ckpt or args.export):
        p.error("give --ckpt, --export or --url")

    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "argv": sys.argv, "nice": os.nice(0)}
    server = None
    if not args.url:
        flag = ["--ckpt", args.ckpt] if args.ckpt else ["--export", args.export]
        server = ServerProcess([*flag, *args.serve_args.split()])
    url = args.url or server.url
    try:
        if args.screenshot:
            screenshot(url, args.screenshot)
        if args.typed_prompts and not args.no_browser:
            records = keystroke_latency(url, prompts(args.typed_prompts, seed=1))
            ms = [r["ms"] for r in records]
            report["keystroke_to_1step_image"] = {
                "n": len(ms),
                "p50_ms": round(percentile(ms, 50), 1),
                "p95_ms": round(percentile(ms, 95), 1),
                "compute_p50_ms": round(percentile([r["compute_ms"] for r in records], 50), 1),
                "round_trip_p50_ms": round(percentile([r["round_trip_ms"] for r in records], 50), 1),
                "records": records,
            }
        pid = server.process.pid if server is not None else args.server_pid
        sequential = load_test(url, 1, args.duration, server_pid=pid)
        concurrent = load_test(url, args.clients, args.duration, server_pid=pid)
        report["sequential"] = sequential.summary()
        report["concurrent"] = concurrent.summary()
        report["batching_gain"] = round(concurrent.images_per_s / max(sequential.images_per_s, 1e-9), 2)
        if pid:
            per_image = [r.server_cpu_s / max(1, r.ok) for r in (sequential, concurrent)]
            report["batching_gain_server_cpu"] = round(per_image[0] / max(per_image[1], 1e-9), 2)
    finally:
        if server is not None:
            server.stop()
    print(markdown(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


def markdown(report: dict) -> str:
    lines = [
        "| measure | p50 ms | p95 ms | images/s | ok / busy / failed | mean batch | server CPU ms per image |",
        "|---|---|---|---|---|---|---|",
    ]
    key = report.get("keystroke_to_1step_image")
    if key:
        lines.append(
            f"| keystroke -> 1-step image (browser, n={key['n']}) | {key['p50_ms']} | {key['p95_ms']} | | | | |"
        )
    for name in ("sequential", "concurrent"):
        r = report.get(name)
        if r:
            lines.append(
                f"| {name}, {r['clients']} client(s), {r['duration_s']} s | {r['p50_ms']} | {r['p95_ms']} | "
                f"{r['images_per_s']} | {r['ok']} / {r['busy']} / {r['failed']} | {r['mean_batch']} | "
                f"{r['server_cpu_ms_per_image']} |"
            )
    if "batching_gain" in report:
        lines.append(f"\nthroughput, concurrent / sequential: {report['batching_gain']}x")
    if "batching_gain_server_cpu" in report:
        lines.append(f"server CPU per image, sequential / concurrent: {report['batching_gain_server_cpu']}x")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
