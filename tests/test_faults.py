"""Fault injection on checkpoints: kill -9 during saves, in a loop, on real processes.

The other faults (flipped bytes, truncated files, a full disk, a mismatched model) are
tested beside the code they concern: tests/test_checkpoint.py, test_run_dir.py.
"""
import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from processes import REPO, cpu_env, free_port, run_together
from transformer_jax import checkpoint

# The state saved as step s is a pure function of s, so any restored step can be checked
# bit for bit. Shared verbatim by the test and the child process.
STATE_FOR = """
import jax, jax.numpy as jnp
from transformer_jax.training import TrainState

def state_for(step):
    k = jax.random.split(jax.random.key(step), 3)
    return TrainState(step=jnp.asarray(step, jnp.int32),
                      params={"w": jax.random.normal(k[0], (256, 256)), "b": jax.random.normal(k[1], (256,))},
                      opt_state={"mu": jax.random.normal(k[2], (256, 256))},
                      rng=jax.random.key_data(jax.random.key(step + 1)))
"""

SAVER = STATE_FOR + """
import sys
from transformer_jax import checkpoint

with checkpoint.Checkpointer(sys.argv[1], max_to_keep=2) as ckpt:
    state = ckpt.restore(checkpoint.abstract_state(state_for(0)))
    start = 0 if state is None else int(state.step)
    print(f"resumed at {start}", flush=True)
    ckpt.save(start + 1, state_for(start + 1))
    ckpt.wait()  # one complete save per child, however slow the machine: the kill lands in later ones
    print(f"saved {start + 1}", flush=True)
    for step in range(start + 2, 10**6):
        ckpt.save(step, state_for(step))
"""


def test_kill_9_during_saves_in_a_loop_leaves_a_bit_identical_checkpoint(tmp_path):
    namespace = {}
    exec(STATE_FOR, namespace)
    state_for = namespace["state_for"]
    script = tmp_path / "saver.py"
    script.write_text(SAVER)
    directory = tmp_path / "checkpoints"
    rng = np.random.default_rng()
    resumed = []
    for _ in range(4):
        child = subprocess.Popen([sys.executable, str(script), str(directory)], env=cpu_env(),
                                 cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        line = child.stdout.readline()  # the restore (verified against its checksums) is done
        assert line.startswith("resumed at "), line
        resumed.append(int(line.split()[-1]))
        assert child.stdout.readline().startswith("saved "), "the first save of this child did not finish"
        time.sleep(rng.uniform(0.2, 1.5))  # somewhere in the middle of a save, or between two
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
        child.stdout.close()
    assert resumed[0] == 0 and all(b > a for a, b in zip(resumed, resumed[1:])), resumed
    with checkpoint.Checkpointer(directory) as ckpt:
        restored = ckpt.restore(checkpoint.abstract_state(state_for(0)))
        step = int(restored.step)
        assert step >= max(resumed[-1], 1) and ckpt.latest_step() == step
    expected = state_for(step)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(expected)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert not [n for n in os.listdir(directory) if ".corrupt-" in n]  # a killed save damages nothing


# ------------------------------------------------------------------ a peer that never starts

JOIN = """
import sys
from transformer_jax import sharding
sharding.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]), timeout_s=float(sys.argv[3]))
print("joined")
"""


@pytest.mark.parametrize("process_id", [0, 1])  # the coordinator alone; a peer with no coordinator
def test_a_peer_that_never_starts_is_one_line_after_the_timeout(process_id):
    address = f"localhost:{free_port()}"
    start = time.monotonic()
    result = subprocess.run([sys.executable, "-c", JOIN, address, str(process_id), "4"],
                            env=cpu_env(), cwd=REPO, capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - start
    assert result.returncode == 1 and "joined" not in result.stdout, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"initialize_distributed: process {process_id} of 2 could not join the run at "
                         f"the coordinator {address} within 4 s (timeout_s, the --distributed-timeout "
                         f"flag): check that every process was started, with the same coordinator "
                         f"address and process count, and that the address is reachable")
    assert not [line for line in lines if "Check failure" in line or "Traceback" in line], result.stderr
    assert 4 <= elapsed < 60


# ------------------------------------------------------------------ a multi-process run on a locked directory

HOLD_LOCK = """
import sys
from transformer_jax import run_dir
with run_dir.RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()
"""


def test_sigterm_on_one_process_of_a_multi_process_run_stops_both_after_one_saved_step(tmp_path):
    """Only process 1 gets SIGTERM (at step 4's logging); a checkpoint save is collective, so
    both processes must agree to save the same step and stop there (before, process 1 saved
    alone while process 0 ran on, and both hung)."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(["ab", "cd", "ef"], size=500)) + "\n")
    out = tmp_path / "run"
    argv = ["tests/signal_one_process.py", "4", "--preset", "tiny", "--data", str(corpus), "--out-dir", str(out),
            "--batch-size", "4", "--seq-len", "16", "--max-steps", "40", "--log-every", "2",
            "--eval-every", "40", "--checkpoint-every", "40", "--sample-tokens", "0", "--no-compile-cache",
            "--coordinator-address", f"localhost:{free_port()}", "--num-processes", "2",
            "--distributed-timeout", "60"]
    codes, tails = run_together([[*argv, "--process-id", str(i)] for i in range(2)], tmp_path,
                                env=cpu_env(), timeout_s=150)
    assert codes == [0, 0], "\n---\n".join(tails)  # None: they hung
    assert "SIGTERM received: saved step 4, exiting" in tails[0], tails[0]
    with checkpoint.Checkpointer(out / "checkpoints") as ckpt:
        assert ckpt.all_steps() == [4]
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(line)["step"] for line in f] == [2, 4]


def test_a_locked_out_dir_stops_every_process_of_a_multi_process_run(tmp_path):
    """Process 0 cannot take run.lock (another writer holds it): both processes end with
    the error, process 1 too, instead of waiting for process 0 forever."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(np.random.default_rng(0).choice(["ab", "cd", "ef"], size=500)) + "\n")
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], env=cpu_env(), cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        lock = (out / "run.lock").read_bytes()
        argv = ["train.py", "--preset", "tiny", "--data", str(corpus), "--out-dir", str(out),
                "--batch-size", "4", "--seq-len", "16", "--max-steps", "3", "--sample-tokens", "0",
                "--no-compile-cache", "--coordinator-address", f"localhost:{free_port()}",
                "--num-processes", "2", "--distributed-timeout", "60"]
        codes, tails = run_together([[*argv, "--process-id", str(i)] for i in range(2)], tmp_path,
                                    env=cpu_env(), timeout_s=150)
        assert codes == [1, 1], "\n---\n".join(tails)
        last = [[line for line in tail.splitlines() if line.strip()][-1] for tail in tails]
        assert last[0].startswith(f"train.py: error: {str(out)!r} is in use by pid {holder.pid} on "), tails[0]
        assert last[1] == (f"train.py: error: --out-dir {str(out)!r} could not be locked by process 0: "
                           f"another run holds it (process 0 names the holder)"), tails[1]
        assert not any("Traceback" in tail for tail in tails), "\n---\n".join(tails)
        assert os.listdir(out) == ["run.lock"] and (out / "run.lock").read_bytes() == lock
    finally:
        holder.communicate("", timeout=60)
