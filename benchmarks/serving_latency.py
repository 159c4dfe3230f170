# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Latency of registered models served over REST against the models' own latency, measured in one run.

For each model (full architectures with random weights, which is enough for timing) the script registers a
version in a temporary sqlite MLflow store exactly as the pipeline does, then measures:

* **model**: the model's own forward on one pre-processed image in this process (prompt and text features
  cached, as served), median and p95 over ``--repeats`` calls;
* **served, sequential**: ``uas serve`` (MLflow's scoring server behind the body limit) on loopback, one client
  sending ``--requests`` requests one after another, each one base64 PNG image with the default ``map_format``
  ``png``; the wall time from sending to the parsed answer;
* **served, 8 concurrent**: the same requests from 8 client threads at once (throughput, and the latency a
  request sees when it queues behind others on the single worker).

The target is a served p95 (sequential) at most twice the model's own latency per image. The Markdown report is
printed and written to ``benchmarks/results/serving_latency.md``.

Run it from the repository root:

    python benchmarks/serving_latency.py                        # MetaUAS b4 256 px and InCTRL, ~5 min
    python benchmarks/serving_latency.py --models metauas faprompt --requests 20
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
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "serving_latency.md"
CONCURRENCY = 8
TARGET_RATIO = 2.0
SETTINGS = {
    "metauas": "official b4 architecture, 256 px, one cached prompt",
    "inctrl": "ViT-B-16-plus-240, k = 2 cached prompts, cached text",
    "faprompt": "ViT-L-14-336 at 518 px, cached static text",
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["metauas", "inctrl"], choices=list(SETTINGS))
    parser.add_argument("--threads", type=int, default=2, help="torch threads, here and in the server")
    parser.add_argument("--repeats", type=int, default=20, help="timed in-process forward calls")
    parser.add_argument("--requests", type=int, default=50, help="requests per served measurement")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    return parser.parse_args()


def write_files(model: str, folder: Path) -> tuple[Path, Path | None, dict[str, Any], list[Path]]:
    """Random-weight checkpoints of the full architecture in the official formats, and normal prompt images."""
    from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
    from anomalib_uas.models.inctrl.checkpoint import to_official as inctrl_official
    from anomalib_uas.models.metauas.checkpoint import to_official as metauas_official

    generator = np.random.default_rng(0)
    prompts = []
    for index in range(2):
        path = folder / f"prompt{index}.png"
        Image.fromarray(generator.integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(path)
        prompts.append(path)
    if model == "metauas":
        module = MetaUAS(backbone="tf_efficientnet_b4", pretrained_backbone=False, image_size=256)
        torch.save(metauas_official(module.model), folder / "metauas.pth")
        kwargs = {"image_size": 256, "backbone": "tf_efficientnet_b4", "k_shot": 1, "prompt_strategy": "random"}
        return folder / "metauas.pth", None, kwargs, prompts[:1]
    if model == "inctrl":
        module = InCTRL(pretrained=None, visualizer=False)
        torch.save(inctrl_official(module.model, include_clip=False), folder / "inctrl.pth")
        torch.save(module.model.clip.state_dict(), folder / "clip.pt")
        return folder / "inctrl.pth", folder / "clip.pt", {"clip_model": "ViT-B-16-plus-240", "k_shot": 2}, prompts
    module = FAPrompt(clip_pretrained=None, visualizer=False)
    module.save_official_checkpoint(folder / "faprompt.pth")
    torch.save(module.model.clip.state_dict(), folder / "clip.pt")
    return folder / "faprompt.pth", folder / "clip.pt", {"clip_model": "ViT-L-14-336", "image_size": 518}, []


def register(model: str, folder: Path, query: Path) -> None:
    from anomalib_uas import tracking

    checkpoint, clip, kwargs, prompts = write_files(model, folder)
    config = {"model": model, "category": "bottle", "kwargs": kwargs, "image_threshold": 0.5, "pixel_threshold": 0.5}
    servable = tracking.ServableModel(
        model=model,
        category="bottle",
        checkpoint=checkpoint,
        clip_weights=clip,
        prompt_paths=prompts,
        config=config,
        example_image=query,
    )
    with tracking.stage_run("benchmark", model, {}):
        tracking.register_model(servable, {"pixel_AUPRO": 1.0}, "pixel_AUPRO")


def model_latency(model: str, query: Path, repeats: int) -> list[float]:
    """Seconds per forward of the registered model, loaded the way the server loads it."""
    import mlflow

    from anomalib_uas.data.images import read_image

    pyfunc = mlflow.pyfunc.load_model(f"models:/anomalib-uas-bottle@champion-{model}").unwrap_python_model()
    image = pyfunc.transform(read_image(query)).unsqueeze(0)
    times = []
    with torch.inference_mode():
        pyfunc.module.model(image)
        for _ in range(repeats):
            started = time.perf_counter()
            pyfunc.module.model(image)
            times.append(time.perf_counter() - started)
    return times


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model: str, port: int, threads: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    uas = shutil.which("uas", path=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    command = [uas, "serve", "bottle", "--model", model, "--port", str(port)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 600
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
    msg = "uas serve did not answer within 600 s"
    raise RuntimeError(msg)


def post(port: int, body: bytes) -> float:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    started = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as response:
        json.loads(response.read())
        if response.status != 200:
            msg = f"HTTP {response.status}"
            raise RuntimeError(msg)
    return time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{root / 'mlflow.db'}"
        os.chdir(root)
        query = root / "query.png"
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (256, 256, 3), dtype=np.uint8)).save(buffer, "PNG")
        query.write_bytes(buffer.getvalue())
        body = json.dumps(
            {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(query.read_bytes()).decode()]]}}
        ).encode()
        for model in args.models:
            (root / model).mkdir()
            register(model, root / model, query)
            own = model_latency(model, query, args.repeats)
            port = free_port()
            server = start_server(model, port, args.threads)
            try:
                post(port, body)  # warm-up
                sequential = [post(port, body) for _ in range(args.requests)]
                started = time.perf_counter()
                with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
                    concurrent = list(pool.map(post, [port] * args.requests, [body] * args.requests))
                elapsed = time.perf_counter() - started
            finally:
                server.terminate()
                server.wait(timeout=60)
            rows.append(
                {
                    "model": model,
                    "own_median": statistics.median(own),
                    "own_p95": percentile(own, 95),
                    "seq_median": statistics.median(sequential),
                    "seq_p95": percentile(sequential, 95),
                    "conc_p95": percentile(concurrent, 95),
                    "throughput": args.requests / elapsed,
                }
            )
            print(rows[-1], flush=True)
    report = render(rows, args)
    print(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(report)


def render(rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    load = os.getloadavg()
    lines = [
        "# Served latency against the model's own latency",
        "",
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
        f"{args.threads} torch threads, torch {torch.__version__}, load average {load[0]:.2f} at the end. "
        f"One 256x256 PNG per request, map_format png; {args.requests} requests per column; model: median and p95 of "
        f"{args.repeats} forwards.",
        "",
        "| model | setting | model median | model p95 | served median | served p95 | p95 / model median "
        f"(target <= {TARGET_RATIO:g}) | {CONCURRENCY} concurrent: p95 | throughput |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ratio = row["seq_p95"] / row["own_median"]
        lines.append(
            f"| {row['model']} | {SETTINGS[row['model']]} | {row['own_median'] * 1000:.1f} ms | "
            f"{row['own_p95'] * 1000:.1f} ms | {row['seq_median'] * 1000:.1f} ms | {row['seq_p95'] * 1000:.1f} ms | "
            f"**{ratio:.2f}** {'(met)' if ratio <= TARGET_RATIO else '(not met)'} | {row['conc_p95'] * 1000:.0f} ms | "
            f"{row['throughput']:.2f} req/s |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
