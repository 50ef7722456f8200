"""The README's main example runs as written."""

import os
import re

README = os.path.join(os.path.dirname(__file__), os.pardir, "README.md")


def test_readme_example_runs():
  with open(README) as f:
    first_block = re.findall(r"```python\n(.*?)```", f.read(), re.S)[0]
  namespace = {}
  exec(compile(first_block, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["nngp"].shape == namespace["ntk"].shape == (4, 2)
  assert namespace["kernel"].nngp.shape == (4, 4)
  assert namespace["y"].shape == (4, 10)
  # The empirical block runs with the same model and variables.
  with open(README) as f:
    blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
  empirical = next(b for b in blocks if "empirical_kernel_fn" in b)
  exec(compile(empirical, "README.md", "exec"), namespace)  # pylint: disable=exec-used
  assert namespace["ntk"].shape == (4, 2)
