"""The face models' torch rebuilds: every tensor of the pinned files loads where it belongs, the
layers are set as trained (BatchNorm eps, TensorFlow's 'same' padding, leaky slopes), and the
exported wrappers compute the preprocessing and decoding they promise."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from export.cli import main as export_main
from export.retinaface import BGR_MEAN, RetinaFace, RetinaFaceDetector, load_retinaface, priors
from export.weights import WEIGHTS, fetch
from export.xception import (
    EXPRESSION_LABELS,
    FILE_CLASSES,
    ExpressionClassifier,
    KerasMaxPool2d,
    _same_padding,
    load_mini_xception,
)
from tests.fixtures import write_fake_entry
from visionserve.tasks.faces import EXPRESSIONS


@pytest.fixture(scope="module")
def retinaface_file() -> Path:
    return fetch(WEIGHTS["retinaface_mnet025"])


@pytest.fixture(scope="module")
def xception_file() -> Path:
    return fetch(WEIGHTS["mini_xception"])


# --- RetinaFace-MobileNet0.25 ---------------------------------------------------------------------


def test_every_retinaface_tensor_loads_into_its_place(retinaface_file: Path) -> None:
    state = torch.load(retinaface_file, map_location="cpu", weights_only=True)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    net = load_retinaface(str(retinaface_file))
    loaded = net.state_dict()
    assert set(loaded) == set(state) and len(state) == 300
    for key, tensor in state.items():
        assert torch.equal(loaded[key], tensor), key


def test_retinaface_layers_are_set_as_published() -> None:
    net = RetinaFace()
    slopes = {m.negative_slope for m in net.modules() if isinstance(m, nn.LeakyReLU)}
    assert slopes == {0.1}  # out_channel 64 <= 64: leaky everywhere, backbone included
    assert not any(isinstance(m, nn.LeakyReLU) for m in net.ssh1.conv3X3)  # no activation there
    depthwise = net.body.stage1[1][0]
    assert isinstance(depthwise, nn.Conv2d) and depthwise.groups == 8 and depthwise.stride == (1, 1)
    stages = (net.body.stage1, net.body.stage2, net.body.stage3)
    strides = [block[0].stride[0] for stage in stages for block in stage]
    assert strides == [2, 1, 2, 1, 2, 1, 2, 1, 1, 1, 1, 1, 2, 1]  # features at strides 8, 16, 32
    features = net.body(torch.zeros(1, 3, 640, 640))
    assert [tuple(f.shape[1:]) for f in features] == [(64, 80, 80), (128, 40, 40), (256, 20, 20)]


def test_priors_at_640() -> None:
    anchors = priors(640, 640)
    assert anchors.shape == (16800, 4)  # 2 x (80^2 + 40^2 + 20^2)
    expected_first = [[4, 4, 16, 16], [4, 4, 32, 32], [12, 4, 16, 16], [12, 4, 32, 32]]
    assert anchors[:4].tolist() == expected_first
    assert anchors[160].tolist() == [4, 12, 16, 16]  # the second row of cells
    assert anchors[12800].tolist() == [8, 8, 64, 64]  # stride 16 starts
    assert anchors[16000].tolist() == [16, 16, 256, 256]  # stride 32 starts
    assert anchors[-1].tolist() == [624, 624, 512, 512]


class _Recorder(nn.Module):
    """Stands in for a network: records its input, answers fixed outputs."""

    def __init__(self, outputs: object) -> None:
        super().__init__()
        self.outputs = outputs
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> object:
        self.seen = x
        return self.outputs


def test_the_detector_wrapper_preprocesses_as_trained_and_decodes_in_pixels() -> None:
    size = 64
    count = len(priors(size, size))
    offsets = torch.zeros(1, count, 4)
    offsets[0, 0] = torch.tensor([1.0, -1.0, 0.0, 5.0])  # moves the centre, widens the height
    marks = torch.zeros(1, count, 10)
    marks[0, 0, 2:4] = torch.tensor([2.0, 3.0])
    logits = torch.zeros(1, count, 2)
    logits[0, 0] = torch.tensor([0.0, np.log(3.0)])  # face probability 3 / (1 + 3)
    net = _Recorder((offsets, logits, marks))
    detector = RetinaFaceDetector(net, (size, size))  # type: ignore[arg-type]
    image = torch.zeros(1, 3, size, size)
    image[:, 0], image[:, 1], image[:, 2] = 1.0, 0.5, 0.0  # RGB
    out = detector(image)
    assert out.shape == (1, count, 15)
    assert net.seen is not None
    bgr = net.seen[0, :, 0, 0].tolist()  # x 255, RGB -> BGR, minus (104, 117, 123)
    assert bgr == pytest.approx([0.0 - BGR_MEAN[0], 127.5 - BGR_MEAN[1], 255.0 - BGR_MEAN[2]])
    first = out[0, 0].tolist()  # prior (4, 4, 16, 16)
    assert first[:4] == pytest.approx([4 + 0.1 * 16, 4 - 0.1 * 16, 16.0, 16 * np.exp(0.2 * 5)], rel=1e-5)
    assert first[4] == pytest.approx(0.75)
    assert first[5:7] == pytest.approx([4.0, 4.0])
    assert first[7:9] == pytest.approx([4 + 0.1 * 16 * 2, 4 + 0.1 * 16 * 3])
    second = out[0, 1].tolist()  # zero offsets: the prior itself, probability 1/2, points at its centre
    assert second[:5] == pytest.approx([4.0, 4.0, 32.0, 32.0, 0.5])
    assert second[5:] == pytest.approx([4.0, 4.0] * 5)


# --- Mini-Xception ---------------------------------------------------------------------------------


def _h5_tensors(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f["model_weights"].visititems(
            lambda name, obj: found.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None
        )
    return found


def test_every_mini_xception_tensor_loads_converted_to_torch_layouts(xception_file: Path) -> None:
    net, _ = load_mini_xception(xception_file)
    state = net.state_dict()
    tensors = _h5_tensors(xception_file)
    weights = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(tensors) == len(weights) == 80  # 14 BN x 4, 8 Conv2D, 8 x 2 separable
    assert sum(a.size for a in tensors.values()) == sum(t.numel() for t in weights.values())
    kernel = tensors["conv2d_1/conv2d_1_1/kernel:0"]  # (kh, kw, in, out)
    torch_kernel = state["layers.conv2d_1.conv.weight"].numpy()  # (out, in, kh, kw)
    assert torch_kernel.shape == (8, 1, 3, 3) and torch_kernel[5, 0, 2, 1] == kernel[2, 1, 0, 5]
    depthwise = tensors["separable_conv2d_3/separable_conv2d_3_1/depthwise_kernel:0"]  # (kh, kw, in, 1)
    torch_depthwise = state["layers.separable_conv2d_3.depthwise.weight"].numpy()  # (in, 1, kh, kw)
    assert torch_depthwise.shape == (16, 1, 3, 3) and torch_depthwise[7, 0, 0, 2] == depthwise[0, 2, 7, 0]
    assert net.layers["separable_conv2d_3"].depthwise.groups == 16
    variance = tensors["batch_normalization_9/batch_normalization_9_1/moving_variance:0"]
    assert np.array_equal(state["layers.batch_normalization_9.running_var"].numpy(), variance)
    head_bias = tensors["conv2d_7/conv2d_7_1/bias:0"]
    assert np.array_equal(state["layers.conv2d_7.conv.bias"].numpy(), head_bias)


def test_mini_xception_is_the_published_design_with_keras_settings(xception_file: Path) -> None:
    net, config = load_mini_xception(xception_file)
    kinds = [step.kind for step in net.steps]
    counts = {kind: kinds.count(kind) for kind in set(kinds)}
    assert counts == {
        "InputLayer": 1,
        "Conv2D": 7,  # 2 base, 4 residual shortcuts, the 7-class head
        "SeparableConv2D": 8,  # 2 per module, 4 modules
        "BatchNormalization": 14,
        "Activation": 7,  # 6 relu + softmax
        "MaxPooling2D": 4,
        "Add": 4,
        "GlobalAveragePooling2D": 1,
    }
    layers = [layer["config"] for layer in config["config"]["layers"]]
    epsilons = {layer["epsilon"] for layer in layers if "epsilon" in layer}
    assert epsilons == {0.001}
    assert {m.eps for m in net.modules() if isinstance(m, nn.BatchNorm2d)} == {0.001}
    assert net.input_shape == (64, 64, 1)
    probs = net(torch.zeros(2, 1, 64, 64))
    assert probs.shape == (2, 7) and torch.allclose(probs.sum(dim=1), torch.ones(2))


@pytest.mark.parametrize(
    ("size", "kernel", "stride", "expected"),
    [(60, 3, 2, (0, 1)), (15, 3, 2, (1, 1)), (8, 3, 2, (0, 1)), (64, 3, 1, (1, 1)), (60, 1, 2, (0, 0))],
)
def test_tensorflow_same_padding_puts_the_odd_pixel_after(
    size: int, kernel: int, stride: int, expected: tuple[int, int]
) -> None:
    assert _same_padding(size, kernel, stride) == expected


def test_same_max_pooling_pads_bottom_right_with_minus_infinity() -> None:
    pool = KerasMaxPool2d({"pool_size": [3, 3], "strides": [2, 2], "padding": "same"})
    x = torch.arange(16, dtype=torch.float32).reshape(1, 1, 4, 4)
    assert pool(x)[0, 0].tolist() == [[10, 11], [14, 15]]  # padded top/left, it would be [[5, 7], ...]
    assert pool(-1 - x)[0, 0].tolist() == [[-1, -3], [-9, -11]]  # the padding never wins


def test_the_expression_wrapper_makes_bt601_grey_in_minus_one_to_one() -> None:
    net = _Recorder(torch.zeros(1, 7))
    classifier = ExpressionClassifier(net)
    image = torch.zeros(3, 3, 64, 64)
    image[0, 0] = 1.0  # pure red
    image[1] = 1.0  # white
    image[2, 1], image[2, 2] = 0.5, 0.25  # black red, half green, quarter blue
    classifier(image)
    assert net.seen is not None and net.seen.shape == (3, 1, 64, 64)
    grey = net.seen[:, 0, 0, 0].tolist()
    assert grey == pytest.approx([2 * 0.299 - 1, 1.0, 2 * (0.587 * 0.5 + 0.114 * 0.25) - 1], abs=1e-6)


def test_expression_labels_are_the_files_classes_by_seed_names() -> None:
    assert FILE_CLASSES == ("angry", "disgust", "fear", "happy", "sad", "surprise", "neutral")
    assert EXPRESSION_LABELS == ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")
    assert sorted(EXPRESSION_LABELS) == sorted(EXPRESSIONS)


# --- the pipeline entry --------------------------------------------------------------------------


def test_the_pipeline_refuses_stages_that_do_not_fit(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_fake_entry(tmp_path, "retinaface_mnet025", classes=1)  # a classifier, not a face detector
    write_fake_entry(tmp_path, "mini_xception", classes=7)
    assert export_main(["--model", "face_expression", "--repository", str(tmp_path)]) == 1
    assert "not a face detector with 5 landmarks" in capsys.readouterr().err
    assert not (tmp_path / "face_expression" / "config.json").exists()
    assert export_main(["--model", "face_expression", "--repository", str(tmp_path), "--name", "x"]) == 2


def test_the_pipeline_config_names_its_stages(tmp_path: Path) -> None:
    from visionserve.repository import ModelRepository

    write_fake_entry(
        tmp_path,
        "retinaface_mnet025",
        classes=1,
        task="detection",
        input={"name": "images", "size": [64, 64], "fit": "letterbox", "pad_value": 117},
        output={"name": "predictions", "kind": "boxes", "classes": 1, "landmarks": 5},
    )
    (tmp_path / "retinaface_mnet025" / "labels.txt").write_text("face\n")
    classifier = write_fake_entry(tmp_path, "mini_xception", classes=7)
    (classifier.root / "labels.txt").write_text("\n".join(EXPRESSION_LABELS) + "\n")
    assert export_main(["--model", "face_expression", "--repository", str(tmp_path)]) == 0
    raw = json.loads((tmp_path / "face_expression" / "config.json").read_text())
    assert raw["task"] == "face_expression" and "artefacts" not in raw
    pipeline = ModelRepository(tmp_path).get_pipeline("face_expression").config
    assert (pipeline.stages.detector, pipeline.stages.classifier) == ("retinaface_mnet025", "mini_xception")
    faces = pipeline.faces
    assert (faces.score_threshold, faces.min_face_size, faces.max_faces, faces.margin) == (0.5, 0, 32, 0.2)
    assert export_main(["--model", "face_expression", "--repository", str(tmp_path)]) == 1  # exists
    assert export_main(["--model", "face_expression", "--repository", str(tmp_path), "--force"]) == 0
