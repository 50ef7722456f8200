"""Infinite-width networks on scikit-learn's digits, in a few lines.

Builds a fully connected network and a CNN from `flax_tangents.nn` (ordinary
Linen modules), takes their infinite-width NNGP and NTK with `ft.kernel_fn`,
and classifies the 8x8 digits by exact Bayesian inference (NNGP) and by
infinitely long gradient descent (NTK). Runs on a CPU in well under a minute.

  python examples/quickstart.py
  python examples/quickstart.py --models fcn --n-train 1500 --n-test 297
  python examples/quickstart.py --help
"""

import argparse
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


def fcn(depth: int, W_std: float, b_std: float) -> nn.Module:
  layers = [ftn.Flatten()]
  for _ in range(depth):
    layers += [ftn.Dense(512, W_std=W_std, b_std=b_std), ftn.Relu()]
  return nn.Sequential(layers + [ftn.Dense(10, W_std=W_std, b_std=b_std)])


def cnn(depth: int, W_std: float, b_std: float) -> nn.Module:
  layers = []
  for _ in range(depth):
    layers += [ftn.Conv(64, (3, 3), padding="SAME", W_std=W_std, b_std=b_std),
               ftn.Relu()]
  # Ends in Flatten: every layer stores only spatial diagonals.
  return nn.Sequential(layers + [ftn.Flatten(),
                                 ftn.Dense(10, W_std=W_std, b_std=b_std)])


def parse_args(argv=None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(
      description="Infinite-width FCN and CNN classifiers (NNGP and NTK) on "
      "scikit-learn's 8x8 digits.")
  parser.add_argument("--models", default="fcn,cnn",
                      help="comma-separated: fcn, cnn (default: %(default)s)")
  parser.add_argument("--n-train", type=int, default=1000,
                      help="training digits (default: %(default)s)")
  parser.add_argument("--n-test", type=int, default=500,
                      help="test digits (default: %(default)s; at most "
                      "1797 - n_train)")
  parser.add_argument("--depth", type=int, default=2,
                      help="hidden layers (default: %(default)s)")
  parser.add_argument("--W-std", type=float, default=1.5,
                      help="weight standard deviation (default: %(default)s)")
  parser.add_argument("--b-std", type=float, default=0.05,
                      help="bias standard deviation (default: %(default)s)")
  parser.add_argument("--batch-size", type=int, default=250,
                      help="CNN kernel tile size for ft.batch; 0: no tiling "
                      "(default: %(default)s)")
  args = parser.parse_args(argv)
  unknown = set(args.models.split(",")) - {"fcn", "cnn"}
  if unknown:
    parser.error(f"unknown models {sorted(unknown)}; choose fcn and/or cnn")
  if args.n_train < 1 or args.n_test < 1 or args.n_train + args.n_test > 1797:
    parser.error("need n_train, n_test >= 1 and n_train + n_test <= 1797")
  return args


def main(argv=None) -> None:
  args = parse_args(argv)
  x_train, y_train, x_test, labels = digits(args.n_train, args.n_test)
  print(f"{len(x_train)} training and {len(x_test)} test digits")
  for name in args.models.split(","):
    build, batch_size = (fcn, 0) if name == "fcn" else (cnn, args.batch_size)
    evaluate(name.upper(), build(args.depth, args.W_std, args.b_std), x_train,
             y_train, x_test, labels, batch_size=batch_size)


if __name__ == "__main__":
  jnp.zeros(())  # initialize the backend before timing
  main()
