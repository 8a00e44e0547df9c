"""Validated configuration (pydantic v2, frozen, unknown keys rejected).

CLI flags and ``--config file.yaml`` resolve to one :class:`RegisterConfig`, which is echoed into
``report.json``. ``regcli config schema`` prints the JSON schema. Method presets
(:data:`METHOD_PRESETS`) set which stages run; every stage's parameters stay reachable.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from regcli.errors import ConfigError, folded


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", validate_default=True)


class AffineConfig(_Frozen):
    """Linear pre-alignment: initialisation, then rigid and/or affine, coarse to fine."""

    enabled: bool = True
    init: Literal["moments", "center", "geometry", "none"] = Field(
        "moments",
        description="moments: match centres of mass (and search principal-axis rotations); center: match "
        "centres of mass only; geometry: match image centres; none: identity",
    )
    stages: tuple[Literal["rigid", "affine"], ...] = ("rigid", "affine")
    metric: Literal["lncc", "mi", "mse"] = Field(
        "lncc", description="lncc for the same contrast, mi (mutual information) across contrasts"
    )
    levels_mm: tuple[float, ...] = Field((8.0, 4.0), description="pyramid voxel sizes, coarse to fine")
    iterations: tuple[int, ...] = Field((40, 20), description="iterations per pyramid level (per stage)")
    learning_rate: float = Field(0.02, gt=0, description="Adam step (per-parameter scales in mm and radians)")
    lncc_radius_mm: float = Field(
        5.0, gt=0, description="half-width of the LNCC window in mm (at least one voxel of each level)"
    )
    mi_bins: int = Field(32, ge=8, le=256)

    @model_validator(mode="after")
    def _levels(self) -> "AffineConfig":
        if len(self.levels_mm) != len(self.iterations):
            raise ValueError("affine.levels_mm and affine.iterations must have the same length")
        return self


class ConvexConfig(_Frozen):
    """ConvexAdam discrete stage (Siebert et al.): MIND-SSC SSD cost volume + coupled-convex smoothing."""

    mind_radius: int = Field(1, ge=1, description="MIND-SSC patch radius (working-grid voxels)")
    mind_dilation: int = Field(2, ge=1, description="MIND-SSC neighbour distance (working-grid voxels)")
    grid_sp: int = Field(6, ge=1, description="cost-volume grid spacing (working-grid voxels)")
    disp_hw: int = Field(4, ge=1, description="search half-width in cost-volume voxels: (2*disp_hw+1)^3 shifts")
    coupling_weights: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    inverse_consistency: bool = Field(True, description="symmetrise forward/backward coarse fields")


class InstanceConfig(_Frozen):
    """Instance optimisation (IO): one shared solver, everything chosen by name."""

    enabled: bool = True
    model: str = Field("displacement", description="transform model (registry name)")
    similarity: str = Field("feature_ssd", description="similarity (registry name)")
    optimizer: str = Field("adam", description="optimizer (registry name)")
    regularizer: str = Field("diffusion", description="regulariser (registry name)")
    reg_weight: float = Field(1.25, ge=0, description="regulariser weight (ConvexAdam's lambda)")
    iterations: int = Field(80, ge=0, description="Adam iterations on the IO grid")
    learning_rate: float = Field(1.0, gt=0)
    grid_sp_adam: int = Field(2, ge=1, description="IO grid spacing (working-grid voxels)")
    gradient_floor: float = Field(0.0, ge=0, description="Adam eps per voxel on the IO grid (0: Adam's own "
                                  "1e-8, as published); see refine_gradient_floor")
    smoothing_passes: int = Field(3, ge=0, description="3x3x3 box-filter passes on the IO field")
    refine_iterations: int = Field(10, ge=0, description="then Adam iterations on the working grid itself, "
                                   "with finer MIND features (0: the published method)")
    refine_learning_rate: float = Field(1.0, gt=0, description="Adam step (mm) of the refinement")
    refine_gradient_floor: float = Field(0.2, ge=0, description="Adam eps of the refinement per voxel: where "
                                         "the similarity gradient is weaker the field barely moves")
    refine_reg_weight: Optional[float] = Field(1.5, ge=0, description="regulariser weight of the refinement "
                                               "(None: reg_weight)")
    refine_smoothing_passes: Optional[int] = Field(None, ge=0, description="box-filter passes of the refinement "
                                                   "field (default: smoothing_passes)")
    refine_mind_dilation: int = Field(1, ge=1, description="MIND-SSC neighbour distance of the refinement "
                                      "features (working-grid voxels)")


class SamConvexConfig(_Frozen):
    """SAMConvex (Li et al. 2023): anatomical-embedding correlation pyramid + coupled convex, then IO."""

    weights: str = Field("sam-embedding", description="embedding model: a folder, hub:org/name@commit, or a "
                         "registry name (regcli weights list)")
    local_features: Literal["embedding", "mind", "both"] = Field(
        "mind", description="fine half of the features: MIND-SSC (default: measured better than the shipped "
        "network's local head on brain MRI and CT, docs/benchmarks.md), the network's local head (the paper's "
        "choice), or both; the learned global head is used either way")
    global_weight: float = Field(0.25, ge=0, description="weight of the global half against the local half")
    global_channels: int = Field(4, ge=0, description="keep the global half's first k principal components (of "
                                 "the fixed image's embedding) instead of all its channels; 0: all")
    levels: tuple[int, ...] = Field((8, 4, 2), description="pyramid levels as factors of the working grid (2: the "
                                    "embedding grid, 1/2 of the working grid, as the paper's finest level)")
    search_radius: tuple[int, ...] = Field((2, 3, 3), description="search half-width per level (level voxels)")
    coupling_weights: tuple[float, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    io_iterations: int = Field(50, ge=0, description="instance optimisation in embedding space (0: none)")
    io_learning_rate: float = Field(1.0, gt=0, description="Adam step in mm")
    io_reg_weight: float = Field(1.25, ge=0)
    io_gradient_floor: float = Field(0.2, ge=0, description="Adam eps per voxel (see instance.gradient_floor)")
    smoothing_passes: int = Field(3, ge=0)
    refine_iterations: int = Field(10, ge=0, description="then ConvexAdam's working-grid refinement (MIND-SSC, "
                                   "instance.refine_* settings); 0: none")

    @model_validator(mode="after")
    def _levels(self) -> "SamConvexConfig":
        if len(self.levels) != len(self.search_radius):
            raise ValueError("samconvex.levels and samconvex.search_radius must have the same length")
        if any(f < 1 for f in self.levels) or any(r < 1 for r in self.search_radius):
            raise ValueError("samconvex levels and search radii must be >= 1")
        return self


class RegisterConfig(_Frozen):
    """Everything ``regcli register`` needs besides the file names."""

    method: Literal["convexadam", "samconvex", "affine", "rigid"] = "convexadam"
    working_spacing_mm: float = Field(2.0, gt=0, description="isotropic spacing of the deformable working grid")
    affine: AffineConfig = AffineConfig()
    convex: ConvexConfig = ConvexConfig()
    instance: InstanceConfig = InstanceConfig()
    samconvex: SamConvexConfig = SamConvexConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch (default: all cores)")
    seed: int = 0
    deterministic: bool = False
    inverse_warp: bool = Field(True, description="also write the inverse displacement field")
    inverse_iterations: int = Field(20, ge=1, description="fixed-point iterations of the inverse field (at most)")
    write_warped: bool = True
    html_report: bool = True

    @property
    def deformable(self) -> bool:
        return self.method in ("convexadam", "samconvex")


METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "convexadam": {},
    "samconvex": {},
    "affine": {"affine": {"stages": ("rigid", "affine")}},
    "rigid": {"affine": {"stages": ("rigid",)}},
}


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {folded(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of options, got {type(data).__name__}")
    return data


def validation_details(err: ValidationError) -> str:
    """A pydantic error as one line: ``key.path: problem; ...`` (unknown keys read "unknown option")."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _format_validation(err: ValidationError, source: str) -> str:
    return f"invalid configuration ({source}): " + validation_details(err)


def build_config(yaml_path: str | Path | None = None, overrides: dict | None = None,
                 model: type[BaseModel] = RegisterConfig) -> BaseModel:
    """YAML file (optional) merged with flag overrides (flags win), method preset applied first.

    Overrides use nested dicts, e.g. ``{"affine": {"metric": "mi"}, "seed": 3}``; ``None`` values
    are ignored so unset CLI flags do not clobber the file.
    """
    data = load_yaml(yaml_path) if yaml_path else {}
    overrides = _drop_none(overrides or {})
    merged = deep_merge(data, overrides)
    method = merged.get("method")
    if model is RegisterConfig and isinstance(method, str) and method in METHOD_PRESETS:
        merged = deep_merge(deep_merge({}, METHOD_PRESETS[method]), merged)
    try:
        return model.model_validate(merged)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, str(yaml_path) if yaml_path else "flags")) from None


def _drop_none(d: dict) -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v
    return out
