"""QConfig: how a module's activations and weights are quantized, and where it applies.

A :class:`QConfig` pairs an activation :class:`QuantSpec` with a weight :class:`QuantSpec`.
``None`` keeps a module in float. A :class:`QConfigMapping` assigns qconfigs by module name,
by module type, through ``module.qconfig`` attributes (inherited by children, the vendor's way:
``model.qconfig = ...; model.loss.qconfig = None``), and globally, in that priority order.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch.nn as nn

from qatkit.base.errors import fail
from qatkit.base.quant_math import QRANGE
from qatkit.quantization.observers import OBSERVERS, Observer

_UNSET = object()


@dataclass(frozen=True)
class QuantSpec:
    """How one tensor is quantized: dtype, observer (name in ``observers.OBSERVERS`` or a
    class), per-channel (weights, axis 0) or per-tensor, or a fixed scale. ``pow2``: the
    scale is rounded up to a power of two (consistency levels 1 and 2, see
    ``qatkit.quantization.consistency``)."""

    dtype: str = "qint8"
    observer: str | type[Observer] = "minmax"
    per_channel: bool = False
    fixed_scale: float | None = None
    observer_kwargs: tuple[tuple[str, Any], ...] = ()
    pow2: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in QRANGE and self.dtype != "float16":
            raise fail("QK000", f"unknown dtype {self.dtype!r} in QuantSpec.",
                       "use 'qint8' or 'qint16' (per the march)")
        if isinstance(self.observer, str) and self.observer not in OBSERVERS:
            raise fail("QK000", f"unknown observer {self.observer!r}.",
                       f"use one of {', '.join(OBSERVERS)} or an Observer subclass")
        if self.fixed_scale is not None and not self.fixed_scale > 0:
            raise fail("QK000", f"fixed_scale must be positive, got {self.fixed_scale}.")

    def make_observer(self) -> Observer:
        if self.fixed_scale is not None:
            return OBSERVERS["fixed"](None, self.dtype, scale=self.fixed_scale)
        cls = OBSERVERS[self.observer] if isinstance(self.observer, str) else self.observer
        return cls(0 if self.per_channel else None, self.dtype, **dict(self.observer_kwargs))

    def with_(self, **kw: Any) -> QuantSpec:
        return replace(self, **kw)


@dataclass(frozen=True)
class QConfig:
    """Activation (output) and weight specs of a module. ``high_precision_output``: a
    conv/linear whose only consumers are DeQuantStubs keeps an int32 (or float) output."""

    activation: QuantSpec | None = field(default_factory=QuantSpec)
    weight: QuantSpec | None = field(
        default_factory=lambda: QuantSpec(per_channel=True))
    high_precision_output: bool = True


def default_calibration_qconfig(dtype: str = "qint8", observer: str = "mse",
                                weight_dtype: str = "qint8") -> QConfig:
    """Calibration: MSE-searched activation thresholds, per-channel min/max weights
    (``weight_dtype="qint16"`` on marches with int16 weights)."""
    return QConfig(QuantSpec(dtype, observer), QuantSpec(weight_dtype, per_channel=True))


def default_qat_qconfig(dtype: str = "qint8", weight_dtype: str = "qint8") -> QConfig:
    """QAT: moving-average min/max activations (constant 0.01), per-channel min/max weights.
    Activation scales loaded from a calibration checkpoint stay fixed during QAT."""
    return QConfig(QuantSpec(dtype, "moving_average"),
                   QuantSpec(weight_dtype, per_channel=True))


def fixed_scale_qconfig(scale: float = 1.0 / 128, dtype: str = "qint8") -> QConfig:
    """For a QuantStub fed by the camera/pyramid (centered YUV444): scale 1/128."""
    return QConfig(QuantSpec(dtype, fixed_scale=scale), None)


class QConfigMapping:
    """Where qconfigs apply. Priority: by name > by type > ``qconfig`` attribute > global."""

    def __init__(self, global_qconfig: QConfig | None = None) -> None:
        self.global_qconfig = global_qconfig
        self.by_name: dict[str, QConfig | None] = {}
        self.by_type: dict[type, QConfig | None] = {}
        #: after :meth:`resolve`: where each module's qconfig came from ("name:x",
        #: "type:Conv2d", "x.qconfig" / "model.qconfig" (an attribute), "global")
        self.sources: dict[str, str] = {}

    def set_global(self, qconfig: QConfig | None) -> QConfigMapping:
        self.global_qconfig = qconfig
        return self

    def set_module_name(self, name: str, qconfig: QConfig | None) -> QConfigMapping:
        self.by_name[name] = qconfig
        return self

    def set_object_type(self, typ: type, qconfig: QConfig | None) -> QConfigMapping:
        self.by_type[typ] = qconfig
        return self

    def resolve(self, model: nn.Module) -> dict[str, QConfig | None]:
        """The effective qconfig of every module, by qualified name."""
        out: dict[str, QConfig | None] = {}
        attr: dict[str, Any] = {}
        attr_from: dict[str, str] = {}
        self.sources = {}
        for name, mod in model.named_modules():
            parent = name.rpartition(".")[0] if name else None
            owner = mod.__dict__.get("_qatkit_owner")
            if owner is not None:  # an operator generated for a torch call: as if the owner's
                parent = owner
                name_for_match = f"{owner}.{name.rpartition('.')[2]}" if owner else \
                    name.rpartition(".")[2]
            else:
                name_for_match = name
            inherited = attr.get(parent, _UNSET) if parent is not None else _UNSET
            own = getattr(mod, "qconfig", _UNSET)
            attr[name] = own if own is not _UNSET else inherited
            attr_from[name] = name if own is not _UNSET else attr_from.get(parent or "", "")
            q: Any = _UNSET
            for prefix in _prefixes(name) if owner is None else [name, *_prefixes(name_for_match)]:
                if prefix in self.by_name:
                    q = self.by_name[prefix]
                    self.sources[name] = f"name:{prefix or '<root>'}"
                    break
            if q is _UNSET:
                t = next((t for t in self.by_type if isinstance(mod, t)), None)
                if t is not None:
                    q = self.by_type[t]
                    self.sources[name] = f"type:{t.__name__}"
            if q is _UNSET:
                if attr[name] is not _UNSET:
                    q = attr[name]
                    self.sources[name] = f"{attr_from[name] or 'model'}.qconfig"
                else:
                    q = self.global_qconfig
                    self.sources[name] = "global"
            if q is not None and not isinstance(q, QConfig):
                q = _foreign_qconfig(name, q)
            out[name] = q
        return out


def _prefixes(name: str) -> list[str]:
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts), -1, -1)]


def _foreign_qconfig(name: str, q: Any) -> QConfig:
    # torch.ao models carry torch.ao QConfig objects; qatkit uses its own defaults for them.
    if type(q).__name__ == "QConfig" and hasattr(q, "activation"):
        return QConfig()
    raise fail("QK000", f"module {name or '<root>'!r} has qconfig {q!r}, which is not a "
               "qatkit QConfig.", "use qk.QConfig / qk.default_qat_qconfig()")


def as_mapping(qconfig: QConfig | QConfigMapping | None) -> QConfigMapping:
    if isinstance(qconfig, QConfigMapping):
        return qconfig
    if qconfig is None or isinstance(qconfig, QConfig):
        return QConfigMapping(qconfig)
    raise fail("QK000", f"qconfig must be a QConfig or QConfigMapping, got {type(qconfig)}.")


# ---- a qconfig as plain data (kept in checkpoints, read with torch.load(weights_only=True)) ---

def spec_to_dict(spec: QuantSpec | None) -> dict[str, Any] | None:
    """Plain data of ``spec``; a custom observer class is kept as ``"module:QualName"``."""
    if spec is None:
        return None
    obs = spec.observer if isinstance(spec.observer, str) else \
        f"{spec.observer.__module__}:{spec.observer.__qualname__}"
    return {"dtype": spec.dtype, "observer": obs, "per_channel": spec.per_channel,
            "fixed_scale": spec.fixed_scale,
            "observer_kwargs": [[k, v] for k, v in spec.observer_kwargs]}


def spec_from_dict(d: dict[str, Any] | None) -> QuantSpec | None:
    if d is None:
        return None
    obs: Any = d["observer"]
    if ":" in obs:  # a custom observer class: import it by name
        import importlib
        mod, _, qual = obs.partition(":")
        try:
            obs = importlib.import_module(mod)
            for part in qual.split("."):
                obs = getattr(obs, part)
        except (ImportError, AttributeError):
            raise fail("QK000", f"the checkpoint's qconfig uses observer {d['observer']!r}, "
                       "which cannot be imported here.",
                       "make that module importable before loading") from None
    return QuantSpec(d["dtype"], obs, bool(d["per_channel"]), d["fixed_scale"],
                     tuple((k, v) for k, v in d["observer_kwargs"]))


def qconfig_to_dict(q: QConfig | None) -> dict[str, Any] | None:
    if q is None:
        return None
    return {"activation": spec_to_dict(q.activation), "weight": spec_to_dict(q.weight),
            "high_precision_output": q.high_precision_output}


def qconfig_from_dict(d: dict[str, Any] | None) -> QConfig | None:
    if d is None:
        return None
    return QConfig(spec_from_dict(d["activation"]), spec_from_dict(d["weight"]),
                   bool(d["high_precision_output"]))


def resolved_to_data(qconfigs: dict[str, QConfig | None]) -> dict[str, Any]:
    """The effective qconfig of every module (``QConfigMapping.resolve``) as plain data: a
    list of the distinct qconfigs and, per module name, an index into it (-1: float)."""
    table: list[QConfig | None] = []
    index: dict[str, int] = {}
    for name, q in qconfigs.items():
        if q is None:
            index[name] = -1
            continue
        if q not in table:
            table.append(q)
        index[name] = table.index(q)
    return {"qconfigs": [qconfig_to_dict(q) for q in table], "modules": index}


def with_sources(data: dict[str, Any], mapping: QConfigMapping) -> dict[str, Any]:
    """``data`` plus where each module's qconfig came from (for summaries)."""
    return {**data, "sources": dict(mapping.sources)}


def mapping_from_data(data: dict[str, Any]) -> QConfigMapping:
    """The :class:`QConfigMapping` that resolves to what :func:`resolved_to_data` stored."""
    table = [qconfig_from_dict(d) for d in data["qconfigs"]]
    mapping = QConfigMapping(None)
    for name, i in data["modules"].items():
        mapping.set_module_name(name, None if i < 0 else table[i])
    return mapping
