"""The Python sources pass flake8 (setup.cfg's settings). The GPU-only code paths cannot
run here, so static checks (undefined names, unused imports, shadowing) are what guards
them on this machine."""

from conftest import BIN, REPO, run


def test_flake8():
    done = run([BIN / "flake8", "dist_lm", "tests", "launch"], cwd=REPO, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
