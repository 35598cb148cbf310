"""A per-block latency table: measured once per platform, cached, summed to predict a network.

Measuring a whole network takes seconds; a search ranks thousands. Following Once-for-All, each
entry is one whole inverted-residual block (its expansion, depthwise, SE, activations and
residual add inside the entry, so what fuses inside a block is measured fused), keyed by what
decides its cost: input height, width and channels, expansion and output channels, kernel,
stride, dilation, SE, nonlinearity and residual. The stem, the last conv and the classifier are
entries too. A network's prediction is its entries' sum times a scale, or plus a constant,
fitted on networks measured whole (what the parts miss: calls between blocks, the runtime's
per-call overhead, and weights that stay in cache when a block is timed alone but not inside
a network: on a first measurement the sum missed 0.9 ms of Small's 5.5 ms and 3.1 ms of Large's
17.8 ms, 17 % of each: a proportion more than a constant). The cache is one JSON file per platform, and it refuses to be read on another CPU,
runtime version or thread count.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mnv3.errors import ConfigError
from mnv3.models.mobilenet import MobileNet
from mnv3.search.platform import Platform


@dataclass(frozen=True)
class Part:
    """One measured unit of a network: its table key, the module and the input it runs on."""

    key: str
    module: nn.Module
    input_shape: tuple[int, ...]


def network_parts(network: MobileNet, input_size: tuple[int, int]) -> list[Part]:
    """The stem, every block, the last conv and the classifier of ``network`` with their keys.

    Input shapes come from one forward pass at ``input_size`` (forward hooks), so dilation,
    output stride and odd sizes are keyed as they run.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    named = {"stem": network.stem, "last": network.last_conv}
    named.update({f"block{i}": b for i, b in enumerate(network.blocks)})
    if network.classifier is not None:
        named["head"] = network.classifier
    hooks = [
        m.register_forward_pre_hook(
            lambda _m, args, n=n: shapes.__setitem__(n, tuple(args[0].shape))
        )
        for n, m in named.items()
    ]
    try:
        with torch.no_grad():
            network.eval()(torch.zeros(1, network.arch.in_channels, *input_size))
    finally:
        for hook in hooks:
            hook.remove()
    arch = network.arch
    parts = [
        Part(
            f"stem|{_hw(shapes['stem'])}|{arch.stem_channels}|{arch.stem_activation}",
            network.stem,
            shapes["stem"],
        )
    ]
    for i, block in enumerate(network.blocks):
        spec = arch.blocks[i]
        shape = shapes[f"block{i}"]
        conv = block.depthwise.conv  # as built: output stride may have traded stride for dilation
        stride, dilation, residual = conv.stride[0], conv.dilation[0], block.use_residual
        parts.append(
            Part(
                f"block|{_hw(shape)}|{spec.expanded_channels}|{spec.out_channels}|"
                f"k{spec.kernel_size}|s{stride}|d{dilation}|se{int(spec.use_se)}|"
                f"{spec.activation}|res{int(residual)}",
                block,
                shape,
            )
        )
    parts.append(
        Part(
            f"last|{_hw(shapes['last'])}|{arch.last_channels}|{arch.last_activation}",
            network.last_conv,
            shapes["last"],
        )
    )
    if network.classifier is not None:
        head = network.classifier
        parts.append(
            Part(
                f"head|{_hw(shapes['head'])}|{arch.head_hidden_channels}|{head.fc.out_features}|"
                f"{arch.head_activation}",
                head,
                shapes["head"],
            )
        )
    return parts


def _hw(shape: tuple[int, ...]) -> str:
    return f"{shape[1]}x{shape[2]}x{shape[3]}" if len(shape) == 4 else f"{shape[1]}"


class LatencyTable:
    """Per-part latencies (ms) on one platform, cached in ``path`` (JSON) as they are measured."""

    def __init__(self, platform: Platform, path: str | Path | None = None) -> None:
        self.platform = platform
        # On a platform with a reference, each entry is timed beside an anchor, one block of the
        # reference network (the whole reference beside a 0.1 ms block would cost 50x the
        # block per round), and kept as its ratio to it, so entries measured minutes apart on
        # a drifting machine stay comparable; the fitted scale turns their sum into ms.
        self._anchor: tuple[nn.Module, torch.Tensor] | None = None
        self._anchor_key: str | None = None  # its name: prepared (exported) once per process
        if platform.reference:
            from mnv3.models import build_backbone

            reference = build_backbone(platform.reference, num_classes=1000)
            parts = network_parts(reference, platform.input_size)
            middle = parts[len(parts) // 2]
            x = torch.randn(*middle.input_shape, generator=torch.Generator().manual_seed(0))
            self._anchor = (middle.module, x)
            self._anchor_key = f"middle block of {platform.reference} at {platform.input_size}"
        self.path = Path(path) if path is not None else None
        self.entries: dict[str, float] = {}
        self.constant_ms = 0.0
        self.scale = 1.0
        self.measured = 0  # entries measured by this object (not read from the cache)
        self.runtime = ""
        if self.path is not None and self.path.is_file():
            self._read(self.path)

    def fingerprint(self) -> dict[str, Any]:
        """What an entry's number depends on besides its key: the platform's fingerprint (CPU,
        runtime, threads, the reported statistic and the reference the entries are scaled by)."""
        return self.platform.fingerprint()

    def _read(self, path: Path) -> None:
        """Load this platform's table from ``path``: one file keeps a table per fingerprint
        (another CPU, thread count or timing rule measured into the same file is kept, unused)."""
        tables = self._tables(path)
        mine = [t for t in tables if t.get("fingerprint") == self.fingerprint()]
        if not mine:
            return
        data = mine[0]
        self.entries = {str(k): float(v) for k, v in data["entries"].items()}
        self.constant_ms = float(data.get("constant_ms", 0.0))
        self.scale = float(data.get("scale", 1.0))
        self.runtime = str(data.get("runtime", ""))

    @staticmethod
    def _tables(path: Path) -> list[dict[str, Any]]:
        """Every table in the file at ``path`` ({"tables": [...]}; a file of one table, the
        earlier layout, reads as a list of one); refused in one sentence if unreadable."""
        try:
            data = json.loads(path.read_text())
            tables = data.get("tables", [data])
            if not all(isinstance(t, dict) and isinstance(t["entries"], dict) for t in tables):
                raise TypeError("a table without entries")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"latency table {path} cannot be read ({exc!r}); delete it") from None
        return list(tables)

    def save(self) -> None:
        """Write the table (atomically) where it was opened from, beside the file's tables of
        other platforms, which are kept as they were."""
        if self.path is None:
            return
        from mnv3.deploy.common import atomic_write_json

        mine = {
            "fingerprint": self.fingerprint(),
            "runtime": self.runtime,
            "constant_ms": self.constant_ms,
            "scale": self.scale,
            "entries": dict(sorted(self.entries.items())),
        }
        others = []
        if self.path.is_file():
            others = [
                t for t in self._tables(self.path) if t.get("fingerprint") != self.fingerprint()
            ]
        atomic_write_json(self.path, {"tables": [*others, mine]})

    def part_ms(self, part: Part) -> float:
        """The entry of ``part``, measured (and cached) the first time its key is seen."""
        if part.key not in self.entries:
            x = torch.randn(*part.input_shape, generator=torch.Generator().manual_seed(0))
            if self._anchor is None:
                latency = self.platform.measure(part.module, x)
                self.entries[part.key] = latency.ms
                self.runtime = latency.runtime
            else:
                self.entries[part.key] = self.platform.measure_ratio(
                    part.module, x, *self._anchor, anchor_key=self._anchor_key
                )
                self.runtime = f"{self.platform.runtime} (entries: ratio to an anchor block)"
            self.measured += 1
        return self.entries[part.key]

    def parts_sum(self, network: MobileNet) -> float:
        """The sum of ``network``'s entries (ms), measuring the missing ones."""
        return sum(self.part_ms(p) for p in network_parts(network, self.platform.input_size))

    def predict(self, network: MobileNet) -> float:
        """Predicted whole-network latency (ms): ``scale * sum of entries + constant_ms``."""
        return self.scale * self.parts_sum(network) + self.constant_ms

    def fit(
        self, sums: Sequence[float], measured: Sequence[float], kind: str = "scale"
    ) -> tuple[float, float]:
        """Fit the prediction to networks measured whole, robustly (medians, any count >= 1).

        ``kind="scale"`` (default): ``scale = median(measured / sum)``, no constant;
        ``"constant"``: ``constant_ms = median(measured - sum)``, scale 1 (the issue's "sum
        plus a fitted constant"). Which predicts better is measured by
        ``bench/bench_latency_table.py`` (docs/search.md). Returns (scale, constant_ms).
        """
        if kind == "constant" and self._anchor is not None:
            raise ConfigError(
                f"fit={kind!r} on platform {self.platform.name}, whose entries are ratios to an "
                "anchor block (it has a reference); expected fit=scale"
            )
        if not sums or len(sums) != len(measured):
            raise ValueError("fit needs one measured latency per sum, at least one")
        pairs = list(zip(sums, measured, strict=True))
        if kind == "scale":
            self.scale, self.constant_ms = statistics.median(m / s for s, m in pairs), 0.0
        elif kind == "constant":
            self.scale, self.constant_ms = 1.0, statistics.median(m - s for s, m in pairs)
        else:
            raise ValueError(f"kind={kind!r}; expected scale or constant")
        return self.scale, self.constant_ms
