"""NetAdapt: proposals, inherited filters, the held-out split, the selection rule, the whole
search (tiny), its resume after a kill and its CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import TINY_DATA, compose_config, run_cli
from mnv3.errors import ConfigError
from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import load_backbone_file, table_from_arch, table_to_plain
from mnv3.models.layers import make_divisible
from mnv3.models.mobilenetv3 import MOBILENET_V3_LARGE, MOBILENET_V3_SMALL
from mnv3.run_folder import RunFolder
from mnv3.search import netadapt
from mnv3.search.netadapt import (
    PROPOSALS_CSV,
    SEARCH_DIR,
    STATE_FILE,
    SearchData,
    Settings,
    select,
    selection_score,
    split_indices,
)
from mnv3.search.proposals import (
    Channels,
    has_shortcut,
    inherit,
    input_widths,
    kept_channels,
    parts,
    proposals_of,
    residual_groups,
    structure,
)

TABLES = [MOBILENET_V3_SMALL, MOBILENET_V3_LARGE]
TINY_SEARCH = [*TINY_DATA, "debug=fast_dev_run", "logger=none"]


def _build(table, num_classes: int = 5):
    return build_backbone("mobilenet_v3", table=table_to_plain(table), num_classes=num_classes)


def test_residual_groups_are_the_shortcut_chains() -> None:
    small = [g.blocks for g in residual_groups(MOBILENET_V3_SMALL)]
    assert small == [(0,), (1, 2), (3, 4, 5), (6, 7), (8, 9, 10)]
    large = residual_groups(MOBILENET_V3_LARGE)
    assert [g.blocks for g in large] == [
        (0,),
        (1, 2),
        (3, 4, 5),
        (6, 7, 8, 9),
        (10, 11),
        (12, 13, 14),
    ]
    assert large[0].with_stem  # Large's first block adds the stem's output: the stem is in it
    assert not any(g.with_stem for g in large[1:])


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_every_proposal_is_consistent(table) -> None:
    """Widths are multiples of 8 and >= 8, a group's blocks share the width, the structure
    (expand convs, shortcuts) is kept, SE follows the expansion, and the child builds."""
    groups = residual_groups(table)
    x = torch.randn(1, 3, 64, 64)
    for kind, index in parts(table):
        proposals = list(proposals_of(table, kind, index))
        assert proposals, f"{kind} {index} has no proposal"
        assert [p.width for p in proposals] == sorted({p.width for p in proposals}, reverse=True)
        for p in proposals:
            assert p.width % 8 == 0 and 8 <= p.width < p.parent_width
            assert structure(p.table) == structure(table)
            if kind == "group":
                outs = {p.table.rows[i].out for i in groups[index].blocks}
                assert outs == {p.width}
                if groups[index].with_stem:
                    assert p.table.stem == p.width
            else:
                assert p.table.rows[index].exp == p.width
                changed = [
                    i
                    for i, (a, b) in enumerate(zip(table.rows, p.table.rows, strict=True))
                    if a != b
                ]
                assert changed == [index]
        child = _build(proposals[-1].table)  # the narrowest one builds and runs
        for block, row in zip(child.blocks, proposals[-1].table.rows, strict=True):
            if row.se:
                assert block.se.reduce.out_channels == make_divisible(row.exp // 4, 8)
        assert child(x).shape == (1, 5)


def test_a_shrink_that_would_add_a_shortcut_is_skipped() -> None:
    # Small's block 6 reads 40 channels and writes 48: its group at 40 would gain a shortcut.
    group = next(g for g, grp in enumerate(residual_groups(MOBILENET_V3_SMALL)) if 6 in grp.blocks)
    widths = [p.width for p in proposals_of(MOBILENET_V3_SMALL, "group", group)]
    assert 40 not in widths and 32 in widths
    assert not has_shortcut(MOBILENET_V3_SMALL, 6)


@pytest.mark.parametrize("table", TABLES, ids=lambda t: t.name)
def test_keeping_every_channel_copies_the_network_exactly(table) -> None:
    parent = _build(table).eval()
    child = inherit(parent, _build(table).eval(), Channels())
    x = torch.randn(2, 3, 64, 64)
    assert torch.equal(child(x), parent(x))


def test_the_child_keeps_the_strongest_filters() -> None:
    """Block 2 of Small (no SE): make 8 expansion filters weak (BN gamma 0) and cut their
    projection weights; the child that drops 8 filters drops exactly those and computes what
    the parent computes."""
    torch.manual_seed(0)
    parent = _build(MOBILENET_V3_SMALL).eval()
    block = parent.blocks[2]
    weak = torch.tensor([3, 10, 17, 30, 41, 55, 60, 87])
    with torch.no_grad():
        block.expand.bn.weight[weak] = 0.0
        block.project.conv.weight[:, weak] = 0.0
        for m in parent.modules():  # non-trivial BN statistics everywhere
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    proposal = next(p for p in proposals_of(MOBILENET_V3_SMALL, "expansion", 2) if p.width == 80)
    kept = kept_channels(parent, proposal)
    assert set(kept.exp[2].tolist()) == set(range(88)) - set(weak.tolist())
    child = inherit(parent, _build(proposal.table).eval(), kept)
    x = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(child(x), parent(x), rtol=1e-4, atol=1e-5)


def test_a_group_child_keeps_one_index_set_for_the_whole_group() -> None:
    parent = _build(MOBILENET_V3_LARGE).eval()
    proposal = next(iter(proposals_of(MOBILENET_V3_LARGE, "group", 0)))  # stem + block 0
    kept = kept_channels(parent, proposal)
    assert torch.equal(kept.stem, kept.out[0]) and torch.equal(kept.exp[0], kept.out[0])
    assert 1 not in kept.exp  # block 1 has its own expand conv: only its input narrows
    child = inherit(parent, _build(proposal.table).eval(), kept)
    assert child(torch.randn(1, 3, 64, 64)).shape == (1, 5)


def test_held_out_and_fine_tune_indices_are_disjoint(tmp_path: Path) -> None:
    for n, share in ((10, 0.2), (1000, 0.3), (7, 0.9)):
        fine, held = split_indices(n, share, 10**6, seed=1)
        assert not set(fine) & set(held) and sorted(fine + held) == list(range(n))
        assert fine and held
    assert split_indices(1000, 0.5, 100, seed=0)[1] != split_indices(1000, 0.5, 100, seed=1)[1]
    assert len(split_indices(1000, 0.5, 100, seed=0)[1]) == 100

    from mnv3.cli import build_datamodule

    cfg = compose_config("search", tmp_path, TINY_SEARCH)
    datamodule = build_datamodule(cfg.data, num_workers=0)
    data = SearchData(datamodule, Settings(holdout=0.25), seed=3)
    assert not set(data.finetune_index) & set(data.holdout_index)
    n = len(datamodule.get_dataset("train"))
    assert len(data.holdout_index) == round(0.25 * n)
    assert sorted(data.finetune_index + data.holdout_index) == list(range(n))


def test_the_rule_picks_accuracy_per_ms_not_the_best_accuracy() -> None:
    parent_acc, parent_ms = 0.85, 10.0
    results = {
        0: {"acc": 0.84, "ms": 9.9},  # best accuracy, saves 0.1 ms: -0.10 per ms
        1: {"acc": 0.80, "ms": 9.0},  # loses more, saves 1.0 ms: -0.05 per ms
        2: {"acc": 0.70, "ms": 8.0},  # -0.075 per ms
    }
    scored = {
        j: {"acc": r["acc"], "score": selection_score(r["acc"], parent_acc, r["ms"], parent_ms)}
        for j, r in results.items()
    }
    assert max(scored, key=lambda j: scored[j]["acc"]) == 0
    assert select(scored) == 1
    assert scored[1]["score"] == pytest.approx(-0.05)


def test_bad_search_values_are_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"search.target_ratio=1.5"):
        Settings.from_config({"target_ratio": 1.5})
    with pytest.raises(ConfigError, match=r"search.finetune_steps=-1"):
        Settings.from_config({"finetune_steps": -1})


def _rows(run: Path) -> list[dict[str, str]]:
    with (run / SEARCH_DIR / PROPOSALS_CSV).open() as f:
        return list(csv.DictReader(f))


def test_a_tiny_search_runs_logs_every_proposal_and_resumes_after_a_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Killed (an exception) in its first fine-tune, the search resumes from its state: the
    rows already written stay, nothing is redone, and it ends with a table that builds, its
    weights, and the train command; ``python -m mnv3.search resume=<run>`` finds it finished."""
    from mnv3.search.__main__ import search

    # A target out of reach: it stops after its 2 iterations (or earlier, when a loaded machine
    # leaves no proposal whose measured latency fell: a logged stop, not a failure).
    overrides = [*TINY_SEARCH, "search.fast_dev_run.finetune_steps=1", "search.target_ratio=0.05"]
    real, calls = netadapt.train_steps, []

    def killed_in_the_first_fine_tune(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the pretraining ran; the first proposal's fine-tune is killed
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(netadapt, "train_steps", killed_in_the_first_fine_tune)
    try:
        search(compose_config("search", tmp_path, overrides))
    except KeyboardInterrupt:
        pass
    else:  # a loaded machine: no proposal's measured latency fell, so none was fine-tuned
        pytest.skip("no proposal survived measurement on this (loaded) machine; nothing to kill")
    run = tmp_path / "run"
    state = json.loads((run / SEARCH_DIR / STATE_FILE).read_text())
    assert state["pending"] is not None  # killed inside an iteration
    before = _rows(run)

    monkeypatch.setattr(netadapt, "train_steps", real)
    summary = search(compose_config("search", tmp_path, overrides))
    rows = _rows(run)
    assert rows[: len(before)] == [
        {**r, **{k: rows[i][k] for k in ("status", "acc", "score", "finetune_s")}}
        for i, r in enumerate(before)
    ]
    assert summary["iterations"] == 2 or summary["stopped"].startswith("iteration 1: no proposal")
    for row in rows:  # every proposal lowered measured latency, or was dropped with a reason
        if row["status"] == "dropped":
            assert row["reason"]
        else:
            assert row["status"] in ("kept", "scored")
            assert float(row["measured_ms"]) < float(row["parent_measured_ms"])
            assert float(row["predicted_ms"]) < float(row["parent_predicted_ms"])
    assert sum(r["status"] == "kept" for r in rows) == summary["iterations"] >= 1
    table = load_backbone_file(run / "table.yaml")
    kept = [r for r in rows if r["status"] == "kept"]
    assert [list(r) for r in json.loads(kept[-1]["table"])] == [
        [r.kernel, r.exp, r.out, r.se, r.nl, r.s] for r in table.rows
    ]
    network = _build(table, num_classes=6)
    state_dict = torch.load(run / "adapted.pt", weights_only=True)
    network.load_state_dict(state_dict)
    assert table_from_arch(network.arch).rows == table.rows
    assert input_widths(table)[0] == table.stem
    printed = capsys.readouterr().out
    assert f"python -m mnv3.train backbone={run}/table.yaml data=textures" in printed
    again = run_cli("mnv3.search", [f"resume={run}"], cwd=tmp_path, timeout=240)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming the search" in again.stderr + again.stdout
    assert f"backbone={run}/table.yaml" in again.stdout
    # Resumed under another timing rule: its new milliseconds would not compare with the rows.
    state = json.loads((run / SEARCH_DIR / STATE_FILE).read_text())
    assert state["platform"]["quantile"] == 0.5 and state["platform"]["cpu"]
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        search(compose_config("search", tmp_path, [*overrides, "platform.quantile=0.4"]))
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 1
    assert (
        "state.json: this search measured with quantile=0.5 and this run would measure " in message
    )
    assert "with quantile=0.4; expected the platform it started with" in message
    # refused before the run's saved config was replaced: a plain resume still has its own
    saved = OmegaConf.load(RunFolder(run).config_file)
    assert saved.platform.quantile == 0.5


def test_search_cli_refuses_bad_input_in_one_sentence(tmp_path: Path) -> None:
    bad = run_cli(
        "mnv3.search",
        [*TINY_SEARCH, f"paths.data_dir={tmp_path}/data", "head=ssdlite"],
        cwd=tmp_path,
    )
    assert bad.returncode == 1
    assert bad.stderr.strip().splitlines()[-1].startswith("error: head=ssdlite: NetAdapt scores")
    from mnv3.resume import resume_argv

    with pytest.raises(ConfigError, match=r"expected a run folder written by mnv3\.search"):
        resume_argv([f"resume={tmp_path}"], ("search/state.json",), writer="mnv3.search")


def test_the_search_experiments_compose_and_pass_the_checks(tmp_path: Path) -> None:
    from mnv3.cli import to_plain
    from mnv3.search.platform import Platform

    cfg = compose_config("search", tmp_path, ["experiment=netadapt_small_quick"])
    settings = Settings.from_config(to_plain(cfg.search))
    assert (settings.target_ratio, settings.finetune_steps) == (0.75, 30)
    assert settings.train_overrides == ("experiment=textures_quick",)
    assert Platform.from_config(to_plain(cfg.platform)).input_size == (224, 224)
    assert cfg.backbone.name == "mobilenet_v3_small" and cfg.data.name == "textures"
    nas = compose_config("search", tmp_path, ["experiment=nas_small_quick"])
    assert nas.search.algorithm == "nas" and nas.search.space.name == "small"
    assert nas.search.budget == 60 and nas.scheduler.name == "constant"


def test_every_proposal_is_a_row_of_the_wandb_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The W&B run (offline) holds one history row per proposal, dropped ones included, with
    the CSV's numbers, and per-iteration latency ratios on the same increasing step axis."""
    from mnv3.run_records import read_wandb_offline
    from mnv3.search.__main__ import search

    monkeypatch.setenv("WANDB_MODE", "offline")
    overrides = [*TINY_DATA, "debug=fast_dev_run", "logger=wandb", "search.target_ratio=0.05"]
    search(compose_config("search", tmp_path, overrides))
    import wandb

    wandb.finish()
    # Shut the W&B service down before reading its file: on a loaded machine its last records
    # were still unwritten after finish() (measured: 28 of 30 rows, once none).
    wandb.teardown()
    rows = _rows(tmp_path / "run")
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    history = read_wandb_offline(offline).history
    logged = [h for h in history if "proposal/row" in h]
    assert sorted(int(h["proposal/row"]) for h in logged) == list(range(len(rows)))
    for h in logged:
        row = rows[int(h["proposal/row"])]
        assert h["proposal/dropped"] == (row["status"] == "dropped")
        if row["measured_ms"]:
            assert h["proposal/measured_ms"] == pytest.approx(float(row["measured_ms"]), rel=1e-4)
    ratios = [h["search/latency_ratio"] for h in history if "search/latency_ratio" in h]
    # One ratio per kept proposal; on a loaded machine every proposal can be dropped at
    # measurement (the latency did not fall), and then there is none.
    assert len(ratios) == sum(r["status"] == "kept" for r in rows)
