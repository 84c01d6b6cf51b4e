"""`python fake_server_main.py PORT STEP_DELAY GRACE`: run_server on a FakeEngine (shutdown tests)."""
import sys

from fake_engine import FakeEngine
from lserve.server.launch import run_server

if __name__ == "__main__":
    port, step_delay, grace = int(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
    sys.exit(run_server(FakeEngine(step_delay=step_delay), "fake", port=port, log_level="warning",
                        shutdown_grace_s=grace))
