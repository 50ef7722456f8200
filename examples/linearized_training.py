"""A wide network, its linearization and the NTK prediction on digits.

Trains a one-hidden-layer ReLU network built from `flax_tangents.nn` on
scikit-learn's bundled 8x8 digits (no download) with `optax.sgd`, together
with its linearization around initialization, and compares both with the
gradient-flow predictions of `ft.predict` from the empirical NTK at
initialization and from the analytic infinite-width NTK, at `t = step * lr`.
The gaps shrink as the width grows. Writes a PNG of the loss curves and
prints the final gaps for each width.

  python examples/linearized_training.py --widths 128 2048 --out curves.png
"""

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from sklearn.datasets import load_digits

import flax_tangents as ft
from flax_tangents import nn as ftn

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)


def digits(n_train: int, n_test: int, seed: int = 0):
  """Standardized digits; targets one-hot, centred (MSE regression)."""
  x, labels = load_digits(return_X_y=True)
  order = np.random.default_rng(seed).permutation(len(x))
  x, labels = x[order].astype(np.float32), labels[order]
  x = (x - x.mean(0)) / (x.std(0) + 1e-6)
  y = np.eye(10, dtype=np.float32)[labels] - 0.1
  split = slice(0, n_train), slice(n_train, n_train + n_test)
  return [jnp.asarray(a[s]) for s in split for a in (x, y)]


def model_of(width: int) -> nn.Module:
  return nn.Sequential([ftn.Dense(width, W_std=1.5, b_std=0.05), ftn.Relu(),
                        ftn.Dense(10, W_std=1.5, b_std=0.05)])


def run(width, x_train, y_train, x_test, y_test, steps, lr_fraction, seed):
  model = model_of(width)
  variables = model.init(jax.random.PRNGKey(seed), x_train)
  # A fraction of the largest stable rate of the infinite-width network.
  ntk = ft.kernel_fn(model)(x_train, None, "ntk")
  lr = lr_fraction * ft.predict.max_learning_rate(ntk, y_train.size)
  return lr, ft.train.fit(
      model.apply, variables, optax.sgd(lr), x_train, y_train, x_test, y_test,
      steps=steps, record_steps=max(steps // 30, 1), learning_rate=lr,
      ntk_trace_axes=(-1,), progress=False)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", type=int, nargs="+", default=[128, 2048])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--n-train", type=int, default=256)
  parser.add_argument("--n-test", type=int, default=256)
  parser.add_argument("--lr-fraction", type=float, default=0.5,
                      help="learning rate as a fraction of the maximal one")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default="linearized_training.png")
  args = parser.parse_args()

  x_train, y_train, x_test, y_test = digits(args.n_train, args.n_test)
  fig, axes = plt.subplots(1, len(args.widths), sharey=True,
                           figsize=(5 * len(args.widths), 4), squeeze=False)
  for ax, width in zip(axes[0], args.widths):
    start = time.time()
    lr, result = run(width, x_train, y_train, x_test, y_test, args.steps,
                     args.lr_fraction, args.seed)
    curves = {"network": result.network, "linearized": result.linearized,
              "NTK (empirical, init)": result.ntk_empirical,
              "NTK (infinite width)": result.ntk_analytic}
    for (label, c), color in zip(curves.items(), ("C0", "C1", "C2", "C3")):
      ax.plot(result.steps, c.train_loss, color=color, label=f"{label} train")
      ax.plot(result.steps, c.test_loss, color=color, ls="--",
              label=f"{label} test")
    ax.set(title=f"width {width} (lr {lr:.3g})", xlabel="step",
           ylabel="MSE loss", yscale="log")

    gaps = result.final_gaps()
    print(f"width {width}: lr {lr:.4g}, {args.steps} steps, "
          f"{time.time() - start:.1f}s")
    print(f"  final test loss: network {result.network.test_loss[-1]:.4f}, "
          f"linearized {result.linearized.test_loss[-1]:.4f}, "
          f"NTK empirical {result.ntk_empirical.test_loss[-1]:.4f}, "
          f"NTK infinite {result.ntk_analytic.test_loss[-1]:.4f}")
    print(f"  final test accuracy: network "
          f"{result.network.test_accuracy[-1]:.3f}, linearized "
          f"{result.linearized.test_accuracy[-1]:.3f}, NTK infinite "
          f"{result.ntk_analytic.test_accuracy[-1]:.3f}")
    for pair in ("network-linearized", "network-ntk_empirical",
                 "network-ntk_analytic", "linearized-ntk_empirical"):
      print(f"  RMS output gap {pair:26s} train "
            f"{gaps[pair + '/fx_train']:.4f}  "
            f"test {gaps[pair + '/fx_test']:.4f}"
            f"   |test loss gap| {gaps[pair + '/test_loss']:.2e}")
  axes[0][0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(args.out, dpi=120)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
