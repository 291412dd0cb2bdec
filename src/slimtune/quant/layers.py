"""Frozen quantized linear layers with bit-packed integer codes, and their PEFT LoRA wrapper.

:class:`QuantLinear` replaces an ``nn.Linear`` after post-training quantization
(RTN or GPTQ). It stores, as buffers (nothing in it is trainable):

* ``qweight`` -- uint8 ``[out, ceil(in * bits / 8)]`` (padded, see below): the
  integer codes ``q in [0, 2**bits - 1]`` of each output row packed as a
  little-endian bit stream: code ``j`` of a row occupies bits
  ``[j * bits, (j + 1) * bits)`` of that row's bytes, bit 0 being the least
  significant bit of byte 0. For 2/4/8 bits this is "``8 // bits`` codes per
  byte, code ``j`` in byte ``j // (8 // bits)`` at shift ``(j % (8 // bits)) * bits``";
  3-bit codes really take 3 bits (8 codes in 3 bytes). Each row is padded
  with zero codes to a multiple of 8 codes (3 bits) or ``8 // bits`` codes.
* ``qzeros`` -- uint8, the integer zero points ``[out, n_groups]`` packed the
  same way (zero points are integers in ``[0, 2**bits - 1]`` for both grids).
* ``scales`` -- float16 (by default) ``[out, n_groups]``.
* ``g_idx`` -- optional int32 ``[in]``: group id of each input column. Absent
  means ``g_idx[c] = c // group_size`` (or 0 without groups). slimtune's GPTQ
  keeps groups on the original column order even with ``act_order`` (static
  groups), so it never needs one; the buffer exists for layers whose groups
  follow a permuted order.
* ``bias`` -- optional, in the model's dtype.

The weight is ``scales[r, g_idx[c]] * (q[r, c] - zeros[r, g_idx[c]])``, computed
in float32 (the formula of :func:`slimtune.quant.grid.dequantize_values`) and
cast to the input's dtype. The forward dequantizes on every call (no cached
float weight) and runs ``F.linear`` in the input dtype.

``scales`` keep their dtype when the module is cast (``model.half()``,
``model.to(torch.bfloat16)``): only the bias follows such casts; device moves
apply to every buffer.

PEFT: :class:`QuantLinear` is not an ``nn.Linear`` (it has no float ``weight``,
so PEFT's default LoRA layer, which merges into ``weight``, does not apply).
LoRA on it goes through PEFT's custom-module mechanism with
:class:`QuantLinearLora`; :func:`register_quant_lora` adds the mapping to a
``LoraConfig``::

    config = register_quant_lora(LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    model = peft.get_peft_model(model, config)

The mapping is not saved in ``adapter_config.json``: register it again on the
config passed to ``PeftModel.from_pretrained(..., config=config)`` (or use
:func:`slimtune.quant.export.load_quantized`, which does).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimtuneError
from slimtune.quant.grid import QuantSpec, dequantize_values, group_index, quantize_to_grid

_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# --------------------------------------------------------------------------- packing


def packed_width(n_codes: int, bits: int) -> int:
    """Bytes per row that :func:`pack_codes` uses for ``n_codes`` codes of ``bits`` bits."""
    if bits == 3:
        return (n_codes + 7) // 8 * 3
    per_byte = 8 // bits
    return (n_codes + per_byte - 1) // per_byte


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``[rows, n]`` (values < ``2**bits``) into uint8 ``[rows, packed_width(n, bits)]``.

    Layout: a little-endian bit stream per row (see the module docstring).
    """
    if bits not in (2, 3, 4, 8):
        raise SlimtuneError(f"bits={bits!r} cannot be packed; valid: 2, 3, 4, 8")
    if q.dim() != 2:
        raise SlimtuneError(f"codes shape={tuple(q.shape)} is not valid; valid: a 2-D [rows, n] tensor")
    rows, n = q.shape
    if bits == 8:
        return q.to(torch.uint8).contiguous()
    group = 8 if bits == 3 else 8 // bits  # codes per packing unit (3 bytes for 3 bits, else 1 byte)
    pad = (-n) % group
    codes = q.to(torch.int32)
    if pad:
        codes = F.pad(codes, (0, pad))
    codes = codes.reshape(rows, -1, group)
    shifts = torch.arange(group, device=q.device, dtype=torch.int32) * bits
    value = (codes << shifts).sum(dim=-1, dtype=torch.int32)  # at most 24 bits
    if bits == 3:
        byte_shifts = torch.tensor([0, 8, 16], device=q.device, dtype=torch.int32)
        value = ((value.unsqueeze(-1) >> byte_shifts) & 0xFF).reshape(rows, -1)
    return value.to(torch.uint8).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 codes ``[rows, n]``."""
    if bits not in (2, 3, 4, 8):
        raise SlimtuneError(f"bits={bits!r} cannot be unpacked; valid: 2, 3, 4, 8")
    rows = packed.shape[0]
    if bits == 8:
        return packed[:, :n]
    p = packed.to(torch.int32)
    if bits == 3:
        p = p.reshape(rows, -1, 3)
        byte_shifts = torch.tensor([0, 8, 16], device=packed.device, dtype=torch.int32)
        p = (p << byte_shifts).sum(dim=-1, dtype=torch.int32)
        group = 8
    else:
        group = 8 // bits
    shifts = torch.arange(group, device=packed.device, dtype=torch.int32) * bits
    codes = (p.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return codes.reshape(rows, -1)[:, :n].to(torch.uint8)


# --------------------------------------------------------------------------- layer


class QuantLinear(nn.Module):
    """Frozen linear layer ``y = x @ dequant(Q).T + b`` with bit-packed codes (see module docstring).

    Args:
        in_features, out_features: Layer shape.
        spec: Grid (bits, group size, symmetry) the codes were produced with.
        bias: Whether the layer has a bias buffer.
        has_g_idx: Store an explicit per-column group index.
        act_order: Informational flag (GPTQ visited columns by Hessian order);
            recorded in exported manifests, not used by the forward.
        dtype: dtype of the bias (the model's dtype).
        scale_dtype: dtype of ``scales`` (float16 by default).
        device: Where the (zero-filled) buffers are created.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        spec: QuantSpec,
        bias: bool = True,
        *,
        has_g_idx: bool = False,
        act_order: bool = False,
        dtype: torch.dtype = torch.float32,
        scale_dtype: torch.dtype = torch.float16,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise SlimtuneError(f"spec={spec!r} is not valid; valid: a QuantSpec")
        if scale_dtype not in _SCALE_DTYPES:
            raise SlimtuneError(
                f"scale_dtype={scale_dtype} is not valid; valid: float16, bfloat16, float32"
            )
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.spec = spec
        self.act_order = bool(act_order)
        n_groups = spec.n_groups(self.in_features)
        self.register_buffer(
            "qweight",
            torch.zeros(self.out_features, packed_width(self.in_features, spec.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer(
            "qzeros",
            torch.zeros(self.out_features, packed_width(n_groups, spec.bits), dtype=torch.uint8, device=device),
        )
        self.register_buffer("scales", torch.zeros(self.out_features, n_groups, dtype=scale_dtype, device=device))
        if has_g_idx:
            self.register_buffer("g_idx", group_index(self.in_features, spec, device=device).to(torch.int32))
        else:
            self.register_buffer("g_idx", None)
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=dtype, device=device))
        else:
            self.register_buffer("bias", None)

    # PEFT reads `infeatures`/`outfeatures` to size LoRA factors of quantized layers.
    @property
    def infeatures(self) -> int:
        return self.in_features

    @property
    def outfeatures(self) -> int:
        return self.out_features

    @property
    def bits(self) -> int:
        return self.spec.bits

    @property
    def n_groups(self) -> int:
        return self.spec.n_groups(self.in_features)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_codes(
        cls,
        q_int: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        *,
        g_idx: torch.Tensor | None = None,
        act_order: bool = False,
        dtype: torch.dtype | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> QuantLinear:
        """Layer from codes ``[out, in]`` and per-(row, group) ``scale``/``zero`` ``[out, n_groups]``."""
        out_features, in_features = q_int.shape
        if dtype is None:
            dtype = bias.dtype if bias is not None else torch.float32
        layer = cls(
            in_features,
            out_features,
            spec,
            bias=bias is not None,
            has_g_idx=g_idx is not None,
            act_order=act_order,
            dtype=dtype,
            scale_dtype=scale_dtype,
            device=q_int.device,
        )
        layer.set_codes(q_int, scale, zero, g_idx=g_idx)
        if bias is not None:
            layer.bias.copy_(bias.detach())
        return layer

    @classmethod
    def from_result(
        cls,
        result: Any,
        spec: QuantSpec,
        bias: torch.Tensor | None = None,
        *,
        act_order: bool | None = None,
        dtype: torch.dtype | None = None,
        scale_dtype: torch.dtype = torch.float16,
    ) -> QuantLinear:
        """Layer from a :class:`slimtune.quant.gptq.GPTQResult` (groups on the original column order)."""
        if act_order is None:
            act_order = result.perm is not None
        if dtype is None:
            dtype = bias.dtype if bias is not None else result.dequantized_weight.dtype
        return cls.from_codes(
            result.q_int, result.scale, result.zero, spec, bias,
            act_order=act_order, dtype=dtype, scale_dtype=scale_dtype,
        )

    @classmethod
    def from_linear(
        cls, linear: nn.Module, spec: QuantSpec, *, scale_dtype: torch.dtype = torch.float16
    ) -> QuantLinear:
        """Round-to-nearest quantization of an ``nn.Linear``."""
        weight = getattr(linear, "weight", None)
        if not isinstance(linear, nn.Linear) or weight is None or not weight.is_floating_point():
            raise SlimtuneError(
                f"layer type={type(linear).__name__} cannot be quantized; valid: nn.Linear with a float weight"
            )
        with torch.no_grad():
            q_int, scale, zero = quantize_to_grid(weight.detach(), spec)
            return cls.from_codes(
                q_int, scale, zero, spec, linear.bias,
                dtype=weight.dtype, scale_dtype=scale_dtype,
            )

    # ------------------------------------------------------------------ codes

    @torch.no_grad()
    def set_codes(
        self,
        q_int: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        *,
        g_idx: torch.Tensor | None = None,
    ) -> None:
        """Replace the codes and grid parameters (shapes must match the layer)."""
        shape = (self.out_features, self.in_features)
        gshape = (self.out_features, self.n_groups)
        if tuple(q_int.shape) != shape:
            raise SlimtuneError(f"codes shape={tuple(q_int.shape)} is not valid; valid: {shape}")
        if tuple(scale.shape) != gshape or tuple(zero.shape) != gshape:
            raise SlimtuneError(
                f"scale/zero shape={tuple(scale.shape)}/{tuple(zero.shape)} is not valid; valid: {gshape}"
            )
        maxq = self.spec.maxq
        if int(q_int.min()) < 0 or int(q_int.max()) > maxq:
            raise SlimtuneError(f"codes range=[{int(q_int.min())}, {int(q_int.max())}] is not valid; valid: [0, {maxq}]")
        zr = torch.round(zero.float())
        if not torch.equal(zr, zero.float()) or int(zr.min()) < 0 or int(zr.max()) > maxq:
            raise SlimtuneError(f"zero points are not valid; valid: integers in [0, {maxq}]")
        dev = self.qweight.device
        self.qweight = pack_codes(q_int.to(dev), self.spec.bits)
        self.qzeros = pack_codes(zr.to(device=dev, dtype=torch.int32), self.spec.bits)
        self.scales = scale.detach().to(device=dev, dtype=self.scales.dtype).contiguous()
        if g_idx is not None:
            if tuple(g_idx.shape) != (self.in_features,):
                raise SlimtuneError(f"g_idx shape={tuple(g_idx.shape)} is not valid; valid: ({self.in_features},)")
            self.g_idx = g_idx.detach().to(device=dev, dtype=torch.int32).contiguous()

    def codes(self) -> torch.Tensor:
        """Unpacked uint8 codes ``[out, in]``."""
        return unpack_codes(self.qweight, self.spec.bits, self.in_features)

    def zeros(self) -> torch.Tensor:
        """Unpacked integer zero points as float32 ``[out, n_groups]``."""
        return unpack_codes(self.qzeros, self.spec.bits, self.n_groups).float()

    def column_groups(self) -> torch.Tensor:
        """Group id of every input column (``g_idx`` or ``c // group_size``)."""
        if self.g_idx is not None:
            return self.g_idx.long()
        return group_index(self.in_features, self.spec, device=self.qweight.device)

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """``scales * (q - zeros)`` per column group, float32 (or ``dtype``), ``[out, in]``."""
        g = self.column_groups()
        w = dequantize_values(self.codes(), self.scales.float()[:, g], self.zeros()[:, g])
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, weight, bias)

    def stored_bits(self) -> int:
        """Total bits of the layer's buffers (packed codes, zeros, scales, g_idx, bias)."""
        total = 0
        for buf in (self.qweight, self.qzeros, self.scales, self.g_idx, self.bias):
            if buf is not None:
                total += buf.numel() * buf.element_size() * 8
        return total

    def logical_numel(self) -> int:
        """Weights this layer stands for (what `slimtune.models.stats` counts as its parameters)."""
        return self.n_parameters()

    def n_parameters(self) -> int:
        """Parameters of the float layer this one replaces (weight plus bias)."""
        return self.in_features * self.out_features + (0 if self.bias is None else self.out_features)

    # ------------------------------------------------------------------ dtype protection

    def _apply(self, fn, recurse: bool = True):
        # Device moves apply to everything; dtype casts (model.half(), .to(bf16)) would
        # round the float16 scales, so the scales only follow the device part of `fn`.
        scales = self._buffers.pop("scales")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scales"] = scales
        if scales is not None:
            probe = fn(torch.empty(0, dtype=scales.dtype, device=scales.device))
            if probe.device != scales.device:
                self._buffers["scales"] = scales.to(probe.device)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.spec.bits}, "
            f"group_size={self.spec.group_size}, symmetric={self.spec.symmetric}, bias={self.bias is not None}"
        )


# --------------------------------------------------------------------------- PEFT


try:  # peft is a dependency; keep the module importable if it is broken/missing.
    from peft.tuners.lora.layer import LoraLayer as _LoraLayer
except Exception:  # pragma: no cover
    _LoraLayer = None


if _LoraLayer is not None:

    class QuantLinearLora(nn.Module, _LoraLayer):
        """PEFT LoRA layer on a :class:`QuantLinear`: ``y = Q(x) + scaling * B(A(dropout(x)))``.

        Merging is not supported (the base holds integer codes); keep the
        adapter separate or merge into a float copy of the dequantized weight.
        """

        def __init__(self, base_layer: nn.Module, adapter_name: str, config, r: int = 0, lora_alpha: int = 1, **kwargs):
            super().__init__()
            _LoraLayer.__init__(self, base_layer)
            if getattr(config, "use_dora", False):
                raise SlimtuneError("use_dora=True is not supported on QuantLinear; valid: use_dora=False")
            self._active_adapter = adapter_name
            self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config,
                              target_name=kwargs.get("target_name", ""))

        def resolve_lora_variant(self, *, config, **kwargs):
            return None

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise SlimtuneError(
                "merging LoRA into a QuantLinear is not supported; valid: keep the adapter separate "
                "(save it with save_pretrained) or dequantize the layer first"
            )

        def unmerge(self) -> None:
            pass

        def get_delta_weight(self, adapter: str) -> torch.Tensor:
            return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            result = self.base_layer(x)
            if self.disable_adapters:
                return result
            result_dtype = result.dtype
            for active_adapter in self.active_adapters:
                if active_adapter not in self.lora_A.keys():
                    continue
                lora_A = self.lora_A[active_adapter]
                lora_B = self.lora_B[active_adapter]
                dropout = self.lora_dropout[active_adapter]
                scaling = self.scaling[active_adapter]
                xa = self._cast_input_dtype(x, lora_A.weight.dtype)
                result = result + lora_B(lora_A(dropout(xa))).to(result_dtype) * scaling
            return result.to(result_dtype)

        def __repr__(self) -> str:
            return "lora." + super().__repr__()

else:  # pragma: no cover
    QuantLinearLora = None


def register_quant_lora(lora_config):
    """Register :class:`QuantLinearLora` for :class:`QuantLinear` targets on a ``peft.LoraConfig``; returns it."""
    if QuantLinearLora is None:  # pragma: no cover
        raise ImportError("LoRA on QuantLinear needs peft: pip install peft")
    lora_config._register_custom_module({QuantLinear: QuantLinearLora})
    return lora_config
