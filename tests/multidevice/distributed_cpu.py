"""The start of a `jax.distributed` test script: two CPU processes.

Run as `script.py address rank ...` by `tests/multiprocess.py`.
"""

import os
import sys


def initialize() -> None:
  """Two simulated devices per process, gloo collectives, float64.

  Must run before anything imports JAX (its flags are read at import),
  hence the import inside the function.
  """
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"
  import jax  # pylint: disable=import-outside-toplevel
  # Cross-process collectives on CPU need gloo (GPUs and TPUs have their own).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=sys.argv[1],
                             num_processes=2, process_id=int(sys.argv[2]))
  jax.config.update("jax_enable_x64", True)
