# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""REST serving, side by side in one run: this ``uas serve`` against the eager server of an earlier commit.

For each model (full architecture, random weights seeded alike, which is enough for timing and memory) the script
registers a version in two temporary sqlite MLflow stores, one with this checkout's code (exported ONNX graph,
micro-batched forwards, bounded requests) and one with the code of ``--baseline`` (default ``c9116be``: eager
PyTorch behind MLflow's scoring server), extracted with ``git archive`` into a temporary folder. It starts
``uas serve`` from each and measures, one server at a time:

* **1 client**: ``--requests`` requests one after another (one 256x256 PNG each, ``map_format`` ``png``): p50, p95;
* **8 clients**: ``--requests`` requests from each of 8 threads at once: throughput and p95;
* **peak memory**: the server's peak resident memory (``VmHWM``) after 8 concurrent requests of one 40-megapixel
  PNG each (a smooth 8000x5000 image, about 0.2 MB), with how many of them were answered 200;
* **equality**: the largest difference of the served scores between the two servers on the same image.

Goals (issue 13): throughput at 8 clients at least 2x the baseline's; peak memory at most 2.5 GB for MetaUAS.
The Markdown report is printed and written to ``benchmarks/results/serving_latency.md``.

Run it from the repository root (a git checkout):

    python benchmarks/serving_latency.py                      # MetaUAS b4 at 256 px, ~10 min
    python benchmarks/serving_latency.py --models metauas inctrl --requests 20
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "benchmarks" / "results" / "serving_latency.md"
CLIENTS = 8
THROUGHPUT_GOAL = 2.0
MEMORY_GOAL_GB = 2.5
SETTINGS = {
    "metauas": "official b4 architecture, 256 px, one registered prompt",
    "inctrl": "ViT-B-16-plus-240, k = 2 registered prompts",
    "faprompt": "ViT-L-14-336 at 518 px",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["metauas"], choices=list(SETTINGS))
    parser.add_argument("--baseline", default="c9116be", help="git commit of the eager server (%(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="torch / ONNX Runtime threads of the servers")
    parser.add_argument("--requests", type=int, default=25, help="requests per client")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--register", nargs=2, metavar=("MODEL", "FOLDER"), help=argparse.SUPPRESS)
    return parser.parse_args()


def png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def write_files(model: str, folder: Path) -> tuple[Path, Path | None, dict[str, Any], list[Path]]:
    """Seeded random-weight checkpoints of the full architecture in the official formats, and prompt images."""
    import torch

    from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
    from anomalib_uas.models.inctrl.checkpoint import to_official as inctrl_official
    from anomalib_uas.models.metauas.checkpoint import to_official as metauas_official

    torch.manual_seed(0)
    generator = np.random.default_rng(0)
    prompts = []
    for index in range(2):
        prompts.append(folder / f"prompt{index}.png")
        prompts[-1].write_bytes(png(generator.integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    if model == "metauas":
        module = MetaUAS(backbone="tf_efficientnet_b4", pretrained_backbone=False, image_size=256)
        torch.save(metauas_official(module.model), folder / "metauas.pth")
        kwargs = {"image_size": 256, "backbone": "tf_efficientnet_b4", "k_shot": 1, "prompt_strategy": "random"}
        return folder / "metauas.pth", None, kwargs, prompts[:1]
    if model == "inctrl":
        module = InCTRL(clip_pretrained=None, visualizer=False)
        torch.save(inctrl_official(module.model, include_clip=False), folder / "inctrl.pth")
        torch.save(module.model.clip.state_dict(), folder / "clip.pt")
        return folder / "inctrl.pth", folder / "clip.pt", {"clip_model": "ViT-B-16-plus-240", "k_shot": 2}, prompts
    module = FAPrompt(clip_pretrained=None, visualizer=False)
    module.save_official_checkpoint(folder / "faprompt.pth")
    torch.save(module.model.clip.state_dict(), folder / "clip.pt")
    return folder / "faprompt.pth", folder / "clip.pt", {"clip_model": "ViT-L-14-336", "image_size": 518}, []


def register(model: str, folder: Path) -> None:
    """Register ``model`` in ``folder/mlflow.db`` with the code on ``PYTHONPATH`` (run in a subprocess)."""
    from anomalib_uas import registry, tracking
    from anomalib_uas.calibration import decide

    os.chdir(folder)
    checkpoint, clip, kwargs, prompts = write_files(model, folder)
    one_normal = {"group": ["held_out_normal"], "pred_score": [0.5], "map_max": [0.5], "map_min": [0.0]}
    decision = decide({key: np.asarray(value) for key, value in one_normal.items()}, 0.05, 0.95)
    config = {"model": model, "category": "bottle", "kwargs": kwargs, **decision}
    servable = registry.ServableModel(
        model=model,
        category="bottle",
        checkpoint=checkpoint,
        clip_weights=clip,
        prompt_paths=prompts,
        config=config,
        example_image=prompts[0],
    )
    with tracking.stage_run("benchmark", model, {}):
        registry.register_model(servable, {"pixel_AUPRO": 1.0}, "pixel_AUPRO")


def environment(code: Path, store: Path, threads: int) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(code),
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "OMP_NUM_THREADS": str(threads),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, env: dict[str, str], port: int) -> subprocess.Popen:
    uas = shutil.which("uas", path=env["PATH"])
    command = [uas, "serve", "bottle", "--model", model, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                return process
        except OSError:
            if process.poll() is not None:
                msg = f"uas serve exited with {process.returncode}"
                raise RuntimeError(msg) from None
            time.sleep(1)
    process.kill()
    msg = "uas serve did not answer within 900 s"
    raise RuntimeError(msg)


def post(port: int, body: bytes) -> tuple[int, float, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, {}
    return status, time.perf_counter() - started, answer


def peak_memory_gb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return float("nan")


def body_of(image: bytes) -> bytes:
    data = [[base64.b64encode(image).decode()]]
    return json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode()


def measure(port: int, pid: int, small: bytes, large: bytes, requests: int) -> dict[str, Any]:
    status, _, answer = post(port, small)  # warm-up
    if status != 200:
        msg = f"warm-up request got HTTP {status}"
        raise RuntimeError(msg)
    score = answer["predictions"][0]["pred_score"]
    sequential = [post(port, small) for _ in range(requests)]
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        concurrent = list(pool.map(lambda _: post(port, small), range(CLIENTS * requests)))
    elapsed = time.perf_counter() - started
    idle_memory = peak_memory_gb(pid)
    with ThreadPoolExecutor(max_workers=CLIENTS) as pool:
        burst = list(pool.map(lambda _: post(port, large), range(CLIENTS)))
    return {
        "score": score,
        "p50_1": float(np.percentile([s for _, s, _ in sequential], 50)),
        "p95_1": float(np.percentile([s for _, s, _ in sequential], 95)),
        "p95_8": float(np.percentile([s for _, s, _ in concurrent], 95)),
        "throughput": len(concurrent) / elapsed,
        "errors": sum(status != 200 for status, _, _ in sequential + concurrent),
        "memory_before": idle_memory,
        "memory": peak_memory_gb(pid),
        "large_ok": sum(status == 200 for status, _, _ in burst),
        "large_seconds": max(seconds for _, seconds, _ in burst),
    }


def main() -> None:
    args = parse_args()
    if args.register:
        register(args.register[0], Path(args.register[1]))
        return
    small = body_of(png(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)))
    ramp = np.linspace(0, 255, 8000, dtype=np.float32).astype(np.uint8)
    large = body_of(png(np.dstack([np.broadcast_to(ramp, (5000, 8000))] * 3)))  # 40 MP, smooth
    results = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        baseline = root / "baseline"
        baseline.mkdir()
        archive = subprocess.run(
            ["git", "-C", str(REPO), "archive", args.baseline, "anomalib_uas"], check=True, capture_output=True
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive, check=True)
        servers = {"baseline": baseline, "current": REPO}
        for model in args.models:
            row = {"model": model}
            for name, code in servers.items():
                store = root / f"{model}-{name}"
                store.mkdir()
                env = environment(code, store, args.threads)
                script = [sys.executable, str(Path(__file__).resolve()), "--register", model, str(store)]
                subprocess.run(script, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                port = free_port()
                server = start_server(model, env, port)
                try:
                    row[name] = measure(port, server.pid, small, large, args.requests)
                finally:
                    server.terminate()
                    server.wait(timeout=60)
                print(model, name, row[name], flush=True)
            results.append(row)
    report = render(results, args)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


def _goal(met: bool, text: str) -> str:
    return f"{text} ({'met' if met else 'not met'})"


def render(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [
        f"# REST serving: this `uas serve` against the eager server of {args.baseline}",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, {args.threads} threads per server, load average {load[0]:.2f} at the end. "
        f"One 256x256 PNG per request (map_format png); {args.requests} requests at 1 client, "
        f"{CLIENTS} x {args.requests} at {CLIENTS} clients. Peak memory: VmHWM of the server after {CLIENTS} "
        "concurrent requests of one 40 MP PNG each.",
        "",
        f"| model | measure | eager server ({args.baseline}) | this server | ratio | goal |",
        "|---|---|---:|---:|---:|---|",
    ]
    for row in results:
        old, new, model = row["baseline"], row["current"], row["model"]
        speedup = new["throughput"] / old["throughput"]
        memory_met = new["memory"] <= MEMORY_GOAL_GB
        lines += [
            f"| {model} | throughput, {CLIENTS} clients | {old['throughput']:.2f} req/s | {new['throughput']:.2f} "
            f"req/s | **{speedup:.2f}x** | {_goal(speedup >= THROUGHPUT_GOAL, f'>= {THROUGHPUT_GOAL:g}x')} |",
            f"| {model} | p95, {CLIENTS} clients | {old['p95_8'] * 1000:.0f} ms | {new['p95_8'] * 1000:.0f} ms | "
            f"{new['p95_8'] / old['p95_8']:.2f} | |",
            f"| {model} | p50 / p95, 1 client | {old['p50_1'] * 1000:.0f} / {old['p95_1'] * 1000:.0f} ms | "
            f"{new['p50_1'] * 1000:.0f} / {new['p95_1'] * 1000:.0f} ms | {new['p95_1'] / old['p95_1']:.2f} | |",
            f"| {model} | peak memory, {CLIENTS} x 40 MP | {old['memory']:.2f} GB ({old['large_ok']}/{CLIENTS} "
            f"answered, {old['large_seconds']:.1f} s) | {new['memory']:.2f} GB ({new['large_ok']}/{CLIENTS} "
            f"answered, {new['large_seconds']:.1f} s) | {new['memory'] / old['memory']:.2f} | "
            f"{_goal(memory_met, f'<= {MEMORY_GOAL_GB:g} GB') if model == 'metauas' else ''} |",
            f"| {model} | peak memory before the 40 MP burst | {old['memory_before']:.2f} GB | "
            f"{new['memory_before']:.2f} GB | | |",
            f"| {model} | score difference, same image | | {abs(new['score'] - old['score']):.1e} | | <= 1e-5 |",
            f"| {model} | errors (non-200) under load | {old['errors']} | {new['errors']} | | |",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
