import os


def pytest_configure(config):
    config.addinivalue_line("markers", "vllm: needs a real vLLM (run with `make test-vllm`; skipped without vllm)")
    # vLLM logs every engine build at INFO; keep test output readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
