"""Every command line answers a mistyped flag in one line, with the option it was probably meant to be."""

import pytest

from realsr_r1 import analyze, degrade, download, evaluate, infer, train
from realsr_r1.training import data


@pytest.mark.parametrize("main, argv, wrong, meant", [
    (infer.main, ["--input", "x", "--output", "y", "--fidelty", "0"], "--fidelty", "--fidelity"),
    (infer.main, ["--input", "x", "--ouput", "y"], "--ouput", "--output"),  # before "--output is required"
    (train.main, ["--config", "c.yaml", "--overwirte"], "--overwirte", "--overwrite"),
    (train.main, ["restorer", "--config", "c.yaml", "--sett", "a=1"], "--sett", "--set"),
    (data.main, ["build", "--hr", "x", "--outt", "y"], "--outt", "--out"),
    (evaluate.main, ["--pred", "p", "--gt", "g", "--metrcs", "psnr"], "--metrcs", "--metrics"),
    (degrade.main, ["--input", "x", "--output", "y", "--sede", "1"], "--sede", "--seed"),
    (download.main, ["lite", "--hubb", "x"], "--hubb", "--hub"),
    (analyze.main, ["x.png", "--jsn"], "--jsn", None),
])
def test_a_mistyped_flag_is_one_line_with_a_suggestion(main, argv, wrong, meant, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert f"unknown option {wrong}" in err and "see --help" in err
    if meant:
        assert f"did you mean {meant}?" in err
    else:
        assert "did you mean" not in err  # nothing close: no guess


def test_nothing_close_is_not_guessed(capsys):
    with pytest.raises(SystemExit):
        infer.main(["--input", "x", "--output", "y", "--bogus"])
    err = capsys.readouterr().err
    assert "unknown option --bogus" in err and "did you mean" not in err
