"""The episode log of fixed-seed searches, pinned: a refactoring must not change what a search does.

``tests/data/episode_log_pin.json`` was written by the search as it stood before the package was
restructured into compression-method plug-ins, a search loop with callbacks and a generated command
line (issue 13). Every case below runs the same command again (tiny model, embedded digits data, one
thread) and must reproduce, episode by episode, the phases, the ranks of every layer and the
rewards. The common options spell out the defaults of the time that later changed (issue 14: reward
batch 64 on all validation images, no reserve wall, uniform center, AMC's wide actions), so that a
change of defaults does not break the pin while a change of behaviour does. Regenerate the file only for a change that is *meant* to alter what a search does, and say
so in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlrank.runlog import read_rows
from rlrank.search import main

PIN = Path(__file__).parent / "data" / "episode_log_pin.json"
PINNED = json.loads(PIN.read_text())


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def episodes_of(run: Path) -> list[list[dict]]:
    return [
        [
            {
                "episode": r["episode"],
                "reward": r["reward"],
                "phase": r["phase"],
                "ranks": {name: entry["ranks"] for name, entry in r["layers"].items()},
            }
            for r in read_rows(stage / "episodes.jsonl")
        ]
        for stage in sorted(run.glob("stage-*"))
    ]


@pytest.mark.parametrize("case", sorted(PINNED["cases"]))
def test_search_reproduces_the_pinned_episode_log(case, tmp_path):
    pinned = PINNED["cases"][case]
    assert main([*PINNED["common"], *pinned["args"], "--out", str(tmp_path)]) == 0
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    stages = episodes_of(run)
    assert len(stages) == len(pinned["stages"])
    for got_stage, want_stage in zip(stages, pinned["stages"], strict=True):
        assert [r["episode"] for r in got_stage] == [r["episode"] for r in want_stage]
        for got, want in zip(got_stage, want_stage, strict=True):
            assert got["phase"] == want["phase"]
            assert got["ranks"] == want["ranks"], f"episode {want['episode']}: other ranks"
            assert got["reward"] == pytest.approx(want["reward"], abs=1e-9)
