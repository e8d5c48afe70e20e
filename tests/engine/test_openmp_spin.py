"""`LLM` loads libgomp with a shorter spin-wait (engine/llm.py `_limit_openmp_spin`): the variable
it sets for that is gone from the environment afterwards (child processes, such as a benchmark's
peer, keep libgomp's default), and a value the user set is left alone. Each case runs in a fresh
interpreter: whether libgomp is loaded is a property of the process."""
import ctypes.util
import os
import subprocess
import sys

CODE = ("import os, lmengine.llm as m; before = m._gomp_loaded(); m._limit_openmp_spin(); "
        "print(os.environ.get('GOMP_SPINCOUNT'), before, m._gomp_loaded())")


def run(env_value=None):
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    if env_value is not None:
        env["GOMP_SPINCOUNT"] = env_value
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


def test_the_spin_count_is_not_left_in_the_environment():
    value, before, after = run()
    assert value == "None"
    assert before == "False"                   # importing lmengine does not load libgomp itself
    if ctypes.util.find_library("gomp"):
        assert after == "True"                 # loaded, with the shorter spin


def test_a_value_the_user_set_is_kept():
    value, _, _ = run("12345")
    assert value == "12345"
