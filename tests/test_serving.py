# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Registry, pyfunc, real REST servers on loopback, and Spark batch scoring, for all three models.

MetaUAS runs with its real offline EfficientNet-Lite0 encoder; InCTRL and FAPrompt with tiny random CLIP
configurations saved in their official file formats.
"""

from __future__ import annotations

import base64
import http.client
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
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from PIL import Image

from anomalib_uas import tracking
from anomalib_uas.data.images import read_image
from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
from anomalib_uas.models.inctrl.checkpoint import to_official as inctrl_official
from anomalib_uas.models.loading import load_model
from anomalib_uas.models.metauas.checkpoint import to_official as metauas_official

pytestmark = pytest.mark.slow

TINY_B = "uas-tiny-ViT-B-16-plus-240"
TINY_L = "uas-tiny-ViT-L-14-336"
KWARGS = {
    "metauas": {
        "image_size": 64,
        "backbone": "efficientnet_lite0",
        "k_shot": 1,
        "prompt_strategy": "random",
        "seed": 0,
    },
    "inctrl": {"clip_model": TINY_B, "k_shot": 2, "seed": 0},
    "faprompt": {"clip_model": TINY_L, "image_size": 112},
}
CHAMPION_METRIC = {"metauas": 0.6, "inctrl": 0.5, "faprompt": 0.4}  # pixel_AUPRO: MetaUAS is the champion
MAP_SIZE = {"metauas": 64, "inctrl": 240, "faprompt": 112}


def _model_files(root: Path) -> dict[str, dict[str, Any]]:
    """Official-format files: MetaUAS's checkpoint, InCTRL's trained parts plus CLIP, FAPrompt's learner plus CLIP."""
    torch.manual_seed(0)
    metauas = MetaUAS(pretrained_backbone=True, image_size=64)
    torch.save(metauas_official(metauas.model), root / "metauas.pth")
    inctrl = InCTRL(clip_model=TINY_B, pretrained=None, seed=3, visualizer=False)
    torch.save(inctrl_official(inctrl.model, include_clip=False), root / "inctrl.pth")
    torch.save(inctrl.model.clip.state_dict(), root / "inctrl-clip.pt")
    faprompt = FAPrompt(clip_model=TINY_L, clip_pretrained=None, image_size=112, seed=5, visualizer=False)
    faprompt.save_official_checkpoint(root / "faprompt.pth")
    torch.save(faprompt.model.clip.state_dict(), root / "faprompt-clip.pt")
    return {
        "metauas": {"checkpoint": root / "metauas.pth", "clip": None},
        "inctrl": {"checkpoint": root / "inctrl.pth", "clip": root / "inctrl-clip.pt"},
        "faprompt": {"checkpoint": root / "faprompt.pth", "clip": root / "faprompt-clip.pt"},
    }


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, demo_category: str) -> Iterator[dict]:
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cwd = Path.cwd()
    os.chdir(root)
    files = _model_files(root)
    normal = sorted((demo_root / demo_category / "train" / "good").glob("*.png"))
    prompts = {"metauas": normal[:1], "inctrl": normal[:2], "faprompt": []}
    versions = {}
    for model in ("metauas", "inctrl", "faprompt"):
        servable = tracking.ServableModel(
            model=model,
            category=demo_category,
            checkpoint=files[model]["checkpoint"],
            clip_weights=files[model]["clip"],
            prompt_paths=prompts[model],
            config={
                "model": model,
                "category": demo_category,
                "kwargs": KWARGS[model],
                "image_threshold": 0.5,
                "pixel_threshold": 0.5,
            },
            example_image=normal[0],
        )
        with tracking.stage_run("evaluate", model, {"evaluate": {"k_shot": 1}}):
            versions[model] = tracking.register_model(servable, {"pixel_AUPRO": CHAMPION_METRIC[model]}, "pixel_AUPRO")
    os.chdir(cwd)
    yield {
        "uri": uri,
        "category": demo_category,
        "files": files,
        "prompts": prompts,
        "versions": versions,
        "normal": normal,
    }
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def _reference(registry: dict, model: str, query: Path, prompts: list[Path] | None = None) -> Any:
    """The model built from the same files outside MLflow; ``prompts`` replace the registered ones."""
    files = registry["files"][model]
    module = load_model(model, files["checkpoint"], files["clip"], visualizer=False, **KWARGS[model])
    transform = module.pre_processor.transform
    with torch.no_grad():
        if model == "metauas":
            module.model.set_prompt_bank(transform(read_image(registry["prompts"][model][0]))[None])
        elif model == "inctrl":
            module.model.set_prompts(torch.stack([transform(read_image(p)) for p in registry["prompts"][model]]))
            module.model.set_category(registry["category"])
        image = transform(read_image(query))[None]
        if prompts is None:
            return module.model(image)
        return module.model(image, torch.stack([transform(read_image(p)) for p in prompts])[None])


def _queries(demo_root: Path, category: str) -> list[Path]:
    return sorted((demo_root / category / "test").glob("*/*.png"))[:3]


@pytest.fixture(scope="module")
def reference(registry: dict) -> Any:
    return lambda model, query, prompts=None: _reference(registry, model, query, prompts)


def test_champion_aliases_follow_the_metric(registry: dict, demo_category: str) -> None:
    client = mlflow.MlflowClient(registry["uri"])
    name = tracking.registered_name(demo_category)
    versions = registry["versions"]
    assert client.get_model_version_by_alias(name, "champion").version == versions["metauas"].version
    for model, version in versions.items():
        aliased = client.get_model_version_by_alias(name, f"champion-{model}")
        assert aliased.version == version.version
        assert aliased.tags["uas.model"] == model
    second = client.create_model_version(name, versions["inctrl"].source, run_id=versions["inctrl"].run_id)
    client.set_model_version_tag(name, second.version, "uas.model", "inctrl")
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.9")
    mlflow.set_tracking_uri(registry["uri"])
    assert tracking.update_champion(name, "pixel_AUPRO") == second.version
    assert client.get_model_version_by_alias(name, "champion-inctrl").version == second.version
    assert client.get_model_version_by_alias(name, "champion-metauas").version == versions["metauas"].version
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.1")
    assert tracking.update_champion(name, "pixel_AUPRO") == versions["metauas"].version
    assert client.get_model_version_by_alias(name, "champion-inctrl").version == versions["inctrl"].version


def test_registered_versions_are_self_contained(registry: dict, demo_category: str) -> None:
    mlflow.set_tracking_uri(registry["uri"])
    name = tracking.registered_name(demo_category)
    for model, version in registry["versions"].items():
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
        artifacts = {path.name for path in (folder / "artifacts").iterdir()}
        expected = {"config.json", registry["files"][model]["checkpoint"].name}
        expected |= {"prompts"} if registry["prompts"][model] else set()
        expected |= {registry["files"][model]["clip"].name} if registry["files"][model]["clip"] else set()
        assert artifacts == expected, model
        assert (folder / "input_example.json").is_file()


@pytest.mark.parametrize("model", ["metauas", "inctrl", "faprompt"])
def test_pyfunc_equals_the_model(
    model: str, registry: dict, reference: Any, demo_root: Path, demo_category: str
) -> None:
    mlflow.set_tracking_uri(registry["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{tracking.registered_name(demo_category)}@champion-{model}")
    queries = _queries(demo_root, demo_category)
    result = pyfunc.predict(
        pd.DataFrame({"image": [path.read_bytes() for path in queries]}), params={"map_format": "array"}
    )
    for path, (_, row) in zip(queries, result.iterrows(), strict=True):
        expected = reference(model, path)
        assert row["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
        anomaly_map = np.array(json.loads(row["anomaly_map"]))
        assert anomaly_map.shape == (MAP_SIZE[model], MAP_SIZE[model])
        np.testing.assert_allclose(anomaly_map, expected.anomaly_map[0].numpy(), atol=1e-4)
        assert row["pred_label"] == int(row["pred_score"] > 0.5)
        mask, exact = np.array(json.loads(row["pred_mask"])), expected.anomaly_map[0].numpy()
        clear = np.abs(exact - 0.5) > 1e-4  # the pixel threshold is 0.5; the map is sent rounded
        assert np.array_equal(mask[clear], (exact[clear] > 0.5).astype(int))

    override = registry["normal"][-2:] if model == "inctrl" else registry["normal"][-1:]
    frame = pd.DataFrame({"image": [queries[-1].read_bytes()], "prompt_images": [[p.read_bytes() for p in override]]})
    if model == "faprompt":
        with pytest.raises(MlflowException, match="zero-shot"):
            pyfunc.predict(frame)
        return
    overridden = pyfunc.predict(frame, params={"map_format": "none"}).iloc[0]
    expected = reference(model, queries[-1], override)
    assert overridden["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
    assert overridden["pred_score"] != pytest.approx(float(reference(model, queries[-1]).pred_score[0]), abs=1e-7)
    too_many = pd.DataFrame({"image": [queries[-1].read_bytes()], "prompt_images": [[override[0].read_bytes()] * 9]})
    with pytest.raises(MlflowException, match="1 to 8"):
        pyfunc.predict(too_many)


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


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _payload(images: list[bytes], prompts: list[bytes] | None = None, map_format: str = "png") -> bytes:
    columns = ["image"] + (["prompt_images"] if prompts is not None else [])
    data = [[_b64(image)] + ([[_b64(p) for p in prompts]] if prompts is not None else []) for image in images]
    return json.dumps(
        {"dataframe_split": {"columns": columns, "data": data}, "params": {"map_format": map_format}}
    ).encode()


def _ping(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
        return response.status


def _start(command: list[str], env: dict[str, str], port: int) -> Iterator[int]:
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if _ping(port) == 200:
                break
        except OSError:
            if process.poll() is not None:
                pytest.fail(process.stdout.read().decode()[-3000:])
            time.sleep(1)
    else:
        process.kill()
        pytest.fail(f"{' '.join(command)} did not answer /ping within 180 s")
    yield port
    process.terminate()
    process.wait(timeout=30)


def _server_env(registry: dict) -> dict[str, str]:
    return {
        **os.environ,
        "MLFLOW_TRACKING_URI": registry["uri"],
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }


@pytest.fixture(scope="module")
def server(registry: dict, demo_category: str) -> Iterator[int]:
    """``mlflow models serve`` of the champion (MetaUAS), as the issue's users run it."""
    env, port = _server_env(registry), _free_port()
    uri = f"models:/{tracking.registered_name(demo_category)}@champion"
    mlflow_cli = shutil.which("mlflow", path=env["PATH"])
    command = [mlflow_cli, "models", "serve", "-m", uri, "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    yield from _start(command, env, port)


@pytest.fixture(scope="module")
def uas_server(registry: dict, demo_category: str) -> Iterator[int]:
    """``uas serve CATEGORY --model inctrl`` with a 0.5 MB body limit."""
    env, port = _server_env(registry), _free_port()
    uas_cli = shutil.which("uas", path=env["PATH"])
    command = [uas_cli, "serve", demo_category, "--model", "inctrl", "--port", str(port), "--max-body-mb", "0.5"]
    yield from _start(command, env, port)


def test_served_model_answers_with_maps_and_prompt_override(
    server: int, reference: Any, registry: dict, demo_root: Path, demo_category: str
) -> None:
    query = _queries(demo_root, demo_category)[-1]
    status, body = _post(server, _payload([query.read_bytes()]))
    assert status == 200
    row = body["predictions"][0]
    assert row["pred_score"] == pytest.approx(float(reference("metauas", query).pred_score[0]), abs=1e-5)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["anomaly_map"]))))
    assert heat.shape == (64, 64)
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(base64.b64decode(row["pred_mask"])))))) <= {0, 255}

    other = registry["normal"][-1]
    status, body = _post(server, _payload([query.read_bytes()], prompts=[other.read_bytes()], map_format="none"))
    assert status == 200
    expected = reference("metauas", query, [other])
    assert body["predictions"][0]["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
    assert body["predictions"][0]["anomaly_map"] == ""


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (b"{not json", ""),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["aGVsbG8="]]}}).encode(), "Cannot read"),
        (json.dumps({"dataframe_split": {"columns": ["other"], "data": [["x"]]}}).encode(), ""),
        (json.dumps({"dataframe_split": {"columns": ["image"], "data": [["%%%"]]}}).encode(), ""),
        (
            json.dumps({"dataframe_split": {"columns": ["image", "prompt_images"], "data": [["aGVsbG8=", "x"]]}}),
            "",
        ),
    ],
)
def test_malformed_requests_get_4xx_and_the_server_stays_up(server: int, body: bytes | str, needle: str) -> None:
    status, answer = _post(server, body.encode() if isinstance(body, str) else body)
    assert 400 <= status < 500
    assert needle in json.dumps(answer)
    assert _ping(server) == 200


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


def test_uas_serve_answers_inctrl_with_its_prompt_override(
    uas_server: int, reference: Any, registry: dict, demo_root: Path, demo_category: str
) -> None:
    query = _queries(demo_root, demo_category)[0]
    status, body = _post(uas_server, _payload([query.read_bytes()], map_format="png"))
    assert status == 200
    row = body["predictions"][0]
    assert row["pred_score"] == pytest.approx(float(reference("inctrl", query).pred_score[0]), abs=1e-5)
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(row["anomaly_map"])))).shape == (240, 240)
    prompts = registry["normal"][-2:]
    status, body = _post(uas_server, _payload([query.read_bytes()], [p.read_bytes() for p in prompts], "none"))
    assert status == 200
    expected = reference("inctrl", query, prompts)
    assert body["predictions"][0]["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)


def test_uas_serve_refuses_oversized_bodies_and_stays_up(uas_server: int) -> None:
    declared = http.client.HTTPConnection("127.0.0.1", uas_server, timeout=30)
    declared.putrequest("POST", "/invocations")
    declared.putheader("Content-Type", "application/json")
    declared.putheader("Content-Length", str(10**10))  # 10 GB announced; the server must not wait for it
    declared.endheaders(b'{"dataframe_split": ')
    answer = declared.getresponse()
    assert answer.status == 413
    assert "at most 500000" in json.loads(answer.read())["message"]
    declared.close()

    streamed = http.client.HTTPConnection("127.0.0.1", uas_server, timeout=30)
    streamed.putrequest("POST", "/invocations")
    streamed.putheader("Content-Type", "application/json")
    streamed.putheader("Transfer-Encoding", "chunked")
    streamed.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(10):  # 640 KB > 0.5 MB
            streamed.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed before the whole body arrived
    answer = streamed.getresponse()
    assert answer.status == 413
    assert "more than" in json.loads(answer.read())["message"]
    streamed.close()
    assert _ping(uas_server) == 200


def test_spark_udf_equals_in_process_predictions(registry: dict, demo_root: Path, demo_category: str) -> None:
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
