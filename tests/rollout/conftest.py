import os


def pytest_configure(config):
    # vLLM logs every engine build at INFO; keep test output readable.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
