"""``lowbit quantize --auto-quantize-bits B --quant F,F`` on the bundled model: the budget holds, the state file
is written and loads, the saved directory reloads (``check_reload`` inside the command); bad flags exit 2."""

import pytest

from lowbit.cli import main
from lowbit.search import SearchState
from tests.test_commands import SMALL, run_cli


def test_auto_quantize_from_the_cli(tmp_path):
    state_path = tmp_path / "state.json"
    stdout = run_cli(["quantize", "default", "--auto-quantize-bits", "5.5", "--quant", "nvfp4,fp8", "--output",
                      str(tmp_path / "out"), "--search-state", str(state_path), *SMALL])
    state = SearchState.load(state_path)
    assert 5.5 - 0.05 <= state.effective_bits <= 5.5
    assert f"auto_quantize: {state.effective_bits:.3f} effective bits" in stdout
    assert set(state.formats) == {"NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"}
    assert "reloaded: max |logit difference|" in stdout


@pytest.mark.parametrize(("argv", "message"), [
    (["--auto-quantize-bits", "5"], "needs --quant"),
    (["--auto-quantize-bits", "5", "--quant", "nvfp4", "--preset", "fp8"], "instead of --preset"),
    (["--quant", "nvfp4"], "go with --auto-quantize-bits"),
    (["--auto-quantize-bits", "5", "--quant", "nvfp4,int3"], "format 'int3' is unknown"),
    (["--auto-quantize-bits", "3.0", "--quant", "nvfp4,fp8"], "allowed is [4.5"),
    (["--auto-quantize-bits", "17", "--quant", "nvfp4,fp8"], "allowed is [4.5"),
])
def test_bad_auto_flags_exit_with_a_message(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["quantize", "default", "--output", str(tmp_path / "out"), *argv, *SMALL])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
