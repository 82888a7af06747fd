r"""The ``cifar_bn_fast`` recipe written in plain PyTorch, as a PyTorch user would on a CPU:
the peer of ``benchmarks.job``.

  python -m benchmarks.torch_job --data ../shared/data/cifar10.npz [--epochs 3] [--bf16] [--seed 0]

BNCNN without dropout (``benchmarks.torch_peers.BNCNN``, the same layers and parameter count
as cnnjax's), channels-last, ``torch.set_num_threads(os.cpu_count())``; Adam (eps 1e-8)
under ``OneCycleLR`` to 6e-3 (pct_start 0.25, div 25, final div 1e4, cosine: cnnjax's
one_cycle defaults), batch 128 shuffled each epoch (the remainder dropped), random
horizontal flips, label smoothing 0.1, all 50k training images normalised by their channel
statistics; then the test set with test-time flips (logits of image and mirror averaged), in
batches of 500. ``--bf16``: forward and loss under ``torch.autocast('cpu', torch.bfloat16)``,
evaluation too. Prints one JSON line: accuracy, accuracy on the lossless test images,
seconds of start-up (imports and data), training and evaluation.
"""
import argparse
import json
import os
import time

START = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from benchmarks.torch_peers import BNCNN  # noqa: E402


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", required=True, help="CIFAR-10 .npz (x_train, y_train, x_test, y_test)")
  parser.add_argument("--epochs", type=int, default=3)
  parser.add_argument("--bf16", action="store_true", help="bf16 autocast")
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args()
  torch.manual_seed(args.seed)
  torch.set_num_threads(os.cpu_count())
  data = np.load(args.data)
  pixels = torch.from_numpy(data["x_train"])  # uint8 [N, H, W, C]
  x_train = pixels.permute(0, 3, 1, 2)  # [N, C, H, W]
  y_train = torch.from_numpy(data["y_train"].astype(np.int64))
  x_test = torch.from_numpy(data["x_test"]).permute(0, 3, 1, 2)
  y_test = data["y_test"].astype(np.int64)
  lossless = data["test_is_lossless"] if "test_is_lossless" in data else None
  # Channel statistics, exact as cnnjax's: float64 sums of float32 values and squares in chunks
  # of 1024 images (torch's fastest of those tried; 0.4-0.5 s here).
  total = torch.zeros(2, 3, dtype=torch.float64)
  for chunk in pixels.split(1024):
    values = chunk.reshape(-1, 3).float()
    total[0] += values.sum(0, dtype=torch.float64)
    total[1] += (values * values).sum(0, dtype=torch.float64)
  moments = (total / (pixels.numel() / 3)).numpy()
  mean = torch.tensor(moments[0], dtype=torch.float32).view(1, 3, 1, 1)
  std = torch.tensor(np.sqrt(moments[1] - moments[0] ** 2), dtype=torch.float32).view(1, 3, 1, 1)

  def prepare(images: torch.Tensor) -> torch.Tensor:
    x = (images.float() - mean) / std
    return x.contiguous(memory_format=torch.channels_last)

  model = BNCNN((32, 32, 3), 10, conv_dropout=0.0, dense_dropout=0.0)
  model = model.to(memory_format=torch.channels_last)
  batch, steps_per_epoch = 128, len(y_train) // 128
  optimizer = torch.optim.Adam(model.parameters(), lr=6e-3, eps=1e-8)
  schedule = torch.optim.lr_scheduler.OneCycleLR(
      optimizer, max_lr=6e-3, total_steps=steps_per_epoch * args.epochs, pct_start=0.25,
      div_factor=25.0, final_div_factor=1e4, anneal_strategy="cos", cycle_momentum=False)
  loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
  autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16)
  ready = time.perf_counter()
  for epoch in range(args.epochs):
    model.train()
    order = torch.randperm(len(y_train))
    for i in range(steps_per_epoch):
      idx = order[i * batch:(i + 1) * batch]
      images = x_train[idx]
      flip = torch.rand(len(idx)) < 0.5
      images = torch.where(flip.view(-1, 1, 1, 1), images.flip(3), images)
      with autocast:
        loss = loss_fn(model(prepare(images)), y_train[idx])
      optimizer.zero_grad(set_to_none=True)
      loss.backward()
      optimizer.step()
      schedule.step()
    print(f"epoch {epoch + 1}: {time.perf_counter() - ready:.1f} s, loss {loss.item():.4f}",
          flush=True)
  trained = time.perf_counter()
  model.eval()
  preds = []
  with torch.inference_mode(), autocast:
    for i in range(0, len(y_test), 500):
      x = prepare(x_test[i:i + 500])
      preds.append(((model(x).float() + model(x.flip(3)).float()) / 2).argmax(1).numpy())
  pred = np.concatenate(preds)
  done = time.perf_counter()
  result = {"accuracy": float((pred == y_test).mean()),
            "startup_s": ready - START, "train_s": trained - ready, "eval_s": done - trained}
  if lossless is not None:
    result["accuracy_lossless"] = float((pred == y_test)[lossless].mean())
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  main()
