"""Models as `_target_` configs and their conversion to crossbars.

References: the plain network itself (an ideal crossbar, no resistance and no variation,
computes exactly what it computes), the first version's FCN/CNN builders (copied here), and
the tile grids worked out by hand.
"""
import math
import textwrap

import pytest
import torch
import torch.nn as nn
from conftest import compose

from xbarflow.builders import build_model
from xbarflow.config import ConfigError, validate
from xbarflow.crossbar.spec import CrossbarSpec
from xbarflow.models import resnet20, torchvision_model
from xbarflow.nn import LayerSelection, convert, crossbar_array_count, format_layer_table, layer_table, set_mode

pytestmark = pytest.mark.numerics

IDEAL_CIRCUIT = CrossbarSpec(rows=64, cols=64, r_source=0.0, r_sink=0.0)


def _old_fcn(in_features, hidden, num_classes):  # xbarflow/models.py before the _target_ configs
    layers, width = [nn.Flatten()], in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def _old_cnn(in_channels, channels, classifier_hidden, num_classes, size=32):
    from xbarflow.models import PadTo

    layers, c = [PadTo(size)], in_channels
    for ch in channels:
        layers += [nn.Conv2d(c, ch, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)]
        c = ch
    side = size // 2 ** len(channels)
    layers += [nn.Flatten(), nn.Linear(c * side * side, classifier_hidden), nn.ReLU(),
               nn.Linear(classifier_hidden, num_classes)]
    return nn.Sequential(*layers)


def _same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("option,old", [
    ("fcn", lambda: _old_fcn(784, [500], 10)),
    ("cnn", lambda: _old_cnn(1, [32, 64], 512, 10, size=32)),
])
def test_paper_models_keep_their_initial_weights(option, old):
    """Same seed -> the same weights as the first version's builders (the paper's results must not move)."""
    typed = validate(compose([f"model={option}"]))
    torch.manual_seed(0)
    new_model = build_model(typed.model, (1, 28, 28), 10)
    torch.manual_seed(0)
    _same_state(new_model, old())
    assert [type(m) for m in new_model] == [type(m) for m in old()]


def _check_ideal_crossbar_equals_plain(model: nn.Module, x: torch.Tensor, **convert_kw):
    torch.manual_seed(1)
    model.eval()
    with torch.no_grad():
        ref = model(x)
        xm = convert(model, IDEAL_CIRCUIT, **convert_kw).eval()
        set_mode(xm, "nominal")
        out = xm(x)
    assert out.shape == ref.shape
    scale = ref.abs().max().item()
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, scale), (out - ref).abs().max()
    return xm


def _randomise_batchnorm(model):
    g = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics: BN really acts
            m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))


def test_resnet20_converts_exactly_and_its_table():
    torch.manual_seed(0)
    model = resnet20((3, 32, 32), 10)
    _randomise_batchnorm(model)
    assert 0.26e6 < sum(p.numel() for p in model.parameters()) < 0.28e6   # He et al.: 0.27 M
    xm = _check_ideal_crossbar_equals_plain(model, torch.rand(4, 3, 32, 32))
    rows = {r.name: r for r in layer_table(xm)}
    assert len(rows) == 1 + 18 + 2 + 1                   # stem, 9 blocks x 2 convs, 2 projections, fc
    assert all(r.placement == "crossbar" for r in rows.values())
    # fan-in C_in * 3 * 3 rows over 64-row tiles, fan-out over 64 columns; two arrays (G+, G-) per tile
    assert rows["conv1"].matrix == (27, 16) and rows["conv1"].tile_grid == (1, 1)
    assert rows["layer1.0.conv1"].matrix == (144, 16) and rows["layer1.0.conv1"].tile_grid == (3, 1)
    assert rows["layer2.0.shortcut.0"].matrix == (16, 32) and rows["layer2.0.shortcut.0"].tile_grid == (1, 1)
    assert rows["layer3.2.conv2"].matrix == (576, 64) and rows["layer3.2.conv2"].tile_grid == (9, 1)
    assert rows["fc"].matrix == (64, 10) and rows["fc"].arrays == 2
    expected = sum(2 * math.ceil(r.matrix[0] / 64) * math.ceil(r.matrix[1] / 64) for r in rows.values())
    assert crossbar_array_count(xm) == expected
    assert f"{expected} arrays" in format_layer_table(layer_table(xm))


def test_layer_selection_first_last_digital_and_patterns():
    model = resnet20((1, 28, 28), 10, width=4)
    sel = LayerSelection(exclude=("*shortcut*",), first_last_digital=True)
    xm = _check_ideal_crossbar_equals_plain(model, torch.rand(2, 1, 28, 28), layers=sel)
    placement = {r.name: r.placement for r in layer_table(xm)}
    assert placement["conv1"] == placement["fc"] == "digital"
    assert placement["layer2.0.shortcut.0"] == placement["layer3.0.shortcut.0"] == "digital"
    assert sum(p == "crossbar" for p in placement.values()) == 18
    only = LayerSelection(include=("layer3.*",))
    assert {n for n, p in ((r.name, r.placement) for r in layer_table(convert(model, IDEAL_CIRCUIT, layers=only)))
            if p == "crossbar"} == {f"layer3.{b}.conv{c}" for b in range(3) for c in (1, 2)} | {"layer3.0.shortcut.0"}


def test_torchvision_resnet18_converts_exactly():
    torch.manual_seed(0)
    model = torchvision_model((1, 32, 32), 7, name="resnet18")
    assert model.conv1.in_channels == 1 and model.fc.out_features == 7
    _randomise_batchnorm(model)
    xm = _check_ideal_crossbar_equals_plain(model, torch.rand(2, 1, 32, 32))
    rows = {r.name: r for r in layer_table(xm)}
    # conv1 7x7 stride 2 padding 3: 49 rows; layer4 3x3 convs: 512*9 = 4608 rows -> 72 x 8 tiles
    assert rows["conv1"].matrix == (49, 64) and rows["conv1"].placement == "crossbar"
    assert rows["layer4.1.conv2"].tile_grid == (72, 8) and rows["layer4.1.conv2"].arrays == 2 * 72 * 8


def test_mobilenet_depthwise_convs_stay_digital():
    torch.manual_seed(0)
    model = torchvision_model((3, 32, 32), 10, name="mobilenet_v3_small")
    _randomise_batchnorm(model)
    xm = _check_ideal_crossbar_equals_plain(model, torch.rand(2, 3, 32, 32))
    table = layer_table(xm)
    grouped = [r for r in table if r.placement == "digital (grouped)"]
    assert len(grouped) == sum(1 for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups > 1) > 0
    assert all(r.arrays == 0 and r.tile_grid is None for r in grouped)
    assert all(r.placement == "crossbar" for r in table if r.placement != "digital (grouped)")


class _UserNet(nn.Module):
    """A user's network: strided, dilated and padded convs, a residual add, BatchNorm, avg-pool."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, stride=2, padding=2, dilation=2)
        self.bn = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, (3, 1), padding=(1, 0), bias=False)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        y = torch.relu(self.bn(self.a(x)))
        y = y + self.b(y)
        return self.head(y.mean(dim=(2, 3)))


def test_user_model_converts_exactly():
    torch.manual_seed(0)
    model = _UserNet()
    _randomise_batchnorm(model)
    xm = _check_ideal_crossbar_equals_plain(model, torch.rand(3, 2, 11, 9))
    assert [(r.name, r.matrix) for r in layer_table(xm)] == [("a", (18, 8)), ("b", (24, 8)), ("head", (8, 5))]


def test_crossbar_with_resistance_differs():
    """The equality above is not vacuous: the same network on a resistive crossbar computes something else."""
    torch.manual_seed(0)
    model = resnet20((1, 28, 28), 10, width=4).eval()
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        xm = set_mode(convert(model, CrossbarSpec(r_source=1000.0, r_sink=1000.0)).eval(), "nominal")
        assert (xm(x) - model(x)).abs().max() > 1e-3


@pytest.mark.parametrize("overrides,message", [
    (["model=resnet20", "model.depth=3"], "model.depth: no such argument of xbarflow.models.resnet20 (arguments: width)"),
    (["model=user", "model._target_=nopkg.Net"], "model._target_=nopkg.Net cannot be imported"),
    (["model=fcn", "model.in_shape=[1,2,3]"], "model.in_shape is set from the dataset"),
])
def test_bad_model_configs_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as info:
        validate(compose(overrides))
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_model_values_are_one_line():
    with pytest.raises(ConfigError) as info:  # refused by validation, before any data is read
        validate(compose(["model.hidden=[500,0]"]))
    assert str(info.value) == "model.hidden[1] must be >= 1 (got 0)"
    with pytest.raises(ConfigError) as info:  # and by build_model, for callers from Python
        build_model({"_target_": "xbarflow.models.fcn", "hidden": [500, 0]}, (1, 28, 28), 10)
    assert str(info.value) == "model.hidden[1] must be >= 1 (got 0)"
    typed = validate(compose(["model=torchvision", "model.name=resnet1800"]))
    with pytest.raises(ConfigError) as info:
        build_model(typed.model, (3, 32, 32), 10)
    assert "model.name must be a torchvision classification model" in str(info.value)


def test_user_class_from_a_file_outside_the_repo(tmp_path, monkeypatch):
    (tmp_path / "mynets.py").write_text(textwrap.dedent("""
        import torch.nn as nn

        class TinyNet(nn.Module):
            def __init__(self, in_shape, num_classes, hidden=16):
                super().__init__()
                self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_shape[0] * in_shape[1] * in_shape[2], hidden),
                                         nn.ReLU(), nn.Linear(hidden, num_classes))

            def forward(self, x):
                return self.net(x)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    typed = validate(compose(["model=user", "model._target_=mynets.TinyNet", "model.hidden=7"]))
    model = build_model(typed.model, (1, 8, 8), 10)
    assert model.net[1].weight.shape == (7, 64) and model.net[3].out_features == 10


def _model_option_keys():
    import yaml
    from conftest import CONF

    return sorted({(p.stem, k) for p in (CONF / "model").glob("*.yaml") for k in yaml.safe_load(p.read_text())})


@pytest.mark.parametrize("option,key", _model_option_keys())
def test_command_line_check_accepts_every_model_key(option, key):
    """run.py's pre-check (xbarflow/cli.py) must let model keys through: the model node is free-form."""
    from conftest import CONF

    from xbarflow.cli import check_overrides

    assert check_overrides([f"model={option}", f"model.{key}=1"], CONF) is None


def test_command_line_check_model_overrides():
    from conftest import CONF

    from xbarflow.cli import check_overrides

    assert check_overrides(["model._target_=mypkg.nets.MyNet", "model.depth=3"], CONF) is None
    assert check_overrides(["model=torchvision", "model.name=resnet18"], CONF) is None
    assert check_overrides(["xbar.layers.exclude=[fc]", "xbar.layers.first_last_digital=true"], CONF) is None
    assert "no such option in config group 'model'" in check_overrides(["model=resnet21"], CONF)
    assert "no such key (keys of xbar.layers" in check_overrides(["xbar.layers.exlude=[fc]"], CONF)
