"""The paper profile's dry run (`tests/paper_dry_run.py`, also `make test-paper`) as a test of the full command (`make check`).

Slow (about 15 minutes on the 2-core machine): `make test` leaves it out; `make check`, which CI runs, includes it.
"""
import pytest

import paper_dry_run


@pytest.mark.slow
def test_paper_profile_dry_run(capsys):
    "ViT-B-32 QuickGELU at 224 px, all 9 methods, the 16 datasets' layouts, the paper's attacks, through `dvc repro` on CPU."
    with capsys.disabled(): code = paper_dry_run.main([])
    assert code == 0, 'the paper dry run failed: its message is printed above'
