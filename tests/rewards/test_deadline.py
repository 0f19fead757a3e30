import signal
import threading
import time

import pytest

from nemo_gdro.rewards._deadline import VerificationTimeout, soft_deadline


def _spin(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


def test_interrupts_python_code_and_passes_through_except_exception():
    t0 = time.monotonic()
    with pytest.raises(VerificationTimeout):
        with soft_deadline(0.2):
            try:
                _spin(10.0)
            except Exception:  # what math-verify / sympy do; the timeout must not be swallowed
                pass
    assert time.monotonic() - t0 < 5.0
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def test_no_timeout_when_fast_and_handler_restored():
    before = signal.getsignal(signal.SIGALRM)
    with soft_deadline(5.0):
        pass
    assert signal.getsignal(signal.SIGALRM) is before
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0.0


def test_nested_deadlines_the_tighter_wins_and_the_outer_is_rearmed():
    with pytest.raises(VerificationTimeout):
        with soft_deadline(0.3):
            with soft_deadline(10.0):  # inner is looser: the outer 0.3 s still applies
                _spin(10.0)
    with soft_deadline(10.0):
        with pytest.raises(VerificationTimeout):
            with soft_deadline(0.1):
                _spin(10.0)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 0.0 < remaining <= 10.0  # the outer deadline is armed again


def test_off_the_main_thread_it_is_a_no_op():
    out = []

    def run():
        with soft_deadline(0.01):
            _spin(0.1)
        out.append("done")

    t = threading.Thread(target=run)
    t.start()
    t.join()
    assert out == ["done"]


def test_bad_seconds():
    with pytest.raises(ValueError, match="> 0"):
        with soft_deadline(0.0):
            pass
