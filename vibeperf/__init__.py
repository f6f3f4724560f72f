"""vibeperf: performance-first post-training for small reasoning LLMs (the VibeThinker recipe)."""

import torch  # noqa: F401  (loads libtorch, which the compiled extension vibeperf._C links against)

__version__ = "0.1.0"
