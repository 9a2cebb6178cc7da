"""[sync] and a stage's live-data keys are checked when the settings load: one line naming
file:line and what to write instead."""

from __future__ import annotations

import pytest

from remoteops.common.config import load_settings
from remoteops.common.errors import ConfigError

CASES = [
    ('[sync]\nformat = "dir"\n', "remoteops.toml:2: 'sync.format' is 'dir'; it must be one of "
     "dirs, files, jsonl"),
    ('[sync]\ndest = "../elsewhere"\n', "'sync.dest' is '../elsewhere'; it must be a folder "
     "relative to the project root"),
    ('[sync]\ndest = ".remoteops/x"\n', "'sync.dest' is '.remoteops/x'"),
    ('[sync]\npoll_seconds = 0\n', "'sync.poll_seconds' is 0.0; it must be a number > 0"),
    ('[sync]\nbatch_max = 0\n', "'sync.batch_max' is 0; it must be a number >= 1"),
    ('[sync]\nsorce = "x"\n', "unknown setting 'sync.sorce'. Did you mean 'sync.source'?"),
    ('[stages.g]\ndataset_live = "/data/live"\n', "'stages.g.dataset_live' is '/data/live'"),
    ('[stages.g]\nmin_samples = 0\n', "'stages.g.min_samples' is 0; it must be a number >= 1"),
    ('[stages.g]\nmin_samples = "50"\n', "'stages.g.min_samples' is '50'; it must be an integer"),
]


@pytest.mark.parametrize("text,message", CASES)
def test_bad_values_are_refused_where_they_were_written(tmp_path, home, text, message):
    (tmp_path / "remoteops.toml").write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(tmp_path)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_good_values_load(tmp_path, home):
    (tmp_path / "remoteops.toml").write_text(
        '[sync]\nsource = "gen/out.jsonl"\nformat = "jsonl"\npoll_seconds = 5\n'
        '[stages.grow]\ndataset_live = "data/live"\nmin_samples = 50\npoll_seconds = 60\n')
    settings = load_settings(tmp_path)
    assert settings["sync.format"] == "jsonl" and settings["sync.dest"] == "data/live"
    assert settings["stages"]["grow"]["min_samples"] == 50
