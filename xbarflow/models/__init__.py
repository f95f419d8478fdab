"""Networks as plain ``nn.Module`` builders, each called by ``_target_`` with ``in_shape`` and ``num_classes``."""
from .lenet import lenet5
from .paper import PadTo, cnn, fcn
from .resnet import BasicBlock, CifarResNet, resnet20
from .tv import torchvision_model
from .vgg import vgg

__all__ = ["fcn", "cnn", "PadTo", "lenet5", "resnet20", "CifarResNet", "BasicBlock", "vgg", "torchvision_model"]
