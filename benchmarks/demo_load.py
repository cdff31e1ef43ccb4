"""
Load on the Spaces demo: N text-to-image searches sent at once through gradio_client, their latency and answers.

    python benchmarks/demo_load.py --url http://127.0.0.1:7860/            # a demo that is already running
    python benchmarks/demo_load.py --start -- --model runs/RUN/student     # start spaces_demo/app.py first

Writes the figures to benchmarks/demo_load.md (or --output).
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_QUERIES = ("a cat", "a cup of coffee", "a rocket", "an astronaut", "a motorcycle")


@dataclass
class LoadReport:
    """Per-request latencies (seconds) and first answers, in request order; failures as messages."""

    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0

    def summary(self) -> dict:
        ordered = sorted(self.latencies_s)
        return {
            "requests": len(self.latencies_s) + len(self.errors),
            "concurrency": self.concurrency,
            "answered": len(self.latencies_s),
            "errors": len(self.errors),
            "median_s": statistics.median(ordered) if ordered else None,
            "p90_s": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))] if ordered else None,
            "max_s": ordered[-1] if ordered else None,
            "wall_s": self.wall_s,
        }


def concurrent_searches(url: str, queries: list[str], concurrency: int = 20, top_k: int = 3) -> LoadReport:
    """Send `queries` to the demo's `/search` endpoint, `concurrency` at a time, all released together."""
    from gradio_client import Client

    client = Client(url, verbose=False)
    start_together = threading.Barrier(min(concurrency, len(queries)))
    report = LoadReport(concurrency=concurrency)
    results: list[tuple[float, str] | Exception] = [None] * len(queries)

    def search(index: int) -> None:
        if index < concurrency:
            start_together.wait()
        started = time.perf_counter()
        try:
            _, table, status = client.predict(queries[index], top_k, api_name="/search")
            if not table["data"]:
                raise RuntimeError(f"no result: {status}")
            results[index] = (time.perf_counter() - started, table["data"][0][1])
        except Exception as error:  # every failure is reported, none stops the others
            results[index] = error

    wall_start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        list(pool.map(search, range(len(queries))))
    report.wall_s = time.perf_counter() - wall_start
    for index, result in enumerate(results):
        if isinstance(result, Exception):
            report.errors.append(f"request {index} ({queries[index]!r}): {type(result).__name__}: {result}")
        else:
            report.latencies_s.append(result[0])
            report.answers.append(result[1])
    return report


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_demo(app_arguments: list[str], timeout_s: float = 300) -> tuple[subprocess.Popen, str]:
    """Start spaces_demo/app.py on a free localhost port and wait until it answers."""
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, str(REPO / "spaces_demo" / "app.py"), *app_arguments, "--port", str(port)]
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout_s
    while True:
        if server.poll() is not None:
            raise RuntimeError(f"the demo exited with code {server.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return server, url
        except OSError as error:
            if time.monotonic() > deadline:
                server.terminate()
                raise TimeoutError(f"the demo did not answer within {timeout_s} s") from error
            time.sleep(0.5)


def write_markdown(
    path: Path, report: LoadReport, alone: LoadReport, command: str, queries: list[str], note: str | None
) -> None:
    summary = report.summary()
    lines = [
        "# Spaces demo under load",
        "",
        f"`{command}`",
        "",
        f"{summary['requests']} text-to-image searches (`/search`, top 3) sent at once from {report.concurrency} "
        "threads through one gradio_client, on the same machine as the demo (loopback). The demo's queue runs "
        "2 searches at a time (`default_concurrency_limit=2`), so the latency includes queueing.",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPU cores, Python {platform.python_version()}, "
        f"load average before the run {os.getloadavg()[0]:.2f}.",
        f"Queries: {', '.join(sorted(set(queries)))}.",
        "",
        "| requests | answered | errors | median latency (s) | p90 (s) | max (s) | wall (s) |",
        "|---|---|---|---|---|---|---|",
        f"| {summary['requests']} | {summary['answered']} | {summary['errors']} | {summary['median_s']:.3f} | "
        f"{summary['p90_s']:.3f} | {summary['max_s']:.3f} | {summary['wall_s']:.3f} |",
        "",
        f"For comparison, one search at a time ({len(alone.latencies_s)} in a row): median "
        f"{alone.summary()['median_s']:.3f} s.",
        "",
    ]
    if note:
        lines += [note, ""]
    if report.errors:
        lines += ["Errors:", ""] + [f"- {error}" for error in report.errors] + [""]
    path.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--url", help="a running demo")
    parser.add_argument("--start", action="store_true", help="start spaces_demo/app.py with the arguments after --")
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "demo_load.md")
    parser.add_argument("--note", help="a line added to the report (what model, what else ran on the machine)")
    parser.add_argument("app_arguments", nargs="*", help="arguments of spaces_demo/app.py (with --start)")
    args = parser.parse_args(argv)
    if bool(args.url) == bool(args.start):
        parser.error("give exactly one of --url and --start")
    server = None
    if args.start:
        server, url = start_demo(args.app_arguments)
    else:
        url = args.url
    try:
        queries = [DEFAULT_QUERIES[index % len(DEFAULT_QUERIES)] for index in range(args.requests)]
        # One at a time first: the service time without queueing (the first also warms the server up).
        alone = LoadReport(concurrency=1)
        for query in queries[:6]:
            single = concurrent_searches(url, [query], concurrency=1)
            alone.latencies_s += single.latencies_s
            alone.errors += single.errors
        if alone.errors:
            print("\n".join(alone.errors), file=sys.stderr)
            return 1
        alone.latencies_s = alone.latencies_s[1:]
        report = concurrent_searches(url, queries, concurrency=args.concurrency)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    source = "--start -- " + " ".join(args.app_arguments) if args.start else f"--url {args.url}"
    command = f"python benchmarks/demo_load.py --requests {args.requests} --concurrency {args.concurrency} {source}"
    write_markdown(args.output, report, alone, command, queries, args.note)
    print(args.output.read_text())
    return 0 if not report.errors else 1


if __name__ == "__main__":
    sys.exit(main())
