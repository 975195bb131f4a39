"""Step runners: each runs draft + verify + accept for a batch and returns a ``StepResult``.

* ``EagerRunner`` (eager.py): the general path — prefill, chains and trees of any drafter,
  ragged batches built on the host.
* ``DecodeRunner`` (specdec/cuda_graphs.py): pure-decode chain steps on static buffers
  (``StaticInputs``, static.py), replayed as CUDA graphs on a GPU.
"""

from .eager import EagerRunner, prefill_tails
from .result import StepResult

__all__ = ["EagerRunner", "StepResult", "prefill_tails"]
