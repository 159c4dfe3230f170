# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Registry, pyfunc, a real `mlflow models serve` process on loopback, and Spark batch scoring."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from anomalib_uas import tracking
from anomalib_uas.data.images import read_image
from anomalib_uas.models import MetaUAS
from anomalib_uas.models.metauas.checkpoint import to_official

pytestmark = pytest.mark.slow

CONFIG_KWARGS = {
    "image_size": 64,
    "backbone": "efficientnet_lite0",
    "k_shot": 1,
    "prompt_strategy": "random",
    "seed": 0,
}


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, demo_category: str) -> dict[str, object]:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = Path.cwd()
    os.chdir(root)
    torch.manual_seed(0)
    checkpoint = root / "metauas.pth"
    torch.save(to_official(MetaUAS(pretrained_backbone=True, image_size=64).model), checkpoint)
    prompts = sorted((demo_root / demo_category / "train" / "good").glob("*.png"))[:1]
    config = {"model": "metauas", "kwargs": CONFIG_KWARGS, "image_threshold": 0.5, "pixel_threshold": 0.5}
    with tracking.stage_run("evaluate", "metauas", {"evaluate": {"k_shot": 1}}):
        version = tracking.register_model(
            "metauas", demo_category, checkpoint, prompts, config, {"pixel_AUPRO": 0.3}, "pixel_AUPRO"
        )
    os.chdir(cwd)
    yield {"uri": uri, "root": root, "checkpoint": checkpoint, "prompts": prompts, "version": version}
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _reference(checkpoint: Path, prompt: Path, query: Path) -> MetaUAS:
    model = MetaUAS.from_official_checkpoint(checkpoint, **CONFIG_KWARGS).eval()
    transform = model.pre_processor.transform
    model.model.set_prompt_bank(transform(read_image(prompt))[None])
    return model.model(transform(read_image(query))[None])


def _queries(demo_root: Path, category: str) -> list[Path]:
    return sorted((demo_root / category / "test").glob("*/*.png"))[:4]


def test_champion_alias_follows_the_metric(registry: dict[str, object], demo_category: str) -> None:
    client = mlflow.MlflowClient(registry["uri"])
    name = tracking.registered_name(demo_category)
    first = registry["version"].version
    assert client.get_model_version_by_alias(name, "champion").version == first
    second = client.create_model_version(name, registry["version"].source, run_id=registry["version"].run_id)
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.9")
    mlflow.set_tracking_uri(registry["uri"])
    assert tracking.update_champion(name, "pixel_AUPRO") == second.version
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.1")
    assert tracking.update_champion(name, "pixel_AUPRO") == first


def test_pyfunc_equals_the_model(registry: dict[str, object], demo_root: Path, demo_category: str) -> None:
    mlflow.set_tracking_uri(registry["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{tracking.registered_name(demo_category)}/{registry['version'].version}")
    queries = _queries(demo_root, demo_category)
    frame = pd.DataFrame({"image": [path.read_bytes() for path in queries]})
    result = model.predict(frame, params={"map_format": "array"})
    for path, (_, row) in zip(queries, result.iterrows(), strict=True):
        expected = _reference(registry["checkpoint"], registry["prompts"][0], path)
        assert row["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
        np.testing.assert_allclose(np.array(json.loads(row["anomaly_map"])), expected.anomaly_map[0].numpy(), atol=1e-4)
        assert row["pred_label"] == int(row["pred_score"] > 0.5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")


def _payload(images: list[bytes], prompt: bytes | None = None, map_format: str = "png") -> bytes:
    columns = ["image"] + (["prompt_image"] if prompt is not None else [])
    data = [
        [base64.b64encode(image).decode()] + ([base64.b64encode(prompt).decode()] if prompt else []) for image in images
    ]
    return json.dumps(
        {"dataframe_split": {"columns": columns, "data": data}, "params": {"map_format": map_format}}
    ).encode()


@pytest.fixture(scope="module")
def server(registry: dict[str, object], demo_category: str) -> int:
    port = _free_port()
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry["uri"],
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    uri = f"models:/{tracking.registered_name(demo_category)}@champion"
    mlflow_cli = shutil.which("mlflow", path=env["PATH"])
    process = subprocess.Popen(
        [mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            if process.poll() is not None:
                pytest.fail(process.stdout.read().decode()[-3000:])
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("mlflow models serve did not answer /ping within 180 s")
    yield port
    process.terminate()
    process.wait(timeout=30)


def test_served_model_answers_with_maps_and_prompt_override(
    server: int, registry: dict[str, object], demo_root: Path, demo_category: str
) -> None:
    query = _queries(demo_root, demo_category)[-1]
    status, body = _post(server, _payload([query.read_bytes()]))
    assert status == 200
    row = body["predictions"][0]
    expected = _reference(registry["checkpoint"], registry["prompts"][0], query)
    assert row["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["anomaly_map"]))))
    assert heat.shape == (64, 64)
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(base64.b64decode(row["pred_mask"])))))) <= {0, 255}

    other_prompt = sorted((demo_root / demo_category / "train" / "good").glob("*.png"))[-1]
    status, body = _post(server, _payload([query.read_bytes()], prompt=other_prompt.read_bytes(), map_format="none"))
    assert status == 200
    overridden = _reference(registry["checkpoint"], other_prompt, query)
    assert body["predictions"][0]["pred_score"] == pytest.approx(float(overridden.pred_score[0]), abs=1e-5)
    assert body["predictions"][0]["anomaly_map"] == ""


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", ""),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8="]]}}).encode(), "Cannot read"),
        (json.dumps({"dataframe_split": {"columns": ["other"], "data": [["x"]]}}).encode(), ""),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}).encode(), ""),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_stays_up(server: int, body: bytes, needle: str) -> None:
    status, answer = _post(server, body)
    assert 400 <= status < 500
    assert needle in json.dumps(answer)
    with urllib.request.urlopen(f"http://127.0.0.1:{server}/ping", timeout=5) as response:
        assert response.status == 200


def test_oversized_image_is_refused_before_decoding(server: int) -> None:
    buffer = io.BytesIO()
    Image.new("L", (20000, 20000)).save(buffer, format="PNG", optimize=True)
    started = time.monotonic()
    status, answer = _post(server, _payload([buffer.getvalue()]))
    assert status == 400
    assert "pixels" in answer["message"]
    assert time.monotonic() - started < 30


def test_bounded_load_has_no_server_errors(server: int, demo_root: Path, demo_category: str) -> None:
    payload = _payload([_queries(demo_root, demo_category)[0].read_bytes()], map_format="none")

    def call(_: int) -> tuple[int, float]:
        started = time.perf_counter()
        status, _answer = _post(server, payload)
        return status, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(call, range(200)))
    assert [status for status, _ in results] == [200] * 200
    latencies = sorted(seconds for _, seconds in results)
    print(f"served p50 {latencies[100] * 1000:.1f} ms, p95 {latencies[189] * 1000:.1f} ms")


def test_spark_udf_equals_in_process_predictions(
    registry: dict[str, object], demo_root: Path, demo_category: str
) -> None:
    pyspark = pytest.importorskip("pyspark.sql")
    spark = pyspark.SparkSession.builder.master("local[2]").appName("uas-test").getOrCreate()
    try:
        mlflow.set_tracking_uri(registry["uri"])
        uri = f"models:/{tracking.registered_name(demo_category)}@champion"
        paths = [str(path) for path in _queries(demo_root, demo_category)]
        table = spark.createDataFrame(pd.DataFrame({"image_path": paths}))
        udf = mlflow.pyfunc.spark_udf(
            spark, uri, result_type="pred_score double, pred_label long, anomaly_map string, pred_mask string",
            env_manager="local", params={"map_format": "none"},
        )  # fmt: skip
        functions = pytest.importorskip("pyspark.sql.functions")
        scored = table.withColumn("prediction", udf(functions.struct("image_path")))
        scored = scored.select("image_path", "prediction.*").toPandas()
        local = mlflow.pyfunc.load_model(uri).predict(
            pd.DataFrame({"image_path": paths}), params={"map_format": "none"}
        )
        scored = scored.set_index("image_path").loc[paths]
        np.testing.assert_allclose(scored["pred_score"].to_numpy(), local["pred_score"].to_numpy(), atol=1e-6)
        assert scored["pred_label"].tolist() == local["pred_label"].tolist()
    finally:
        spark.stop()
