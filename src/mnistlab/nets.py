"""The networks, plain nn.Modules built by `_target_` from conf/model/ (MnistMLP wraps whichever is chosen). Each takes
flattened [B, 784] images in [0, 1] and returns [B, num_classes] logits; `config_problems` says what is wrong with
its config before anything starts (config.problems calls it)."""

from __future__ import annotations

from numbers import Real

from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU}
INITS = ("torch", "keras")


def _int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _rate(x) -> bool:
    return isinstance(x, Real) and not isinstance(x, bool) and 0 <= x < 1


class MLP(nn.Sequential):
    """The book's Dense stack (Linear, activation[, dropout]) ... Linear. init "torch" keeps nn.Linear's own
    initialisation; "keras" is Dense's: glorot_uniform kernel, zero bias."""

    def __init__(self, input_size: int, hidden_sizes: list[int], num_classes: int, activation: str, dropout: float,
                 init: str = "torch"):
        layers: list[nn.Module] = []
        width = input_size
        for h in hidden_sizes:
            layers += [nn.Linear(width, h), ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        super().__init__(*layers)
        if init == "keras":
            for layer in layers:
                if isinstance(layer, nn.Linear):
                    nn.init.xavier_uniform_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @staticmethod
    def config_problems(model) -> list[tuple[str, bool, str]]:
        hidden = model.get("hidden_sizes")
        return [
            ("hidden_sizes", isinstance(hidden, (list, tuple)) and all(_int(h) and h >= 1 for h in hidden),
             "must be a list of layer widths >= 1, e.g. [512]"),
            ("activation", model.get("activation") in ACTIVATIONS, f"must be one of {list(ACTIVATIONS)}"),
            ("dropout", _rate(model.get("dropout")), "must be in [0, 1)"),
            ("init", model.get("init") in INITS, f"must be one of {list(INITS)}"),
        ]


class SmallCNN(nn.Module):
    """Two 3x3 conv blocks (conv, relu, 2x2 max-pool) and a dense classifier: a second model to show that a new one is
    a module and a yaml (conf/model/cnn.yaml). It reshapes the flattened images itself."""

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32), hidden: int = 64,
                 dropout: float = 0.0, input_size: int = 784):
        super().__init__()
        self.side = int(round(input_size ** 0.5))
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        side = self.side // 4
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c2 * side * side, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x.view(-1, 1, self.side, self.side)))

    @staticmethod
    def config_problems(model) -> list[tuple[str, bool, str]]:
        channels = model.get("channels")
        side = int(round(float(model.get("input_size", 784)) ** 0.5))
        return [
            ("channels", isinstance(channels, (list, tuple)) and len(channels) == 2 and all(_int(c) and c >= 1 for c in channels),
             "must be two channel counts >= 1, e.g. [16, 32]"),
            ("hidden", _int(model.get("hidden")) and model.get("hidden") >= 1, "must be an integer >= 1"),
            ("dropout", _rate(model.get("dropout")), "must be in [0, 1)"),
            ("input_size", side * side == model.get("input_size", 784) and side % 4 == 0,
             "must be a square image whose side divides by 4 (784 = 28 x 28)"),
        ]
