"""Tasks: what the policy is trained and evaluated on (``data.task``).

A task bundles the training prompt pool, the held-out eval suites, the
verifier that turns a response into a reward, and optional worked examples
for the SFT warm start. Each is chosen by name through
:data:`nemo_gdro.registries.TASKS`; its ``data`` section is the task's own
``Config`` dataclass (``conf/data/<name>.yaml``, selected with ``data=<name>``).
"""

from nemo_gdro.tasks.base import EvalSuite, Task

__all__ = ["Task", "EvalSuite"]
