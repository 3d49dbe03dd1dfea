"""bench/offload_hits.py on the real default model, short: both selectors decode the on-device static step's
tokens with their pages in device frames, and the frames hold part of each step's pages from the step before."""

import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ESSAYS = ROOT.parent / "shared" / "data" / "paul_graham_essays"


@pytest.mark.slow
@pytest.mark.skipif(not ESSAYS.is_dir(), reason="the essays (../shared/data) are not here")
def test_offload_hits_short_run(smollm2, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import offload_hits

    assert offload_hits.main(["--essays", str(ESSAYS), "--context", "700", "--budget", "128", "--steps", "6",
                               "--frames", "1,2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()
            if line.startswith(("quest ", "attention_predictor "))]
    assert [(r[0], r[1]) for r in rows] == [("quest", "1x"), ("quest", "2x"), ("attention_predictor", "1x"),
                                            ("attention_predictor", "2x")]
    for r in rows:
        hit, moved, in_place = float(re.sub("%", "", r[2])), float(r[4]), float(r[5])
        assert r[-1] == "yes" and 0 < hit <= 100 and 0 < moved < in_place
    for one, two in (rows[0:2], rows[2:4]):  # more frames: at least the hits of fewer
        assert float(two[2][:-1]) >= float(one[2][:-1])


def test_offload_hits_refuses_a_folder_without_essays(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import offload_hits

    assert offload_hits.main(["--essays", str(tmp_path), "--steps", "1"]) == 2
    assert "no .txt essays" in capsys.readouterr().err
    assert offload_hits.main(["--essays", str(tmp_path), "--frames", "0.5"]) == 2
    assert "--frames takes ratios >= 1" in capsys.readouterr().err
