"""Block tables as data: YAML backbone files, config validation, and checkpoints that carry them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import QUIET, TINY_DATA, compose_train
from mnv3.cli import CONFIG_DIR
from mnv3.models import build_backbone, count_params
from mnv3.models.block_table import (
    BlockTableError,
    load_backbone_file,
    save_backbone_file,
    table_from_plain,
    table_to_plain,
)
from mnv3.models.mobilenetv3 import MOBILENET_V3_LARGE, MOBILENET_V3_SMALL, V3Table


def _same_network(a: torch.nn.Module, b: torch.nn.Module) -> None:
    """Identical parameter names and shapes (strict load), then identical outputs."""
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    a.eval(), b.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


@pytest.mark.parametrize("table", [MOBILENET_V3_LARGE, MOBILENET_V3_SMALL])
def test_a_table_file_round_trips_and_builds_the_named_network(
    tmp_path: Path, table: V3Table
) -> None:
    path = save_backbone_file(table, tmp_path / "net.yaml", width_mult=1.0)
    assert load_backbone_file(path) == table
    assert table_from_plain(table_to_plain(table)) == table
    from_file = build_backbone("mobilenet_v3", table=table_to_plain(table), num_classes=10)
    named = build_backbone(table.name, num_classes=10)
    assert count_params(from_file) == count_params(named)
    _same_network(named, from_file)


def test_the_shipped_small_table_file_is_small(tmp_path: Path) -> None:
    assert load_backbone_file(CONFIG_DIR / "backbone" / "small_table.yaml") == MOBILENET_V3_SMALL
    cfg = compose_train(tmp_path, ["backbone=small_table"])
    assert cfg.backbone.name == "mobilenet_v3" and cfg.backbone.table.name == "mobilenet_v3_small"


@pytest.mark.parametrize(
    ("edit", "sentence"),
    [
        (lambda t: t["rows"][0].__setitem__(0, 4), "table.rows[0]: kernel=4; expected 3, 5 or 7"),
        (lambda t: t["rows"][2].__setitem__(4, "SW"), "table.rows[2]: nl='SW'; expected RE"),
        (lambda t: t["rows"][1].__setitem__(5, 3), "table.rows[1]: stride=3; expected 1 or 2"),
        (lambda t: t["rows"][1].__setitem__(1, 0), "table.rows[1]: exp=0 is not a width"),
        (lambda t: t["rows"].__setitem__(3, [5, 96]), "table.rows[3]=[5, 96] is not a bneck row"),
        (lambda t: t.pop("last"), "table has no last; expected the keys"),
        (lambda t: t.__setitem__("depth", 3), "table has unknown depth; expected the keys"),
        (lambda t: t.__setitem__("rows", []), "table.rows=[]; expected a non-empty list"),
    ],
)
def test_a_bad_table_is_one_sentence_naming_the_row(edit, sentence: str) -> None:
    plain = table_to_plain(MOBILENET_V3_SMALL)
    edit(plain)
    with pytest.raises(BlockTableError) as info:
        table_from_plain(plain)
    assert sentence in str(info.value) and "\n" not in str(info.value)


def test_a_table_run_reloads_from_its_checkpoint_without_the_file(tmp_path: Path) -> None:
    """Train on a table given only on the command line; the checkpoint alone rebuilds it."""
    from mnv3.train import train
    from mnv3.trained_run import TrainedRun

    searched = V3Table("searched", MOBILENET_V3_SMALL.rows[:-2], stem=16, last=256, head=512)
    rows = (
        "["
        + ",".join(
            f"[{r.kernel},{r.exp},{r.out},{str(r.se).lower()},{r.nl},{r.s}]" for r in searched.rows
        )
        + "]"
    )
    table = f"{{name:searched,stem:16,last:256,head:512,rows:{rows}}}"
    overrides = [*TINY_DATA, *QUIET, "backbone=small_table", f"backbone.table={table}"]
    cfg = compose_train(tmp_path, [*overrides, "trainer.max_epochs=1"])
    train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "best.ckpt"
    hparams = torch.load(ckpt, weights_only=True, map_location="cpu")["hyper_parameters"]
    assert table_from_plain(hparams["model"]["table"]) == searched  # plain types, in the file
    run = TrainedRun.open(ckpt)
    net = run.network.eval()
    assert net.arch.name == "searched" and net.arch.num_blocks == len(searched.rows)
    _same_network(net, build_backbone(searched, num_classes=6, dropout=0.2))


def test_table_configs_are_checked_before_any_data_is_read(tmp_path: Path) -> None:
    from mnv3.errors import ConfigError
    from mnv3.validate import check_backbone_keys

    bad = compose_train(tmp_path, ["backbone=small_table", "backbone.table.rows.0.0=4"])
    with pytest.raises(ConfigError, match=r"^backbone.table.rows\[0\]: kernel=4; expected 3, 5"):
        check_backbone_keys(bad)
    missing = compose_train(tmp_path, ["backbone.name=mobilenet_v3"])
    with pytest.raises(ConfigError, match=r"backbone\.name=mobilenet_v3 has no backbone\.table"):
        check_backbone_keys(missing)


@pytest.mark.parametrize(
    ("head", "data"),
    [("ssdlite", "shapes_coco"), ("lraspp", "shapes_cityscapes"), ("raspp", "shapes_cityscapes")],
)
def test_detection_and_segmentation_heads_take_a_table(
    tmp_path: Path, head: str, data: str
) -> None:
    """SSDLite, LR-ASPP and R-ASPP on Small written as a table are the same networks as on
    ``backbone=small``: the same parameters, shape for shape, and the same outputs once one's
    weights are loaded into the other; the table travels in the builder arguments."""
    from mnv3.cli import model_kwargs
    from mnv3.tasks import TASKS

    nets = []
    for backbone in ("small_table", "small"):
        cfg = compose_train(tmp_path, [f"backbone={backbone}", f"head={head}", f"data={data}"])
        kwargs = model_kwargs(cfg)
        assert ("table" in kwargs) == (backbone == "small_table")
        nets.append(TASKS[cfg.head.task].network(kwargs, num_classes=3).eval())
    table_net, named = nets
    assert {k: v.shape for k, v in table_net.state_dict().items()} == {
        k: v.shape for k, v in named.state_dict().items()
    }
    table_net.load_state_dict(named.state_dict())
    x = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        if head == "ssdlite":  # raw class logits and box regressions of every anchor
            a, b = table_net.forward_batch(x), named.forward_batch(x)
            assert torch.equal(a["cls_logits"], b["cls_logits"])
            assert torch.equal(a["bbox_regression"], b["bbox_regression"])
        else:
            assert torch.equal(table_net(x), named(x))


def test_backbone_equals_a_file_anywhere_composes_its_table_into_the_config(tmp_path: Path) -> None:
    from mnv3.models.block_table import backbone_file_overrides

    searched = V3Table("my-net v2", MOBILENET_V3_SMALL.rows[:-1], stem=16, last=512, head=1024)
    path = save_backbone_file(searched, tmp_path / "run" / "net.yaml", width_mult=0.75)
    overrides = backbone_file_overrides([f"backbone={path}", "head=classifier"])
    assert overrides[0] == "backbone=small_table" and overrides[-1] == "head=classifier"
    cfg = compose_train(tmp_path, overrides)
    assert cfg.backbone.name == "mobilenet_v3" and cfg.backbone.width_mult == 0.75
    assert table_from_plain(OmegaConf.to_container(cfg.backbone.table)) == searched
    assert backbone_file_overrides(["backbone=small"]) == ["backbone=small"]
    with pytest.raises(BlockTableError, match=r"backbone=.*nothing.yaml: no such file"):
        backbone_file_overrides([f"backbone={tmp_path / 'nothing.yaml'}"])
