"""torchvision checkpoints load into our models with identical logits; mismatches fail clearly."""

import os
import re
import urllib.error
from pathlib import Path

import pytest
import torch
import torchvision

from mnv3.models import mobilenet_v2, mobilenet_v3_large, mobilenet_v3_small
from mnv3.models.checkpoints import (
    KNOWN_WEIGHTS,
    CheckpointError,
    load_checkpoint_file,
    load_weights,
    read_checkpoint,
    save_state_dict,
)

PAIRS = {
    "mobilenet_v3_large": (mobilenet_v3_large, torchvision.models.mobilenet_v3_large),
    "mobilenet_v3_small": (mobilenet_v3_small, torchvision.models.mobilenet_v3_small),
    "mobilenet_v2": (mobilenet_v2, torchvision.models.mobilenet_v2),
}


def _randomise_bn(model: torch.nn.Module) -> None:
    """Random BN statistics and affine terms, so a swapped BN would change the logits."""
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(m.num_features, generator=g) - 0.5)


@pytest.fixture(scope="module")
def tv_checkpoints(tmp_path_factory) -> dict[str, tuple[Path, torch.nn.Module]]:
    out = {}
    root = tmp_path_factory.mktemp("tv")
    for name, (_, tv_build) in PAIRS.items():
        torch.manual_seed(0)
        model = tv_build().eval()
        _randomise_bn(model)
        path = root / f"{name}.pth"
        torch.save(model.state_dict(), path)
        out[name] = (path, model)
    return out


@pytest.mark.parametrize("name", PAIRS)
def test_torchvision_weights_give_identical_logits(name, tv_checkpoints) -> None:
    path, reference = tv_checkpoints[name]
    ours = PAIRS[name][0](weights=str(path)).eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        diff = (ours(x) - reference(x)).abs().max().item()
    assert diff <= 1e-5


@pytest.mark.parametrize("name", PAIRS)
def test_other_class_count_keeps_backbone_and_reinitialises_logits(name, tv_checkpoints) -> None:
    path, reference = tv_checkpoints[name]
    model = PAIRS[name][0](num_classes=3)
    report = load_weights(model, path)
    assert report.format == "torchvision"
    assert report.reinitialized == ["classifier.fc.weight", "classifier.fc.bias"]
    assert model.classifier.fc.out_features == 3
    ref_stem = reference.state_dict()["features.0.0.weight"]
    assert torch.equal(model.stem.conv.weight, ref_stem)
    if model.classifier.pre_logits is not None:  # V3's hidden 1x1 layer is kept
        assert torch.equal(model.classifier.pre_logits.weight, reference.classifier[0].weight)
    # Backbone features equal torchvision's.
    model.eval()
    x = torch.randn(1, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(model.forward_features(x), reference.features(x), atol=1e-5)


def test_backbone_without_classifier_ignores_classifier_keys(tv_checkpoints) -> None:
    path, _ = tv_checkpoints["mobilenet_v3_large"]
    backbone = mobilenet_v3_large(num_classes=0)
    report = load_weights(backbone, path)
    assert report.ignored and all(k.startswith("classifier.") for k in report.ignored)
    assert backbone.classifier is None


def test_wrong_architecture_names_first_missing_and_unexpected_keys(tv_checkpoints) -> None:
    path, _ = tv_checkpoints["mobilenet_v3_large"]
    with pytest.raises(CheckpointError) as info:
        mobilenet_v3_small(weights=str(path))
    msg = str(info.value)
    assert "does not fit mobilenet_v3_small" in msg
    assert "first 'blocks.0.se.reduce.weight'" in msg  # missing: Small's first block has SE
    assert "unexpected, first 'features." in msg
    assert "\n" not in msg


def test_width_mismatch_names_the_first_mis_shaped_key(tv_checkpoints) -> None:
    path, _ = tv_checkpoints["mobilenet_v3_large"]
    with pytest.raises(
        CheckpointError, match=r"of another shape, first 'blocks\.3\.project\.conv\.weight'"
    ):
        mobilenet_v3_large(width_mult=0.75, weights=str(path))


def test_own_checkpoints_round_trip_with_weights_only(tmp_path) -> None:
    model = mobilenet_v3_small(num_classes=7).eval()
    _randomise_bn(model)
    path = save_state_dict(model, tmp_path / "sub" / "small.pth")
    assert not list(path.parent.glob(".small.pth.*")), "temporary file left behind"
    torch.load(path, weights_only=True)  # plain tensors only
    again = mobilenet_v3_small(num_classes=7, weights=str(path)).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


def test_lightning_style_checkpoint_is_unwrapped(tmp_path) -> None:
    model = mobilenet_v3_small(num_classes=5)
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "epoch": 3}
    torch.save(ckpt, tmp_path / "last.ckpt")
    state = read_checkpoint(tmp_path / "last.ckpt")
    assert set(state) == set(model.state_dict())


def test_pickled_code_is_refused(tmp_path) -> None:
    torch.save({"model": torch.nn.Linear(2, 2)}, tmp_path / "evil.pth")  # a module, not tensors
    with pytest.raises(CheckpointError, match=r"holds a pickled .*Linear, refused for safety"):
        read_checkpoint(tmp_path / "evil.pth")


def test_missing_file_is_one_clear_sentence(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint file .*nope\.pth does not exist"):
        mobilenet_v3_large(weights=str(tmp_path / "nope.pth"))


def test_file_url_goes_through_torch_hub_cache(tmp_path, monkeypatch, tv_checkpoints) -> None:
    path, reference = tv_checkpoints["mobilenet_v3_small"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    model = mobilenet_v3_small(weights=path.as_uri()).eval()
    assert (tmp_path / "torch_home" / "hub" / "checkpoints" / path.name).is_file()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-5)


@pytest.mark.parametrize("name", sorted(KNOWN_WEIGHTS))
def test_known_weights_agree_with_torchvision_tables(name) -> None:
    entry = KNOWN_WEIGHTS[name]
    arch, tag = name.split(".")
    enum = torchvision.models.get_model_weights(arch)[tag]
    assert entry.url == enum.url
    assert entry.num_params == enum.meta["num_params"]
    if "box_map" in entry.metrics:  # a COCO detector
        assert entry.metrics["box_map"] == enum.meta["_metrics"]["COCO-val2017"]["box_map"]
        return
    assert entry.metrics["acc1"] == enum.meta["_metrics"]["ImageNet-1K"]["acc@1"]
    tf = enum.transforms()
    assert entry.preprocessing.resize_size == tf.resize_size[0]
    assert entry.preprocessing.crop_size == tf.crop_size[0]
    assert entry.preprocessing.mean == tuple(tf.mean)
    assert entry.preprocessing.interpolation == tf.interpolation.value


def test_known_weights_for_another_arch_are_refused() -> None:
    with pytest.raises(CheckpointError, match="are for mobilenet_v2, not mobilenet_v3_large"):
        mobilenet_v3_large(weights="mobilenet_v2.IMAGENET1K_V1")
    assert KNOWN_WEIGHTS["mobilenet_v3_large.IMAGENET1K_V1"].metrics["acc1"] == 74.042
    assert KNOWN_WEIGHTS["mobilenet_v3_large.IMAGENET1K_V2"].metrics["acc1"] == 75.274
    assert KNOWN_WEIGHTS["mobilenet_v3_small.IMAGENET1K_V1"].metrics["acc1"] == 67.668


# --- gray (1-channel) models: RGB stems summed into one input channel ---------------------------


@pytest.mark.parametrize("name", PAIRS)
def test_rgb_checkpoint_into_gray_model_gives_identical_logits(name, tv_checkpoints) -> None:
    """conv(replicate(g), W) == conv(g, W.sum(1)): the 1-channel model matches on gray input."""
    path, reference = tv_checkpoints[name]
    rgb = PAIRS[name][0](weights=str(path)).eval()
    gray = PAIRS[name][0](in_channels=1).eval()
    report = load_weights(gray, path)
    assert report.adapted and report.adapted[0].startswith("stem.conv.weight")
    assert gray.stem.conv.weight.shape[1] == 1
    g = torch.rand(1, 1, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits_rgb = rgb(g.expand(-1, 3, -1, -1))
        logits_gray = gray(g)
        assert (logits_rgb - logits_gray).abs().max().item() <= 1e-5
        assert (logits_rgb - reference(g.expand(-1, 3, -1, -1))).abs().max().item() <= 1e-5


def test_rgb_model_loads_rgb_checkpoint_without_adaptation(tv_checkpoints) -> None:
    path, _ = tv_checkpoints["mobilenet_v3_small"]
    assert load_weights(mobilenet_v3_small(), path).adapted == []


def test_gray_checkpoint_into_rgb_model_names_the_stem_key(tmp_path) -> None:
    path = save_state_dict(mobilenet_v3_small(in_channels=1), tmp_path / "gray.pth")
    with pytest.raises(CheckpointError, match=r"'stem\.conv\.weight'.*\(16, 1, 3, 3\)"):
        load_weights(mobilenet_v3_small(), path)


def test_gray_checkpoint_round_trips_into_gray_model(tmp_path) -> None:
    source = mobilenet_v3_small(in_channels=1, num_classes=4).eval()
    path = save_state_dict(source, tmp_path / "gray.pth")
    target = mobilenet_v3_small(in_channels=1, num_classes=4, weights=str(path)).eval()
    x = torch.randn(1, 1, 96, 96)
    with torch.no_grad():
        assert torch.equal(source(x), target(x))


def _broken_files(root: Path) -> dict[str, Path]:
    """An empty file, half a torch.save archive, a text file and a pickle that runs code."""
    good = root / "good.pth"
    torch.save(mobilenet_v3_small(num_classes=3).state_dict(), good)
    files = {"empty": root / "empty.pth", "truncated": root / "truncated.pth"}
    files["empty"].touch()
    files["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    files["text"] = root / "notes.pth"
    files["text"].write_text("these are my notes, not a checkpoint\n")
    files["unsafe"] = root / "unsafe.pth"
    torch.save({"x": _RunsCode()}, files["unsafe"])
    return files


class _RunsCode:
    """Unpickling this calls ``os.system``: what a malicious checkpoint would do."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize(
    ("kind", "says"),
    [
        ("empty", r"is empty \(0 bytes\)"),
        ("truncated", r"is truncated or corrupt \([\d,]+ bytes, an incomplete zip archive\)"),
        ("text", r"is not a PyTorch checkpoint"),
        ("unsafe", r"holds a pickled \S*system, refused for safety"),
    ],
)
def test_broken_checkpoint_is_one_sentence_without_unsafe_advice(tmp_path, kind, says) -> None:
    path = _broken_files(tmp_path)[kind]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint_file(path)
    message = str(info.value)
    assert re.search(says, message) and str(path) in message, message
    assert "\n" not in message and "weights_only" not in message  # never "retry unsafely"
    with pytest.raises(CheckpointError, match=says):  # the backbone.weights path says the same
        mobilenet_v3_small(weights=str(path))


def test_known_weights_offline_say_where_to_put_the_file(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_network(url, dst, *args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    name = "mobilenet_v3_small.IMAGENET1K_V1"
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / "mobilenet_v3_small-047dcff4.pth"
    with pytest.raises(CheckpointError) as info:
        mobilenet_v3_small(weights=name)
    message = str(info.value)
    assert f"could not download {name}" in message and "name resolution" in message
    assert f"put that file at {cached}" in message and "$TORCH_HOME/hub/checkpoints" in message
    assert "local copy" in message and "\n" not in message

    # Following the advice works without the network: the cached file is read, nothing downloaded.
    model = mobilenet_v3_small()
    save_state_dict(model, cached)
    loaded = mobilenet_v3_small(weights=name)
    assert torch.equal(loaded.stem.conv.weight, model.stem.conv.weight)
