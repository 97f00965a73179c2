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


def _import_after_torch(load, env_policy=None):
    # a faked 1-minute load average: the warning depends on how busy the machine is
    code = (f"import os; os.getloadavg = lambda: ({load}, 0.0, 0.0); import torch; torch.set_num_threads(2); "
            "import warnings; warnings.simplefilter('always'); import pyconcepts")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if env_policy is not None:
        env["OMP_WAIT_POLICY"] = env_policy
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stderr


def test_torch_imported_first_on_a_busy_machine_warns_how_to_avoid_spinning():
    busy = float((os.cpu_count() or 1) + 1)
    err = _import_after_torch(busy)
    assert "torch was imported before pyconcepts" in err and "OMP_WAIT_POLICY=PASSIVE" in err
    assert "torch was imported before" not in _import_after_torch(0.0)          # an idle machine
    assert "torch was imported before" not in _import_after_torch(busy, "PASSIVE")  # the user's choice


def test_spinning_threads_note_needs_torch_first_threads_and_load():
    from pyconcepts.ops import spinning_threads_note

    assert spinning_threads_note(True, 2, 2.0, 2) is not None
    assert spinning_threads_note(False, 2, 9.0, 2) is None
    assert spinning_threads_note(True, 1, 9.0, 2) is None
    assert spinning_threads_note(True, 8, 3.9, 4) is None
