"""OpenMP wait policy: pyconcepts asks for passive waiting unless the user chose a policy."""
import os
import subprocess
import sys

CHECK = "import os, pyconcepts; print(os.environ.get('OMP_WAIT_POLICY'))"


def _run(env_policy):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    out = subprocess.run([sys.executable, "-c", CHECK], env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout.strip()


def test_import_sets_passive_waiting_before_torch_loads_openmp():
    assert _run(None) == "PASSIVE"


def test_a_policy_the_user_chose_is_kept():
    assert _run("ACTIVE") == "ACTIVE"
