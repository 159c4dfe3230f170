# Copyright (C) 2026 anomalib-uas contributors
# SPDX-License-Identifier: Apache-2.0
"""Registry, pyfunc on the exported graph, real ``uas serve`` processes on loopback, and Spark batch scoring.

MetaUAS runs with its real offline EfficientNet-Lite0 encoder; InCTRL and FAPrompt with tiny random CLIP
configurations saved in their official file formats. Every bound of a served request is checked against a real
server: rows, megapixels, aspect ratio, body size, requests in flight, timeouts and clients that leave, image
formats, ``image_path`` and malformed payloads.
"""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import select
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
from decisions import fixed_decision
from mlflow.exceptions import MlflowException
from PIL import Image

from anomalib_uas import registry, tracking
from anomalib_uas.calibration import heatmap_png
from anomalib_uas.cli import main
from anomalib_uas.data.images import read_image
from anomalib_uas.models import FAPrompt, InCTRL, MetaUAS
from anomalib_uas.models.inctrl.checkpoint import to_official as inctrl_official
from anomalib_uas.models.loading import load_model
from anomalib_uas.models.metauas.checkpoint import to_official as metauas_official
from anomalib_uas.serving.pyfunc import load_servable
from anomalib_uas.serving.runtime import GraphMismatchError, check_graph

DECISION = fixed_decision(0.5, 0.5)  # every registered version's decision
HEATMAP_RANGE = DECISION["threshold_basis"]["heatmap_range"]

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
    inctrl = InCTRL(clip_model=TINY_B, clip_pretrained=None, seed=3, visualizer=False)
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
def registered(tmp_path_factory: pytest.TempPathFactory, demo_root: Path, demo_category: str) -> Iterator[dict]:
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
        servable = registry.ServableModel(
            model=model,
            category=demo_category,
            checkpoint=files[model]["checkpoint"],
            clip_weights=files[model]["clip"],
            prompt_paths=prompts[model],
            config={
                "model": model,
                "category": demo_category,
                "kwargs": KWARGS[model],
                **DECISION,
            },
            example_image=normal[0],
        )
        with tracking.stage_run("evaluate", model, {"evaluate": {"k_shot": 1}}):
            versions[model] = registry.register_model(servable, {"pixel_AUPRO": CHAMPION_METRIC[model]}, "pixel_AUPRO")
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


def _reference(registered: dict, model: str, query: Path, prompts: list[Path] | None = None) -> Any:
    """The model built from the same files outside MLflow; ``prompts`` replace the registered ones."""
    files = registered["files"][model]
    module = load_model(model, files["checkpoint"], files["clip"], visualizer=False, **KWARGS[model])
    transform = module.pre_processor.transform
    with torch.no_grad():
        if model == "metauas":
            module.model.set_prompts(transform(read_image(registered["prompts"][model][0]))[None])
        elif model == "inctrl":
            module.model.set_prompts(torch.stack([transform(read_image(p)) for p in registered["prompts"][model]]))
            module.model.set_category(registered["category"])
        image = transform(read_image(query))[None]
        if prompts is None:
            return module.model(image)
        return module.model(image, torch.stack([transform(read_image(p)) for p in prompts])[None])


def _queries(demo_root: Path, category: str) -> list[Path]:
    return sorted((demo_root / category / "test").glob("*/*.png"))[:3]


@pytest.fixture(scope="module")
def reference(registered: dict) -> Any:
    return lambda model, query, prompts=None: _reference(registered, model, query, prompts)


def test_champion_aliases_follow_the_metric(registered: dict, demo_category: str) -> None:
    client = mlflow.MlflowClient(registered["uri"])
    name = registry.registered_name(demo_category)
    versions = registered["versions"]
    assert client.get_model_version_by_alias(name, "champion").version == versions["metauas"].version
    for model, version in versions.items():
        aliased = client.get_model_version_by_alias(name, f"champion-{model}")
        assert aliased.version == version.version
        assert aliased.tags["uas.model"] == model
    second = client.create_model_version(name, versions["inctrl"].source, run_id=versions["inctrl"].run_id)
    client.set_model_version_tag(name, second.version, "uas.model", "inctrl")
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.9")
    mlflow.set_tracking_uri(registered["uri"])
    assert registry.update_champion(name, "pixel_AUPRO") == second.version
    assert client.get_model_version_by_alias(name, "champion-inctrl").version == second.version
    assert client.get_model_version_by_alias(name, "champion-metauas").version == versions["metauas"].version
    client.set_model_version_tag(name, second.version, "pixel_AUPRO", "0.1")
    assert registry.update_champion(name, "pixel_AUPRO") == versions["metauas"].version
    assert client.get_model_version_by_alias(name, "champion-inctrl").version == versions["inctrl"].version


def test_registered_versions_are_self_contained(registered: dict, demo_category: str) -> None:
    mlflow.set_tracking_uri(registered["uri"])
    name = registry.registered_name(demo_category)
    for model, version in registered["versions"].items():
        folder = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}"))
        artifacts = {path.name for path in (folder / "artifacts").iterdir()}
        expected = {"config.json", registered["files"][model]["checkpoint"].name}
        expected |= {"prompts"} if registered["prompts"][model] else set()
        expected |= {registered["files"][model]["clip"].name} if registered["files"][model]["clip"] else set()
        expected |= {"graph"}
        assert (folder / "artifacts" / "graph" / "model.onnx").is_file()
        assert artifacts == expected, model
        assert (folder / "input_example.json").is_file()


def test_a_graph_is_reused_only_for_the_same_files_and_settings(
    registered: dict, demo_category: str, tmp_path: Path
) -> None:
    mlflow.set_tracking_uri(registered["uri"])
    name = registry.registered_name(demo_category)
    keys = {model: version.tags[registry.GRAPH_KEY_TAG] for model, version in registered["versions"].items()}
    assert len(set(keys.values())) == 3
    assert not any(registry.GRAPH_FROM_TAG in version.tags for version in registered["versions"].values())
    servable = registry.ServableModel(
        model="metauas",
        category=demo_category,
        checkpoint=registered["files"]["metauas"]["checkpoint"],
        prompt_paths=registered["prompts"]["metauas"],
        config={"model": "metauas", "category": demo_category, "kwargs": KWARGS["metauas"]},
        example_image=registered["normal"][0],
    )
    assert registry.graph_key(servable) == keys["metauas"]  # thresholds are not part of the key
    assert registry.graph_key(dataclasses.replace(servable, prompt_paths=registered["normal"][-1:])) != keys["metauas"]
    # The check that guards a reused graph: MetaUAS's graph, with its prompt baked in, fails for another prompt.
    uri = f"models:/{name}/{registered['versions']['metauas'].version}/artifacts/graph"
    graph = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    (tmp_path / "prompts").mkdir()
    shutil.copy(registered["normal"][-1], tmp_path / "prompts")
    artifacts = {"checkpoint": str(servable.checkpoint), "prompts": str(tmp_path / "prompts")}
    module = load_servable(servable.config, artifacts)
    example = module.pre_processor.transform(read_image(registered["normal"][0]))
    with pytest.raises(GraphMismatchError, match="differs from the eager model"):
        check_graph(module.model, example.unsqueeze(0), graph)


@pytest.mark.parametrize("model", ["metauas", "inctrl", "faprompt"])
def test_pyfunc_equals_the_model(
    model: str, registered: dict, reference: Any, demo_root: Path, demo_category: str
) -> None:
    mlflow.set_tracking_uri(registered["uri"])
    pyfunc = mlflow.pyfunc.load_model(f"models:/{registry.registered_name(demo_category)}@champion-{model}")
    assert pyfunc.unwrap_python_model().runtime == "onnx"
    queries = _queries(demo_root, demo_category)
    result = pyfunc.predict(
        pd.DataFrame({"image": [path.read_bytes() for path in queries]}), params={"map_format": "array"}
    )
    for path, (_, row) in zip(queries, result.iterrows(), strict=True):
        expected = reference(model, path)
        assert row["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
        anomaly_map = np.array(json.loads(row["anomaly_map"]))
        assert anomaly_map.shape == (MAP_SIZE[model], MAP_SIZE[model])
        np.testing.assert_allclose(anomaly_map, expected.anomaly_map[0].numpy(), atol=1e-5)
        assert row["pred_label"] == int(row["pred_score"] > 0.5)
        assert row["threshold_version"] == DECISION["threshold_version"]
        mask, exact = np.array(json.loads(row["pred_mask"])), expected.anomaly_map[0].numpy()
        clear = np.abs(exact - 0.5) > 1e-4  # the pixel threshold is 0.5; the map is sent rounded
        assert np.array_equal(mask[clear], (exact[clear] > 0.5).astype(int))

    override = registered["normal"][-2:] if model == "inctrl" else registered["normal"][-1:]
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
    with pytest.raises(MlflowException, match="1 to 8"):
        pyfunc.predict(pd.DataFrame({"image": [queries[-1].read_bytes()], "prompt_images": [[]]}))


def test_a_version_registered_before_calibration_and_renames_serves_its_thresholds_unversioned(
    registered: dict, demo_root: Path, demo_category: str, tmp_path: Path
) -> None:
    """A registry from before the calibrate stage and the shared argument names still serves, labelled unversioned."""
    from anomalib_uas.serving.pyfunc import UNVERSIONED

    mlflow.set_tracking_uri(registered["uri"])
    uri = f"models:/{registry.registered_name(demo_category)}@champion-metauas"
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))
    (config_file,) = folder.rglob("config.json")
    config = json.loads(config_file.read_text())
    for key in ("threshold_version", "threshold_basis"):
        del config[key]
    kwargs = config["kwargs"]
    kwargs["prompt_source"] = kwargs.pop("few_shot_source", None)  # the name MetaUAS's argument had then
    config_file.write_text(json.dumps(config))
    query = _queries(demo_root, demo_category)[-1]
    result = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame({"image": [query.read_bytes()]}))
    row = result.iloc[0]
    assert row["threshold_version"] == UNVERSIONED
    assert row["pred_label"] == int(row["pred_score"] > config["image_threshold"])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _post(
    port: int, body: bytes, content_type: str = "application/json", timeout: float = 120
) -> tuple[int, dict, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": content_type}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}"), error.headers


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _payload(images: list[bytes], prompts: list[bytes] | None = None, map_format: str = "png") -> bytes:
    columns = ["image"] + (["prompt_images"] if prompts is not None else [])
    data = [[_b64(image)] + ([[_b64(p) for p in prompts]] if prompts is not None else []) for image in images]
    return json.dumps(
        {"dataframe_split": {"columns": columns, "data": data}, "params": {"map_format": map_format}}
    ).encode()


def _paths_payload(paths: list[str]) -> bytes:
    data = [[path] for path in paths]
    return json.dumps({"dataframe_split": {"columns": ["image_path"], "data": data}}).encode()


def _encoded(array: np.ndarray, fmt: str = "PNG", mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format=fmt)
    return buffer.getvalue()


def _ping(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5) as response:
        return response.status


class Server:
    """A ``uas serve`` process on loopback, its output in a log file."""

    def __init__(self, registered: dict, category: str, folder: Path, *options: str) -> None:
        self.port, self.log = _free_port(), folder / f"serve-{time.monotonic_ns()}.log"
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": registered["uri"],
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        }
        command = [shutil.which("uas", path=env["PATH"]), "serve", category, "--port", str(self.port), *options]
        with self.log.open("wb") as output:
            self.process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if _ping(self.port) == 200:
                    return
            except OSError:
                if self.process.poll() is not None:
                    pytest.fail(self.log.read_text()[-3000:])
                time.sleep(0.5)
        self.process.kill()
        pytest.fail(f"{' '.join(command)} did not answer /ping within 180 s")

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=30)
        return self.log.read_text()


@pytest.fixture(scope="module")
def image_root(tmp_path_factory: pytest.TempPathFactory, registered: dict) -> Path:
    """Images requests may name: one image and a link pointing outside the root, next to an image outside."""
    folder = tmp_path_factory.mktemp("served")
    root, outside = folder / "root", folder / "outside.png"
    root.mkdir()
    shutil.copy(registered["normal"][0], root / "good.png")
    shutil.copy(registered["normal"][0], outside)
    (root / "link.png").symlink_to(outside)
    (root / "folder").mkdir()
    return root


@pytest.fixture(scope="module")
def server(registered: dict, demo_category: str, image_root: Path) -> Iterator[int]:
    """``uas serve CATEGORY``: the champion (MetaUAS) with small bounds and an image root."""
    options = ["--max-rows", "4", "--max-megapixels", "1", "--max-in-flight", "2", "--max-body-mb", "2"]
    process = Server(registered, demo_category, image_root.parent, *options, "--image-root", str(image_root))
    yield process.port
    process.stop()


@pytest.fixture(scope="module")
def uas_server(registered: dict, demo_category: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """``uas serve CATEGORY --model inctrl`` with a 0.5 MB body limit and no image root."""
    folder = tmp_path_factory.mktemp("inctrl-serve")
    process = Server(registered, demo_category, folder, "--model", "inctrl", "--max-body-mb", "0.5")
    yield process.port
    process.stop()


def _no_internals(answer: dict) -> None:
    """A refusal names the problem, never a stack trace or a path of the server."""
    text = json.dumps(answer)
    assert set(answer) == {"error_code", "message"}, text
    assert answer["message"]
    for leak in ("Traceback", "stack_trace", str(Path(tracking.__file__).parent.parent), "/tmp", "site-packages"):
        assert leak not in text


def test_served_model_answers_with_maps_and_prompt_override(
    server: int, reference: Any, registered: dict, demo_root: Path, demo_category: str
) -> None:
    query = _queries(demo_root, demo_category)[-1]
    status, body, _ = _post(server, _payload([query.read_bytes()]))
    assert status == 200
    row = body["predictions"][0]
    assert row["pred_score"] == pytest.approx(float(reference("metauas", query).pred_score[0]), abs=1e-5)
    heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(row["anomaly_map"])))).astype(int)
    drawn = heatmap_png(reference("metauas", query).anomaly_map[0].numpy(), HEATMAP_RANGE).astype(int)
    assert heat.shape == (64, 64)
    assert np.abs(heat - drawn).max() <= 1  # the version's colour range, as the review and `uas predict` draw it
    assert set(np.unique(np.asarray(Image.open(io.BytesIO(base64.b64decode(row["pred_mask"])))))) <= {0, 255}

    other = registered["normal"][-1]
    status, body, _ = _post(server, _payload([query.read_bytes()], prompts=[other.read_bytes()], map_format="none"))
    assert status == 200
    expected = reference("metauas", query, [other])
    assert body["predictions"][0]["pred_score"] == pytest.approx(float(expected.pred_score[0]), abs=1e-5)
    assert body["predictions"][0]["anomaly_map"] == ""


def _split(columns: list[str], data: list) -> bytes:
    return json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode()


PNG = _b64(_encoded(np.zeros((8, 8, 3), np.uint8)))
MALFORMED = {
    "not json": (b"{not json", "application/json", 400, "not valid JSON"),
    "not utf-8": (b"\xff\xfe{}", "application/json", 400, "not valid JSON"),
    # RecursionError on Python 3.11 (400 "nested too deeply"), a list on versions with a deeper C recursion limit
    "deeply nested": (b"[" * 1100 + b"]" * 1100, "application/json", 400, "dataframe_split"),
    "structure beyond the rows": (b"[" * 50_000 + b"]" * 50_000, "application/json", 413, "(uas serve --max-rows)"),
    "long integer": (_split(["image"], [[0]]).replace(b"0", b"9" * 5000), "application/json", 400, "5000 characters"),
    "long float": (_split(["image"], [[0]]).replace(b"0", b"0." + b"1" * 5000), "application/json", 400, "5002 char"),
    "csv": (b"image\naGVsbG8=\n", "application/csv", 415, "Content-Type: application/json"),
    "no format": (json.dumps({"inputs": [PNG]}).encode(), "application/json", 400, "dataframe_split"),
    "not an image": (_split(["image"], [["aGVsbG8="]]), "application/json", 400, "accepted format"),
    "unknown column": (_split(["other"], [["x"]]), "application/json", 400, "a row may have image"),
    "ragged rows": (_split(["image", "image_path"], [[PNG]]), "application/json", 400, "one value per column"),
    "no image": (_split(["image"], [[None]]), "application/json", 400, "needs an 'image'"),
    "number image": (_split(["image"], [[3]]), "application/json", 400, "must be a string"),
    "not base64": (_split(["image"], [["%%%"]]), "application/json", 400, "accepted format"),
    "prompts not a list": (_split(["image", "prompt_images"], [[PNG, "x"]]), "application/json", 400, "list"),
    "empty prompts": (_split(["image", "prompt_images"], [[PNG, []]]), "application/json", 400, "1 to 8"),
    "nine prompts": (_split(["image", "prompt_images"], [[PNG, [PNG] * 9]]), "application/json", 400, "1 to 8"),
    "no rows": (_split(["image"], []), "application/json", 400, "at least one row"),
    "bad map format": (
        json.dumps({"dataframe_split": {"columns": ["image"], "data": [[PNG]]}, "params": {"map_format": 1}}).encode(),
        "application/json",
        400,
        "map_format",
    ),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_requests_get_4xx_json_and_the_server_stays_up(server: int, case: str) -> None:
    body, content_type, expected_status, needle = MALFORMED[case]
    status, answer, _ = _post(server, body, content_type)
    assert status == expected_status
    assert needle in answer["message"]
    _no_internals(answer)
    assert _ping(server) == 200


def test_rows_megapixels_and_aspect_ratio_are_bounded(server: int, demo_root: Path, demo_category: str) -> None:
    query = _queries(demo_root, demo_category)[0].read_bytes()
    status, answer, _ = _post(server, _payload([query] * 5, map_format="none"))
    assert status == 413
    assert "5 rows; at most 4 are accepted per request (uas serve --max-rows)" in answer["message"]
    status, _, _ = _post(server, _payload([query] * 4, map_format="none"))
    assert status == 200

    large = _encoded(np.zeros((800, 800, 3), np.uint8))  # 0.64 MP each; two exceed the 1 MP per request
    status, answer, _ = _post(server, _payload([large, large], map_format="none"))
    assert status == 413
    assert "more than 1 megapixels, the limit per request (uas serve --max-megapixels)" in answer["message"]
    status, answer, _ = _post(server, _payload([query], prompts=[large, large], map_format="none"))
    assert status == 413
    status, _, _ = _post(server, _payload([large], map_format="none"))
    assert status == 200

    status, answer, _ = _post(server, _payload([_encoded(np.zeros((10, 400, 3), np.uint8))]))
    assert status == 400
    assert "20 times the short side" in answer["message"]
    _no_internals(answer)


def test_body_limit_message_and_boundary(server: int, demo_root: Path, demo_category: str) -> None:
    limit = 2_000_000
    payload = _payload([_queries(demo_root, demo_category)[0].read_bytes()], map_format="none")
    exact = payload[:-1] + b" " * (limit - len(payload)) + payload[-1:]
    assert len(exact) == limit
    status, _, _ = _post(server, exact)
    assert status == 200
    over = http.client.HTTPConnection("127.0.0.1", server, timeout=30)
    over.putrequest("POST", "/invocations")
    over.putheader("Content-Type", "application/json")
    over.putheader("Content-Length", str(limit + 1))
    over.endheaders()  # the answer comes before the body is sent
    answer = over.getresponse()
    assert answer.status == 413
    message = json.loads(answer.read())["message"]
    assert message.startswith(f"The request body has {limit + 1} bytes; at most {limit} are accepted")
    over.close()


def test_formats_outside_the_allow_list_are_refused(server: int) -> None:
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    gif = _encoded(np.zeros((8, 8), np.uint8), "GIF")
    for data in (eps, gif):
        status, answer, _ = _post(server, _payload([data]))
        assert status == 400
        assert "PNG, JPEG, BMP, TIFF, WEBP" in answer["message"]
        _no_internals(answer)


def test_deep_and_float_images_are_scaled_by_their_range(server: int) -> None:
    values = np.random.default_rng(3).integers(0, 256, (64, 64)).astype(np.uint8)
    images = [
        _encoded(values),
        _encoded(values.astype(np.float32), "TIFF", mode="F"),  # 0-255 floats
        _encoded(values.astype(np.float32) / 255, "TIFF", mode="F"),  # 0-1 floats
        _encoded(values.astype(np.uint16) * 257),  # 16-bit PNG
    ]
    status, body, _ = _post(server, _payload(images, map_format="none"))
    assert status == 200
    scores = [row["pred_score"] for row in body["predictions"]]
    assert scores == pytest.approx([scores[0]] * 4, abs=1e-6)
    white = _post(server, _payload([_encoded(np.full((64, 64), 255, np.uint8))], map_format="none"))[1]
    assert abs(white["predictions"][0]["pred_score"] - scores[0]) > 1e-6  # a clipped float image would be white


def test_image_path_only_under_the_root_with_one_answer_for_every_refusal(
    server: int, uas_server: int, image_root: Path
) -> None:
    status, body, _ = _post(server, _paths_payload(["good.png"]))
    assert status == 200
    status, sent, _ = _post(server, _payload([(image_root / "good.png").read_bytes()]))
    assert body["predictions"][0]["pred_score"] == pytest.approx(sent["predictions"][0]["pred_score"], abs=1e-6)

    refused = [
        "/etc/passwd",
        "/etc/does-not-exist",
        "../../../../../etc/passwd",
        "../outside.png",  # exists, outside the root
        "link.png",  # inside the root, links outside
        "missing.png",
        "folder",
        str(image_root / ".." / "outside.png"),
        "good.png\x00.txt",  # a NUL byte
    ]
    answers = []
    for path in refused:
        status, answer, _ = _post(server, _paths_payload([path]))
        assert status == 400, path
        _no_internals(answer)
        answers.append(answer)
    assert all(answer == answers[0] for answer in answers), answers
    for path in ("/etc/passwd", str(image_root / "good.png")):  # a server without a root reads no file
        status, answer, _ = _post(uas_server, _paths_payload([path]))
        assert status == 400
        assert "send the image itself" in answer["message"]


def _raw_request(port: int, length: int = 1000, sent: bytes = b"{") -> socket.socket:
    """A request on a raw connection: the headers of a ``length``-byte body and ``sent`` of it."""
    held = socket.create_connection(("127.0.0.1", port), timeout=30)
    held.sendall(
        b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {length}\r\n\r\n".encode()
        + sent
    )
    return held


def _raw_answer(connection: socket.socket) -> bytes:
    """The status line, headers and JSON body a server sends on a raw connection (until its closing brace)."""
    answer = b""
    while b"}" not in answer and (chunk := connection.recv(4096)):
        answer += chunk
    return answer


def _slow_payload() -> bytes:
    """64 rows of 2 MP gradient PNGs (0.8 MB): seconds to decode."""
    gradient = np.linspace(0, 255, 2000 * 1000, dtype=np.float32).reshape(1000, 2000).astype(np.uint8)
    return _payload([_encoded(np.dstack([gradient] * 3))] * 64, map_format="none")


GRACE_S = 3


@pytest.fixture(scope="module")
def guarded_server(registered: dict, demo_category: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``uas serve CATEGORY`` with one slot, room for the slow payload and a short body grace."""
    folder = tmp_path_factory.mktemp("guarded-serve")
    options = ["--max-in-flight", "1", "--max-rows", "64", "--max-megapixels", "300", "--max-body-mb", "16"]
    process = Server(registered, demo_category, folder, *options, "--body-grace", str(GRACE_S))
    yield process
    process.stop()


def test_requests_beyond_the_in_flight_limit_get_503_with_retry_after(
    guarded_server: Server, demo_root: Path, demo_category: str
) -> None:
    port = guarded_server.port
    small = _payload([_queries(demo_root, demo_category)[0].read_bytes()], map_format="none")
    payload = _slow_payload()
    slow = _raw_request(port, len(payload), payload)
    time.sleep(0.5)  # its body has arrived: it holds the only slot while it is scored
    refused = None
    while refused is None and not select.select([slow], [], [], 0)[0]:
        answer = _post(port, small)
        refused = answer if answer[0] == 503 else None
    assert _raw_answer(slow).startswith(b"HTTP/1.1 200")
    slow.close()
    assert refused is not None, "no request was refused while the slot was busy"
    _, answer, headers = refused
    assert headers.get("Retry-After") == "1"
    assert "--max-in-flight" in answer["message"]
    assert _post(port, small)[0] == 200


def test_slow_bodies_hold_no_slot_and_get_408_after_the_grace(
    guarded_server: Server, demo_root: Path, demo_category: str
) -> None:
    port = guarded_server.port
    payload = _payload([_queries(demo_root, demo_category)[0].read_bytes()], map_format="none")
    started = time.monotonic()
    slow = [_raw_request(port, 100_000) for _ in range(3)]  # more than the slots, trickling below the rate
    status, _, _ = _post(port, payload)
    assert status == 200
    assert time.monotonic() - started < GRACE_S, "the valid request was answered only after the slow bodies left"
    for connection in slow:
        connection.sendall(b"[")
    answers = [_raw_answer(connection) for connection in slow]
    refused = time.monotonic() - started
    closed = [connection.recv(1) == b"" for connection in slow]  # the server closed them
    for connection in slow:
        connection.close()
    for answer in answers:
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"slower than 16 kB/s after its first 3 s (uas serve --min-body-rate, --body-grace)" in answer
    assert GRACE_S <= refused < GRACE_S + 10
    assert all(closed)


def test_bodies_still_arriving_hold_a_bounded_memory(guarded_server: Server) -> None:
    port, limit = guarded_server.port, 16_000_000  # one slot: bodies still arriving hold at most 16 MB together
    held = _raw_request(port, limit - 1000, b" " * 12_000_000)
    time.sleep(1)
    more = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    more.request("POST", "/invocations", b" " * 8_000_000, {"Content-Type": "application/json"})
    answer = more.getresponse()
    assert answer.status == 503
    assert answer.getheader("Retry-After") == "1"
    assert "bytes of request bodies still arriving" in json.loads(answer.read())["message"]
    more.close()
    held.close()
    deadline = time.monotonic() + 10
    while (status := _post(port, _split(["image"], [[PNG]]))[0]) == 503 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert status == 200


def _memory_kb(pid: int, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak since the last reset) of a process, in kB."""
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith(field))
    return int(line.split()[1])


def test_a_body_of_millions_of_rows_is_refused_before_parsing_in_bounded_memory(
    guarded_server: Server, demo_root: Path, demo_category: str
) -> None:
    pid, limit = guarded_server.process.pid, 16_000_000
    head, tail = b'{"dataframe_split": {"columns": ["image"], "data": [', b'[""]]}}'
    body = head + b'[""],' * ((limit - len(head) - len(tail)) // 5) + tail  # 3.2 million rows
    idle = _memory_kb(pid, "VmRSS")
    Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    started = time.monotonic()
    connection = http.client.HTTPConnection("127.0.0.1", guarded_server.port, timeout=30)  # keep-alive
    connection.request("POST", "/invocations", body, {"Content-Type": "application/json"})
    answer = connection.getresponse()  # refused as the body arrives, read after it is sent
    elapsed = time.monotonic() - started
    growth = (_memory_kb(pid, "VmHWM") - idle) * 1024
    assert answer.status == 413
    assert "at most 64 rows are accepted per request (uas serve --max-rows)" in json.loads(answer.read())["message"]
    connection.close()
    assert elapsed < 10
    assert growth < 1.5 * len(body), f"peak RSS grew by {growth / 1e6:.0f} MB for a {len(body) / 1e6:.0f} MB body"
    query = _queries(demo_root, demo_category)[0].read_bytes()
    assert _post(guarded_server.port, _payload([query], map_format="none"))[0] == 200


def test_work_stops_when_a_request_times_out_or_its_client_leaves_and_slow_bodies_time_out(
    registered: dict, demo_category: str, tmp_path: Path
) -> None:
    options = ["--timeout", "0.3", "--max-rows", "64", "--max-megapixels", "300", "--max-body-mb", "64"]
    process = Server(registered, demo_category, tmp_path, *options)
    try:
        payload = _slow_payload()  # 128 MP to decode
        started = time.monotonic()
        status, answer, _ = _post(process.port, payload)
        assert status == 504
        assert "--timeout" in answer["message"]
        assert time.monotonic() - started < 5

        left = socket.create_connection(("127.0.0.1", process.port))
        left.sendall(
            b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        time.sleep(0.1)
        left.close()
        time.sleep(3)
        assert _ping(process.port) == 200

        held = _raw_request(process.port)  # a body that never arrives is refused after the timeout
        answer = _raw_answer(held)
        held.close()
        assert answer.startswith(b"HTTP/1.1 408")
        assert b"did not arrive within 0.3 s" in answer
    finally:
        log = process.stop()
    stopped = [line for line in log.splitlines() if "Stopped the work" in line]
    assert len(stopped) == 2, log[-3000:]
    assert all(int(line.split(" after ")[1].split(" of ")[0]) < 64 for line in stopped)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--port", "99999", "--port must be 1 to 65535, got 99999."),
        ("--port", "0", "--port must be 1 to 65535, got 0."),
        ("--timeout", "nan", "--timeout must be a finite number above 0, got nan."),
        ("--timeout", "inf", "--timeout must be a finite number above 0, got inf."),
        ("--timeout", "-1", "--timeout must be a finite number above 0, got -1.0."),
        ("--max-body-mb", "inf", "--max-body-mb must be a finite number above 0, got inf."),
        ("--body-grace", "nan", "--body-grace must be a finite number above 0, got nan."),
        ("--min-body-rate", "0", "--min-body-rate must be a finite number above 0, got 0.0."),
        ("--max-rows", "0", "--max-rows must be a finite number above 0, got 0."),
    ],
)
def test_uas_serve_refuses_bad_options_in_one_line(
    option: str, value: str, message: str, capsys: pytest.CaptureFixture
) -> None:
    assert main(["serve", "brick", option, value]) == 2
    assert capsys.readouterr().err == f"uas serve: error: {message}\n"


def test_uas_serve_on_a_port_in_use_is_one_line_before_the_model_loads(
    registered: dict, demo_category: str, capsys: pytest.CaptureFixture
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        started = time.monotonic()
        assert main(["serve", demo_category, "--port", str(port)]) == 2
        assert time.monotonic() - started < 10  # no model loaded
    error = capsys.readouterr().err
    expected = f"Cannot listen on 127.0.0.1:{port}: Address already in use. Choose another --port or --host."
    assert error == f"uas serve: error: {expected}\n"


def test_uas_serve_answers_inctrl_with_its_prompt_override(
    uas_server: int, reference: Any, registered: dict, demo_root: Path, demo_category: str
) -> None:
    query = _queries(demo_root, demo_category)[0]
    status, body, _ = _post(uas_server, _payload([query.read_bytes()], map_format="png"))
    assert status == 200
    row = body["predictions"][0]
    assert row["pred_score"] == pytest.approx(float(reference("inctrl", query).pred_score[0]), abs=1e-5)
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(row["anomaly_map"])))).shape == (240, 240)
    prompts = registered["normal"][-2:]
    status, body, _ = _post(uas_server, _payload([query.read_bytes()], [p.read_bytes() for p in prompts], "none"))
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
    assert json.loads(answer.read())["message"].startswith(f"The request body has {10**10} bytes; at most 500000")
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
    assert "more than 500000 bytes" in json.loads(answer.read())["message"]
    streamed.close()
    assert _ping(uas_server) == 200


def test_bounded_load_has_no_server_errors(uas_server: int, demo_root: Path, demo_category: str) -> None:
    payload = _payload([_queries(demo_root, demo_category)[0].read_bytes()], map_format="none")
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(pool.map(lambda _: _post(uas_server, payload)[0], range(80)))
    assert statuses == [200] * 80


@pytest.fixture(scope="module")
def champion(registered: dict, demo_category: str) -> Any:
    mlflow.set_tracking_uri(registered["uri"])
    return mlflow.pyfunc.load_model(f"models:/{registry.registered_name(demo_category)}@champion")


def test_concurrent_requests_are_micro_batched_with_unchanged_results(
    champion: Any, demo_root: Path, demo_category: str
) -> None:
    model = champion.unwrap_python_model()
    queries = _queries(demo_root, demo_category)
    frames = [pd.DataFrame({"image": [query.read_bytes()]}) for query in queries]
    alone = [float(champion.predict(frame, params={"map_format": "none"})["pred_score"][0]) for frame in frames]
    batches, forward = [], model.batcher.forward

    def recording(images: torch.Tensor) -> Any:
        batches.append(len(images))
        time.sleep(0.05)  # a slow forward, so that the other requests queue behind it
        return forward(images)

    model.batcher.forward = recording
    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            together = list(
                pool.map(lambda i: champion.predict(frames[i % 3], params={"map_format": "none"}), range(16))
            )
    finally:
        model.batcher.forward = forward
    assert sum(batches) == 16
    assert max(batches) > 1
    for index, result in enumerate(together):
        assert float(result["pred_score"][0]) == pytest.approx(alone[index % 3], abs=1e-6)


def test_spark_udf_equals_in_process_predictions(registered: dict, demo_root: Path, demo_category: str) -> None:
    pyspark = pytest.importorskip("pyspark.sql")
    spark = pyspark.SparkSession.builder.master("local[2]").appName("uas-test").getOrCreate()
    try:
        mlflow.set_tracking_uri(registered["uri"])
        uri = f"models:/{registry.registered_name(demo_category)}@champion"
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
