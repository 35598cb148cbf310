"""The block search's space (valid samples, the paper's networks as points) and controllers
(a rising reward on a toy problem with a known best, equal budgets)."""

from __future__ import annotations

import random
import statistics
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from mnv3.cli import CONFIG_DIR
from mnv3.errors import ConfigError
from mnv3.models.backbone import build_backbone
from mnv3.models.block_table import table_to_plain
from mnv3.models.mobilenetv3 import MOBILENET_V3_LARGE, MOBILENET_V3_SMALL
from mnv3.search.controllers import (
    CONTROLLERS,
    Budget,
    BudgetSpent,
    History,
    make_controller,
    run,
)
from mnv3.search.proposals import has_expand, has_shortcut
from mnv3.search.space import SearchSpace

SPACES = {"small": MOBILENET_V3_SMALL, "large": MOBILENET_V3_LARGE}


def _space(name: str) -> SearchSpace:
    path = CONFIG_DIR / "search" / "space" / f"{name}.yaml"
    return SearchSpace.from_config(OmegaConf.to_container(OmegaConf.load(path)))


@pytest.mark.parametrize("name", SPACES)
def test_the_papers_network_is_a_point_of_its_space(name: str) -> None:
    space = _space(name)
    choices = space.decode(SPACES[name])
    assert choices is not None
    assert space.table(choices, SPACES[name].name) == SPACES[name]
    assert len(choices) == len(space.decisions)
    other = "large" if name == "small" else "small"
    assert space.decode(SPACES[other]) is None  # the other paper network is not in it


@pytest.mark.parametrize("name", SPACES)
def test_sampled_networks_are_valid_tables_that_build(name: str) -> None:
    space = _space(name)
    rng = random.Random(0)
    x = torch.randn(1, 3, 64, 64)
    for n in range(20):
        choices = space.sample(rng)
        table = space.table(choices, f"sample{n}")
        assert all(r.exp % 8 == 0 and r.out % 8 == 0 and r.exp >= 8 for r in table.rows)
        assert space.decode(table) is not None  # every sample is a point of the space
        assert space.table(space.decode(table)) == space.table(choices)
        for i, row in enumerate(table.rows):
            stage_first = i == 0 or row.out != table.rows[i - 1].out or row.s == 2
            if not stage_first or i > 0:  # shortcuts inside stages only (and Large's stem one)
                assert has_shortcut(table, i) == (not stage_first)
            assert has_expand(table, i) or row.exp == (table.rows[i - 1].out if i else table.stem)
        if n < 3:
            net = build_backbone("mobilenet_v3", table=table_to_plain(table), num_classes=4)
            assert net(x).shape == (1, 4)


def test_a_bad_space_is_one_sentence() -> None:
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "search" / "space" / "small.yaml"))
    cfg["stages"][1]["widths"] = [20]
    with pytest.raises(ConfigError, match=r"search.space.stages\[1\]: widths=20 is not a valid"):
        SearchSpace.from_config(cfg)


def _toy(seed: int = 1) -> tuple[list[int], callable]:
    sizes = [4] * 12
    target = [random.Random(seed).randrange(4) for _ in sizes]
    return sizes, lambda c: sum(a == b for a, b in zip(c, target, strict=True)) / len(c)


@pytest.mark.parametrize("name", ["evolution", "rl"])
def test_a_controller_learns_a_toy_problem_with_a_known_best(name: str) -> None:
    """Reward = the share of 12 four-way decisions equal to a hidden target (best: 1.0)."""
    sizes, reward = _toy()
    options = {"hidden": 32} if name == "rl" else {}
    history = run(make_controller(name, sizes, seed=0, **options), reward, Budget(200))
    assert len(history.rewards) == 200
    first, last = statistics.mean(history.rewards[:40]), statistics.mean(history.rewards[-40:])
    assert last > first + 0.25, (first, last)
    baseline = run(make_controller("random", sizes, seed=0), reward, Budget(200))
    assert history.best()[1] > baseline.best()[1]  # at an equal budget, it beats random search


def test_budgets_are_equal_and_enforced() -> None:
    sizes, reward = _toy()
    calls: dict[str, int] = {}
    for name in CONTROLLERS:
        count = [0]

        def counted(c: list[int], count: list[int] = count) -> float:
            count[0] += 1
            return reward(c)

        budget = Budget(30)
        run(make_controller(name, sizes, seed=1), counted, budget)
        calls[name] = count[0]
        with pytest.raises(BudgetSpent):
            budget.spend()
    assert set(calls.values()) == {30}
    # A resumed search replays its history: it counts, and only the rest is evaluated.
    done = run(make_controller("evolution", sizes), reward, Budget(10))
    again = [0]
    history = History(list(done.choices), list(done.rewards))
    run(
        make_controller("evolution", sizes),
        lambda c: again.__setitem__(0, again[0] + 1) or 0.0,
        Budget(25),
        history,
    )
    assert again[0] == 15 and len(history.rewards) == 25


def test_unknown_controller_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match=r"search.controller='ppo' is unknown; expected"):
        make_controller("ppo", [2, 2])


def test_space_files_are_the_shipped_ones() -> None:
    assert sorted(p.stem for p in (CONFIG_DIR / "search" / "space").glob("*.yaml")) == [
        "large",
        "small",
    ]
    assert Path(CONFIG_DIR / "search" / "netadapt.yaml").is_file()


def test_a_tiny_block_search_runs_end_to_end_and_resumes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """search=nas under debug=fast_dev_run, the paper's pipeline: a supernet, 4 candidates, the
    best 2 measured, NetAdapt on the winner; the top candidates and the refined network are
    backbone options the printed multirun selects; a second run in the same folder reads the
    trained supernet, the candidates and the winner back instead of redoing them."""
    import csv
    import json

    from helpers import TINY_DATA, compose_config
    from mnv3.models.block_table import load_backbone_file
    from mnv3.search.__main__ import search

    overrides = [
        *TINY_DATA,
        "search=nas",
        "debug=fast_dev_run",
        "logger=none",
        "search.netadapt=true",
    ]
    summary = search(compose_config("search", tmp_path, overrides))
    run_dir = tmp_path / "run"
    with (run_dir / "search" / "candidates.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == summary["candidates"] == 4
    assert summary["best reward (measured latency)"] > 0
    table = load_backbone_file(run_dir / "table.yaml")
    space = SearchSpace.from_config(
        OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "search" / "space" / "small.yaml"))
    )
    assert space.decode(table) is not None  # the result is a point of the space
    assert json.loads(rows[0]["table"])  # each candidate's rows are in its CSV row
    options = run_dir / "backbones" / "backbone"
    assert sorted(p.stem for p in options.glob("*.yaml")) == ["nas_0", "nas_1", "nas_netadapt"]
    assert load_backbone_file(options / "nas_0.yaml").rows == table.rows  # rank 0 = the winner
    refined = load_backbone_file(run_dir / "netadapt" / "table.yaml")
    assert load_backbone_file(options / "nas_netadapt.yaml").rows == refined.rows
    # NetAdapt ran from the winner (on a loaded machine it may keep no proposal at 32 px)
    refined_summary = json.loads((run_dir / "netadapt" / "summary.json").read_text())
    assert refined_summary["stopped"] and refined_summary["start ms"] > 0
    # the printed multirun selects them by name through the run's search path
    train_cfg = compose_config(
        "train", tmp_path, [f"hydra.searchpath=[file://{run_dir / 'backbones'}]", "backbone=nas_1"]
    )
    second = table_to_plain(load_backbone_file(options / "nas_1.yaml"))
    assert OmegaConf.to_container(train_cfg.backbone.table) == second
    assert train_cfg.backbone.width_mult == 1.0  # the other backbone keys come with it

    mtime = (run_dir / "search" / "supernet.pt").stat().st_mtime
    again = search(compose_config("search", tmp_path, overrides))
    assert (
        again["candidates"] == 4 and (run_dir / "search" / "supernet.pt").stat().st_mtime == mtime
    )
    assert load_backbone_file(run_dir / "table.yaml").rows == table.rows  # the winner is kept
    assert load_backbone_file(run_dir / "netadapt" / "table.yaml").rows == refined.rows
    # Resumed under another timing rule, its predicted and measured ms would not compare.
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        search(compose_config("search", tmp_path, [*overrides, "platform.quantile=0.4"]))
    assert info.value.code == 1
    assert f"{run_dir / 'search' / 'state.json'}: this search measured with quantile=0.5" in (
        capsys.readouterr().err
    )
