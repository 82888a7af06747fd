r"""Time to accuracy, airbench-style: airbench94's network and recipe (Keller Jordan,
arXiv:2404.00498: 94.0% CIFAR-10 in 3.8 A100-seconds) on this 2-core CPU.

  python -m experiments.cifar --config experiments/configs/cifar_fast.py --workdir runs/cifar_fast
  (offline: add --config.data.source=../shared/data/cifar10.npz)

AirbenchNet (cnnjax/models/airbench.py: frozen data-whitened 2x2 stem, dirac-initialised
convs, scale-free batch norm, 1/9 logit scale), all 50k training images (no validation
split), batch 1024, Nesterov SGD 0.85, label smoothing 0.2, batch-norm offsets at 64x the
learning rate, random 2-pixel translations and flips, test-time flips, 10 epochs.
Airbench's lr 11.5 and weight decay 0.0153 are per 1024 examples of a summed loss, scaled
by 1 / (1024 * (1 + 1 / (1 - momentum))); here the loss is a mean, so lr 1.5 and L2 decay
0.0153 / 7851. Left out: the whitening bias frozen after 3 epochs, lookahead, translated
test-time views, alternating flips (together ~+0.5-1% in airbench's ablations).

Result on this machine: not measured yet. A train step runs at ~120-150 images/s (batch
256-512, measured while another job shared the 2 cores), so the 10 epochs take ~35-60 min;
a 2-epoch smoke run on 4k images learns (35% lossless test accuracy after 8 steps).
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
