"""The package imports and works without its compiled library, and says why native is off."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent(
    """
    import importlib.abc, sys

    class BlockNative(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name == "memgen._C":
                raise ModuleNotFoundError("No module named 'memgen._C'", name=name)
            return None

    sys.meta_path.insert(0, BlockNative())
    import torch, memgen
    report = memgen.ops.backend()
    assert not report.native_loaded and "memgen._C is not built" in report.native_detail, report
    assert report.ops["trigger_scoring"]["cpu"] == "torch", report
    assert "native unavailable" in str(report), str(report)
    counts = torch.zeros(2, dtype=torch.int32)
    d = memgen.ops.trigger_scoring(torch.tensor([0, 1]), torch.tensor([False, True]), counts, 1,
                                   torch.tensor([False, False]), trigger_mode="always")
    assert d.tolist() == [-100, 1] and counts.tolist() == [0, 1], (d, counts)
    try:
        memgen.ops.trigger_scoring(torch.tensor([1]), torch.tensor([False, True]), torch.zeros(1, dtype=torch.int32),
                                   1, torch.tensor([False]), backend_name="native")
    except RuntimeError as err:
        assert "memgen._C is not built" in str(err), err
    else:
        raise AssertionError("an explicit native request must fail without the library")
    print("OK")
    """
)


def test_import_and_ops_without_native_library():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip().endswith("OK"), result.stderr
