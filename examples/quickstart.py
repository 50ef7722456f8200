"""Infinite-width networks on scikit-learn's digits, in a few lines.

Builds a fully connected network and a CNN from `flax_tangents.nn` (ordinary
Linen modules), takes their infinite-width NNGP and NTK with `ft.kernel_fn`,
and classifies the 8x8 digits by exact Bayesian inference (NNGP) and by
infinitely long gradient descent (NTK). Runs on a CPU in well under a minute.

  python examples/quickstart.py
"""

import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from sklearn.datasets import load_digits

import flax_tangents as ft
from flax_tangents import nn as ftn


def digits(n_train: int = 1000, n_test: int = 500):
  """Digits as (N, 8, 8, 1) images in [-0.5, 0.5], targets one-hot - 0.1."""
  data = load_digits()
  images = data.images[..., None].astype(np.float32) / 16.0 - 0.5
  permutation = np.random.RandomState(0).permutation(len(images))
  images, labels = images[permutation], data.target[permutation]
  targets = np.eye(10, dtype=np.float32)[labels] - 0.1
  train = slice(0, n_train)
  test = slice(n_train, n_train + n_test)
  return images[train], targets[train], images[test], labels[test]


def accuracy(mean: jax.Array, labels: np.ndarray) -> float:
  return float(np.mean(np.argmax(np.asarray(mean), axis=-1) == labels))


def evaluate(name: str, model: nn.Module, x_train, y_train, x_test, labels,
             batch_size: int = 0) -> None:
  start = time.perf_counter()
  kernel_fn = ft.kernel_fn(model)
  if batch_size:
    # Tiles of the kernel are computed one at a time (on every device).
    kernel_fn = ft.batch(kernel_fn, batch_size=batch_size)
  predict_fn = ft.predict.gradient_descent_mse_ensemble(
      kernel_fn, x_train, y_train, diag_reg=1e-4)
  # t=None: the infinite-time limit. The NNGP mean is the GP posterior mean;
  # the NTK mean is what an infinite ensemble of wide networks converges to.
  mean = predict_fn(x_test=x_test, get=("nngp", "ntk"))
  seconds = time.perf_counter() - start
  print(f"{name:>4}: NNGP accuracy {accuracy(mean.nngp, labels):.3f}, "
        f"NTK accuracy {accuracy(mean.ntk, labels):.3f}  ({seconds:.1f} s)")


def main() -> None:
  x_train, y_train, x_test, labels = digits()
  print(f"{len(x_train)} training and {len(x_test)} test digits")

  fcn = nn.Sequential([
      ftn.Flatten(),
      ftn.Dense(512, W_std=1.5, b_std=0.05), ftn.Relu(),
      ftn.Dense(512, W_std=1.5, b_std=0.05), ftn.Relu(),
      ftn.Dense(10, W_std=1.5, b_std=0.05),
  ])
  evaluate("FCN", fcn, x_train, y_train, x_test, labels)

  # Ends in Flatten: every layer stores only spatial diagonals.
  cnn = nn.Sequential([
      ftn.Conv(64, (3, 3), padding="SAME", W_std=1.5, b_std=0.05),
      ftn.Relu(),
      ftn.Conv(64, (3, 3), padding="SAME", W_std=1.5, b_std=0.05),
      ftn.Relu(),
      ftn.Flatten(),
      ftn.Dense(10, W_std=1.5, b_std=0.05),
  ])
  evaluate("CNN", cnn, x_train, y_train, x_test, labels, batch_size=250)


if __name__ == "__main__":
  jnp.zeros(())  # initialize the backend before timing
  main()
