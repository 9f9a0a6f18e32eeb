"""`python tests/signal_one_process.py STEP TRAIN_ARGS...`: runs train.py with TRAIN_ARGS and,
only on the process whose `--process-id` is 1, sends itself SIGTERM right after step STEP's
metrics are written. The other process never gets a signal (tests/test_faults.py)."""
import os
import runpy
import signal
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

if __name__ == "__main__":
    at_step, args = int(sys.argv[1]), sys.argv[2:]
    if args[args.index("--process-id") + 1] == "1":
        from transformer_jax import run_log

        write = run_log.RunLog.write

        def write_then_signal(self, record):
            write(self, record)
            if record["step"] == at_step:
                os.kill(os.getpid(), signal.SIGTERM)

        run_log.RunLog.write = write_then_signal
    sys.argv = ["train.py", *args]
    runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
