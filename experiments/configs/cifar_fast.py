r"""Time to accuracy, airbench-style: airbench94's network and recipe (Keller Jordan,
arXiv:2404.00498: 94.0% CIFAR-10 in 3.8 A100-seconds) on this 2-core CPU.

  python -m experiments.train --config experiments/configs/cifar_fast.py --workdir runs/cifar_fast
  (offline: add --config.data.source=../shared/data/cifar10.npz)

AirbenchNet (cnnjax/models/airbench.py: frozen data-whitened 2x2 stem, dirac-initialised
convs, scale-free batch norm, 1/9 logit scale), all 50k training images (no validation
split), batch 1024, Nesterov SGD 0.85, label smoothing 0.2, batch-norm offsets at 64x the
learning rate, random 2-pixel translations and flips, test-time flips, 10 epochs.
Airbench's lr 11.5 and weight decay 0.0153 are per 1024 examples of a summed loss, scaled
by 1 / (1024 * (1 + 1 / (1 - momentum))); here the loss is a mean, so lr 1.5 and L2 decay
0.0153 / 7851. Left out: the whitening bias frozen after 3 epochs, lookahead, alternating
flips; translated test-time views are there (eval_shift) but off, see below.

Result (2-core AMD EPYC, 2026-12-01), with XLA's kernels, seeds 0/1/2: 92.6/92.5/93.5% on the
1,000 lossless test images (mean 92.9%), 84.2/84.7/84.1% on 10k (9k JPEG), in 24.5 min wall
including compilation, whitening and test (seed 0, quiet machine: 10 epochs of ~143 s, ~350
images/s; seeds 1 and 2 ran beside other jobs: 25.2 and 35.1 min). With cnnjax's oneDNN
convolutions and batch norm (the default on x86-64 Linux), seed 0: 93.0% lossless / 84.5%
on 10k in 17.0 min (quiet; 10 epochs of ~100 s). Short of airbench's 94%. The
9k JPEG-decoded test images cost this network ~9 points (BNCNN loses ~3.5), likely because
the whitening stem amplifies the high-frequency directions where JPEG's artifacts live (not
checked). Translated
test-time views (--config.eval_shift=1, rerunning the finished run) moved the lossless 1k
by -0.4/+0.1 points and the 10k by +0.5/+0.2 (seeds 0/1): not the default.
"""
from experiments.configs import default

MOMENTUM = 0.85
KILOSTEP = 1024 * (1 + 1 / (1 - MOMENTUM))  # airbench's normalisation of lr and decay


def get_config():
  c = default.get_config()
  c.model.name = "airbench"
  c.data.val_size = 0
  c.data.augment.crop_padding = 2
  c.data.augment.horizontal_flip = True
  c.batch_size = 1024
  c.eval_batch_size = 1000
  c.num_epochs = 10
  c.label_smoothing = 0.2
  c.eval_flip = True
  c.optimizer.name = "sgd"
  c.optimizer.momentum = MOMENTUM
  c.optimizer.nesterov = True
  c.optimizer.lr = 11.5 * 1024 / KILOSTEP
  c.optimizer.weight_decay = 0.0153 / KILOSTEP
  c.optimizer.groups = ("whiten/kernel:frozen", r".*/BatchNorm_\d+/bias:64",
                        r"(whiten/bias|.*/Conv_\d+/kernel|Dense_0/kernel):1")
  # airbench's triangle: 0.2 -> 1 over the first 23% of steps, then down (to 0.07 at the end)
  c.schedule.name = "one_cycle"
  c.schedule.anneal = "linear"
  c.schedule.pct_start = 0.23
  c.schedule.div_factor = 5.0
  c.schedule.final_div_factor = 0.2 / 0.07
  return c
