"""Med3D ResNet port vs a PyTorch MedicalNet ResNet (written here) with random weights."""

import os

import jax.numpy as jnp
import numpy as np
import pytest

from brain_ldm_jax.errors import ConfigError, DataError
from brain_ldm_jax.metrics import fid as fid_lib
from brain_ldm_jax.metrics import med3d
from brain_ldm_jax.nn import ops
from conftest import import_reference


def _torch_medicalnet(torch, kind, layers):
  """MedicalNet's published ResNet (models/resnet.py, shortcut B), trunk + conv_seg head."""
  nn = torch.nn

  def conv3(i, o, stride=1, dilation=1):
    return nn.Conv3d(i, o, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)

  class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
      super().__init__()
      self.conv1 = conv3(inplanes, planes, stride, dilation)
      self.bn1 = nn.BatchNorm3d(planes)
      self.conv2 = conv3(planes, planes, dilation=dilation)
      self.bn2 = nn.BatchNorm3d(planes)
      self.downsample = downsample

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      res = x if self.downsample is None else self.downsample(x)
      return torch.relu(out + res)

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, dilation=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv3d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm3d(planes)
      self.conv2 = conv3(planes, planes, stride, dilation)
      self.bn2 = nn.BatchNorm3d(planes)
      self.conv3 = nn.Conv3d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm3d(planes * 4)
      self.downsample = downsample

    def forward(self, x):
      out = torch.relu(self.bn1(self.conv1(x)))
      out = torch.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(out))
      res = x if self.downsample is None else self.downsample(x)
      return torch.relu(out + res)

  block = BasicBlock if kind == "basic" else Bottleneck

  class ResNet(nn.Module):

    def __init__(self):
      super().__init__()
      self.inplanes = 64
      self.conv1 = nn.Conv3d(1, 64, 7, stride=(2, 2, 2), padding=(3, 3, 3), bias=False)
      self.bn1 = nn.BatchNorm3d(64)
      self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
      self.layer1 = self._make_layer(64, layers[0])
      self.layer2 = self._make_layer(128, layers[1], stride=2)
      self.layer3 = self._make_layer(256, layers[2], dilation=2)
      self.layer4 = self._make_layer(512, layers[3], dilation=4)
      self.conv_seg = nn.Sequential(nn.ConvTranspose3d(512 * block.expansion, 32, 2, stride=2),
                                    nn.BatchNorm3d(32), nn.ReLU(),
                                    nn.Conv3d(32, 2, 1, bias=False))

    def _make_layer(self, planes, blocks, stride=1, dilation=1):
      down = None
      if stride != 1 or self.inplanes != planes * block.expansion:
        down = nn.Sequential(nn.Conv3d(self.inplanes, planes * block.expansion, 1, stride=stride,
                                       bias=False), nn.BatchNorm3d(planes * block.expansion))
      mods = [block(self.inplanes, planes, stride, dilation, down)]
      self.inplanes = planes * block.expansion
      mods += [block(self.inplanes, planes, dilation=dilation) for _ in range(1, blocks)]
      return nn.Sequential(*mods)

    def features(self, x):
      x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return x.mean(dim=(2, 3, 4))

  model = ResNet()
  # Non-trivial BatchNorm statistics so the test exercises the running-stat conversion.
  g = torch.Generator().manual_seed(0)
  for m in model.modules():
    if isinstance(m, nn.BatchNorm3d):
      m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
      m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
      m.weight.data.copy_(1 + 0.1 * torch.randn(m.num_features, generator=g))
      m.bias.data.copy_(0.1 * torch.randn(m.num_features, generator=g))
  return model.eval()


@pytest.mark.parametrize("depth,kind,layers", [(10, "basic", (1, 1, 1, 1)),
                                               (50, "bottleneck", (3, 4, 6, 3))])
def test_med3d_matches_pytorch_medicalnet(tmp_path, depth, kind, layers):
  torch = import_reference("torch")
  torch.manual_seed(depth)
  model = _torch_medicalnet(torch, kind, layers)
  path = os.path.join(tmp_path, f"resnet_{depth}.pth")
  # MedicalNet's checkpoint format: DataParallel names under "state_dict".
  torch.save({"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, path)

  module, variables = med3d.load_med3d(path)  # depth inferred from the checkpoint
  assert module.depth == depth
  x = np.random.default_rng(depth).standard_normal((1, 32, 32, 32, 1)).astype(np.float32)
  with torch.no_grad():
    want = model.features(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).numpy()
  got = med3d.med3d_features(module, variables, x, batch_size=1, normalize="none")
  assert got.shape == (1, 512 * (1 if kind == "basic" else 4))
  rel = np.linalg.norm(got - want) / np.linalg.norm(want)
  assert rel < 1e-5, rel

  with pytest.raises(DataError, match="ResNet-"):
    med3d.load_med3d(path, depth=18)


def test_dilated_conv_equals_native_dilation():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 5, 7, 6, 3)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((3, 3, 3, 3, 4)), jnp.float32)
  import jax  # pylint: disable=import-outside-toplevel
  for d in (2, 4):
    want = jax.lax.conv_general_dilated(x, k, (1, 1, 1), [(d, d)] * 3, rhs_dilation=(d,) * 3,
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
    got = ops.conv(x, k, strides=(1, 1, 1), padding=[(d, d)] * 3, dilation=d)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_fid_refused_without_weights(tmp_path):
  with pytest.raises(ConfigError, match="resnet_10_23dataset.pth"):
    med3d.med3d_extractor(None, field="evaluate.med3d_weights")
  with pytest.raises(ConfigError, match="does not exist"):
    med3d.load_med3d(os.path.join(tmp_path, "nope.pth"))


def test_named_alternative_extractor():
  ext = fid_lib.FeatureExtractor(name="autoencoder_latent_mean",
                                 fn=lambda v: v.reshape(len(v), -1)[:, :4], batch_size=3)
  rng = np.random.default_rng(0)
  a = rng.standard_normal((10, 2, 2, 2))
  res = fid_lib.compute_fid(a, a, ext)
  assert res.extractor == "autoencoder_latent_mean" and abs(res.value) < 1e-9
