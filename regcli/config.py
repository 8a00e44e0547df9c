"""Validated configuration (pydantic v2, frozen, unknown keys rejected).

CLI flags and ``--config file.yaml`` resolve to one :class:`RegisterConfig`, which is echoed into
``report.json``. ``regcli config schema`` prints the JSON schema. Method presets
(:data:`METHOD_PRESETS`) set which stages run; every stage's parameters stay reachable.
"""

from __future__ import annotations

import types
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple, Optional, Union, get_args, get_origin

from pydantic import (
    BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator,
)
from pydantic_core import PydanticCustomError

from regcli.errors import ConfigError, folded


class ConfigModel(BaseModel):
    """Base of every user-facing configuration model (register config, training jobs and recipes, the networks'
    ``net`` configurations, dataset manifests): frozen, unknown keys rejected, no boolean taken for a number and
    nothing but a boolean for a boolean.

    pydantic's lax mode reads YAML/JSON ``true`` as 1 for an ``int`` field and 1.0 for a ``float`` one (also as an
    item of a tuple of numbers), and ``"yes"``, ``"off"``, ``1`` or ``0.0`` as a boolean: here both are validation
    errors at the key. Every input path delivers booleans as booleans (YAML and JSON ``true``/``false``, and YAML
    1.1's unquoted ``yes``/``no``/``on``/``off``, which ``yaml.safe_load`` reads as booleans; the command line's
    ``--flag/--no-flag`` options; no manifest CSV column or environment variable sets a boolean field). No float
    field takes NaN or an infinity (``working_spacing_mm: .inf`` is a validation error at the key, not a failure
    later).
    Everything else lax mode accepts stays accepted: an integer for a float (``learning_rate: 1``), and, for a
    plain ``int`` field, a float with an integral value (``iterations: 10.0``); ``StrictInt`` fields refuse the
    latter too.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _booleans_only_for_booleans(cls, value: Any, info: ValidationInfo) -> Any:
        if value is not None and info.field_name in cls.model_fields:
            tp = cls.model_fields[info.field_name].annotation
            where = _boolean_for_number(value, tp) if isinstance(value, (bool, list, tuple)) else None
            if where is not None:
                raise PydanticCustomError("bool_for_number", "Input should be a number, not a boolean ({where})",
                                          {"where": where})
            given = _not_a_boolean(value, tp)
            if given is not None:
                raise PydanticCustomError("bool_strict", "Input should be true or false, not {given}",
                                          {"given": given})
        return value


def _members(tp: Any) -> list:
    """The alternatives of a type annotation: a union's members, ``Annotated`` and ``Optional`` unwrapped."""
    origin = get_origin(tp)
    if origin is Annotated:
        return _members(get_args(tp)[0])
    if origin is Union or origin is types.UnionType:
        return [m for a in get_args(tp) for m in _members(a)]
    return [tp]


def _boolean_for_number(value: Any, tp: Any) -> Optional[str]:
    """Where ``value`` (YAML/JSON data) holds a boolean for a number of the annotation ``tp`` (a number type
    without ``bool`` among its alternatives, or a list/tuple of them): the boolean, as ``true`` or ``item 1:
    false``; None when it holds none."""
    members = _members(tp)
    if isinstance(value, bool):
        numbers = any(m in (int, float) for m in members) and not any(m in (bool, Any, object) for m in members)
        return str(value).lower() if numbers else None
    for m in members:
        origin, args = get_origin(m), get_args(m)
        if origin in (tuple, list, set, frozenset) and args:
            homogeneous = origin is not tuple or (len(args) == 2 and args[1] is Ellipsis)
            for i, (item, item_tp) in enumerate(zip(value, [args[0]] * len(value) if homogeneous else args)):
                where = _boolean_for_number(item, item_tp)
                if where is not None:
                    return f"item {i}: {where}"
            return None
    return None


def _not_a_boolean(value: Any, tp: Any) -> Optional[str]:
    """When the annotation ``tp`` takes only a boolean (``bool``, or ``Optional[bool]`` and ``value`` is not None)
    and ``value`` is not a boolean: ``value`` in words for the error (a short repr of a string or number, else its
    type); else None."""
    members = [m for m in _members(tp) if m is not type(None)]
    if members != [bool] or isinstance(value, bool):
        return None
    if isinstance(value, (str, int, float)):
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."
    return f"a {type(value).__name__}"


class _Frozen(ConfigModel):
    model_config = ConfigDict(validate_default=True)


#: an iteration count, as an item of a tuple (one per level): 0 skips that level's optimisation
_Iterations = Annotated[int, Field(ge=0)]
#: a length or step in mm, as an item of a tuple (one per level)
_PositiveMm = Annotated[float, Field(gt=0, allow_inf_nan=False)]
#: a coupling weight of the coupled-convex scheme (a negative one would reward leaving the smooth field)
_Coupling = Annotated[float, Field(ge=0, allow_inf_nan=False)]

#: the range of a seed: a signed 64-bit integer, what every random generator regcli seeds takes (``torch.manual_seed``
#: and ``torch.Generator.manual_seed`` take -2**63 to 2**64 - 1, and a larger number was an OverflowError mid-run;
#: ``random.seed`` any; numpy's legacy seed gets ``seed % 2**32``). Training jobs' ``train.seed`` are checked against
#: it too (:func:`regcli.training.jobs.load_job_file`), and so are the ``--seed`` flags.
SEED_MIN, SEED_MAX = -(2 ** 63), 2 ** 63 - 1
Seed = Annotated[int, Field(ge=SEED_MIN, le=SEED_MAX, description="random seed, a signed 64-bit integer")]


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
    levels_mm: tuple[_PositiveMm, ...] = Field((8.0, 4.0), min_length=1, description="pyramid voxel sizes, coarse "
                                               "to fine")
    iterations: tuple[_Iterations, ...] = Field((40, 20), description="iterations per pyramid level (per stage)")
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
    coupling_weights: tuple[_Coupling, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
    inverse_consistency: bool = Field(True, description="symmetrise forward/backward coarse fields")


TRANSFORMS = ("freeform", "svf", "greedy", "bspline", "affine", "rigid")
OPTIMIZERS = ("adam", "sgd", "lbfgs")


class InstanceConfig(_Frozen):
    """Instance optimisation (IO): one shared solver, everything chosen by name.

    ``transform`` and ``optimizer`` apply to the IO stage of every method (convexadam, samconvex, dio): the
    test-time swap. The transform options below are read by the model that uses them only.
    """

    enabled: bool = True
    transform: Literal[TRANSFORMS] = Field(  # type: ignore[valid-type]
        "freeform", description="transform model of the IO stage: freeform (a displacement per voxel), svf "
        "(stationary velocity field, diffeomorphic), greedy (compositive diffeomorphic updates, SyN-style), "
        "bspline (cubic B-spline control points), affine, rigid")
    similarity: str = Field("feature_ssd", description="similarity (registry name)")
    optimizer: Literal[OPTIMIZERS] = Field(  # type: ignore[valid-type]
        "adam", description="adam, sgd (Nesterov; its step in mm calibrated at the first step, see docs/dio.md), "
        "or lbfgs (strong-Wolfe line search; the learning rate sets only its first trial step)")
    regularizer: str = Field("diffusion", description="regulariser (registry name)")
    reg_weight: float = Field(1.25, ge=0, description="regulariser weight (ConvexAdam's lambda)")
    iterations: int = Field(80, ge=0, description="Adam iterations on the IO grid")
    learning_rate: float = Field(1.0, gt=0)
    svf_steps: int = Field(7, ge=0, le=16, description="svf: scaling-and-squaring steps")
    greedy_update_sigma_mm: float = Field(2.0, ge=0, description="greedy: Gaussian sigma of each update (mm)")
    greedy_total_sigma_mm: float = Field(1.0, ge=0, description="greedy: Gaussian sigma of the total field (mm)")
    bspline_spacing_mm: float = Field(8.0, gt=0, description="bspline: control-point spacing (mm)")
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
    refine_intensity_weight: float = Field(
        0.0, ge=0, description="for images of the same contrast only (e.g. T1w to T1w): the intensities join the "
        "refinement's MIND-SSC features as one more channel, each image standardised over the working grid (zero "
        "mean, unit sd) and scaled by this weight (0.5 measured on T1w brains; 0: MIND-SSC only). Also used by "
        "the fine refinement. Different contrasts (T1w to T2w, MR to US, CT to MR) must keep 0")
    fine_spacing_mm: Optional[float] = Field(
        None, gt=0, description="after any deformable method: a last refinement on the fixed image's grid at this "
        "finer isotropic spacing (e.g. 1.0; MIND-SSC, the refine_* settings, instance.transform); None: the "
        "result keeps the working grid's resolution. Costs time: docs/benchmarks.md, 'Fine refinement'")
    fine_iterations: int = Field(3, ge=1, description="iterations of the fine refinement")
    fine_learning_rate: float = Field(1.0, gt=0, description="Adam step (mm) of the fine refinement")


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
    coupling_weights: tuple[_Coupling, ...] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
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


class _NetworkConfig(_Frozen):
    """What every network method (foundation, promptreg) takes: its weights and how its inputs are prepared
    (:func:`regcli.methods.foundation.prepare_pair`)."""

    weights: str = Field(description="network: a folder, hub:org/name@commit, or a registry name")
    modality: Literal["mri", "ct"] = Field("mri", description="intensity preparation of the fixed image (and of "
                                           "the moving one unless moving_modality): ct clips to [-1000, 1000] HU, "
                                           "mri to [minimum, 99th percentile]; both then scale to [0, 1]")
    moving_modality: Optional[Literal["mri", "ct"]] = Field(None, description="the moving image's, when it "
                                                            "differs (None: modality)")


class FoundationConfig(_NetworkConfig):
    """A multi-step GradICON network (uniGradICON-compatible; :mod:`regcli.methods.foundation`), then optional IO."""

    weights: str = Field("foundation-small", description="network: a folder (e.g. from `regcli weights import "
                         "unigradicon`), hub:org/name@commit, or a registry name (regcli weights list)")
    io: Literal["none", "network", "field"] = Field(
        "field", description="instance optimisation after the network: field (default: regcli's shared solver, "
        "ConvexAdam's instance optimisation and refinement on MIND-SSC on the usual working grid, started from the "
        "network's field), network (uniGradICON's: Adam on the network weights with the GradICON loss, both "
        "directions, weights restored afterwards), or none (the network alone)")
    io_iterations: int = Field(50, ge=0, description="iterations of the instance optimisation (--iterations)")
    io_learning_rate: float = Field(2e-5, gt=0, description="Adam learning rate of io=network (uniGradICON's "
                                    "2e-5); io=field uses instance.learning_rate")
    inverse: Literal["network", "fixed_point"] = Field(
        "network", description="the inverse warp: the network's own backward map (as uniGradICON; used unless "
        "io=field changed the forward field) or the fixed-point inverse of the forward field")


class PromptRegMethodConfig(_NetworkConfig):
    """The PromptReg network (:mod:`regcli.methods.promptreg`): one task-prompted network, then optional IO."""

    weights: str = Field("promptreg-small", description="network: a folder (from `regcli train` or "
                         "save_promptreg_model), hub:org/name@commit, or a registry name (regcli weights list)")
    input_shape: Optional[tuple[int, int, int]] = Field(
        None, description="network grid in tensor order (Z, Y, X): the fixed image's field of view resampled to "
        "this many voxels per axis (a single number sets all three); None: the grid the network was trained on "
        "(net.input_shape in its config.json)")
    io: Literal["none", "field"] = Field(
        "field", description="instance optimisation after the network: field (default: regcli's shared solver, "
        "ConvexAdam's instance optimisation and refinement on MIND-SSC on the usual working grid, started from the "
        "network's field; the inverse is then the fixed-point one) or none (the network alone, with the exact "
        "inverse exp(-v) of its velocity field)")
    io_iterations: int = Field(50, ge=0, description="iterations of the instance optimisation (--iterations)")

    @field_validator("input_shape", mode="before")
    @classmethod
    def _one_number_for_all_axes(cls, v: Any) -> Any:
        return (v, v, v) if isinstance(v, int) and not isinstance(v, bool) else v

    @model_validator(mode="after")
    def _grid(self) -> "PromptRegMethodConfig":
        if self.input_shape is not None and min(self.input_shape) < 2:
            raise ValueError(f"promptreg.input_shape must be at least 2 voxels per axis, got {self.input_shape}")
        return self


class PromptConfig(_Frozen):
    """Test-time prompts: label maps and landmarks given with the images become terms of the IO objective."""

    labels: Optional[tuple[int, ...] | Literal["all"]] = Field(
        None, description="label ids of --fixed-labels/--moving-labels whose soft Dice joins the IO objective "
        "('all': every label in both maps; None: labels are only scored)")
    label_weight: float = Field(0.1, ge=0, description="weight of (1 - mean soft Dice); 0.1 measured on synthseg "
                                "(benchmarks/prompt_gain.py): stronger weights cost the other labels Dice")
    landmarks: bool = Field(False, description="add the mean squared distance (mm^2) between the mapped fixed "
                            "landmarks and the moving landmarks to the IO objective")
    landmark_weight: float = Field(0.01, ge=0, description="weight of the landmark term, per mm^2")


class DioConfig(_Frozen):
    """DIO (Jena et al.): learned feature images registered by the shared IO solver, coarse to fine.

    The transform model and optimizer are ``instance.transform`` / ``instance.optimizer`` (swappable at test time).
    """

    weights: str = Field("dio-features", description="feature network: a folder, hub:org/name@commit, or a "
                         "registry name (regcli weights list)")
    features: Literal["network", "intensity"] = Field(
        "network", description="network: the learned features; intensity: the normalised image itself (the "
        "baseline with the same solver)")
    levels: tuple[int, ...] = Field((4, 2, 1), min_length=1, description="solver levels, factors of the working "
                                    "grid, coarse to fine (each uses the network's features of that level)")
    iterations: tuple[_Iterations, ...] = Field((80, 40, 20), description="solver iterations per level")
    learning_rates: tuple[_PositiveMm, ...] = Field((1.0, 1.0, 0.5), description="Adam/SGD step per level, mm")
    reg_weight: float = Field(1.0, ge=0, description="diffusion regulariser weight")
    smoothing_passes: int = Field(1, ge=0, description="freeform/svf: 3x3x3 box passes on the parameters")

    @model_validator(mode="after")
    def _levels(self) -> "DioConfig":
        if not (len(self.levels) == len(self.iterations) == len(self.learning_rates)):
            raise ValueError("dio.levels, dio.iterations and dio.learning_rates must have the same length")
        if any(f < 1 for f in self.levels) or list(self.levels) != sorted(self.levels, reverse=True):
            raise ValueError("dio.levels must be >= 1 and go coarse to fine (decreasing)")
        return self


#: the methods whose deformable stage is a network (``--modality``, ``--io``; ``foundation.*``, ``promptreg.*``)
NETWORK_METHODS = ("foundation", "promptreg")


class RegisterConfig(_Frozen):
    """Everything ``regcli register`` needs besides the file names."""

    method: Literal["convexadam", "samconvex", "dio", "foundation", "promptreg", "affine", "rigid"] = "convexadam"
    working_spacing_mm: float = Field(2.0, gt=0, description="isotropic spacing of the deformable working grid")
    affine: AffineConfig = AffineConfig()
    convex: ConvexConfig = ConvexConfig()
    instance: InstanceConfig = InstanceConfig()
    samconvex: SamConvexConfig = SamConvexConfig()
    dio: DioConfig = DioConfig()
    foundation: FoundationConfig = FoundationConfig()
    promptreg: PromptRegMethodConfig = PromptRegMethodConfig()
    prompts: PromptConfig = PromptConfig()
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: Optional[int] = Field(None, ge=1, description="CPU threads for torch (default: all cores)")
    seed: Seed = 0
    deterministic: bool = False
    inverse_warp: bool = Field(True, description="also write the inverse displacement field")
    inverse_iterations: int = Field(20, ge=1, description="fixed-point iterations of the inverse field (at most)")
    inverse_grid: Literal["fixed", "moving"] = Field(
        "fixed", description="grid of prefix1InverseWarp.nii.gz: 'fixed' (ANTs SyN's convention: the fixed image's "
        "grid) or 'moving' (uniGradICON's: the moving image's grid, carried into the fixed space by the inverse "
        "affine, so the warp covers the whole moving image at its resolution); the foundation and promptreg "
        "presets use 'moving'")
    write_warped: bool = True
    html_report: bool = True
    precision: Literal["float32", "float64"] = Field(
        "float32", description="floating-point type of the solvers (affine, convexadam, samconvex, fine "
        "refinement): float64 doubles their memory and time, for checking that float32 rounding does not matter; "
        "geometry (index/world matrices) is always float64, and networks run in float32 (SAMConvex's embedding "
        "is cast to the solver's type); the network methods (dio, foundation, promptreg) refuse float64; the "
        "written warps are float32 either way")
    max_memory_mb: Optional[float] = Field(
        None, gt=0, description="refuse to start when the pre-flight estimate of the process's peak memory (MB) "
        "is above this (--max-memory; None: above the machine's RAM and swap); the estimate is always in the report")

    @property
    def deformable(self) -> bool:
        return self.method in ("convexadam", "samconvex", "dio", *NETWORK_METHODS)

    @property
    def network_io(self) -> Optional[str]:
        """The ``io`` of a network method (``none``, ``network`` or ``field``); None for the other methods."""
        return getattr(self, self.method).io if self.method in NETWORK_METHODS else None

    # Where the method and a network method's io came from, for messages: not fields (neither validated, dumped,
    # compared nor hashed); :func:`build_config` records them, and a configuration made otherwise names them by
    # value, which is right whichever way they came.
    @cached_property
    def method_origin(self) -> str:
        """The method as the user chose it: ``method: dio`` in backticks and ``in 'c.yaml'`` (the ``--config``
        file), else ``--method dio`` (the flag, or its default); ``method dio`` for a configuration that
        :func:`build_config` did not make from a file and flags."""
        return f"method {self.method}"

    @cached_property
    def io_origin(self) -> str:
        """A network method's ``io`` as the user chose it: ``--io none`` (the flag), else its key, ``foundation.io
        none``; empty for the other methods."""
        return f"{self.method}.io {self.network_io}" if self.network_io is not None else ""

    @model_validator(mode="after")
    def _float64_solvers_only(self) -> "RegisterConfig":
        if self.precision == "float64" and self.method in ("dio", "foundation", "promptreg"):
            raise ValueError(f"precision float64 is for the classical solvers (convexadam, samconvex, affine, rigid); "
                             f"method '{self.method}' runs a network in float32: use precision float32")
        return self

    @model_validator(mode="after")
    def _affine_stages_fit_the_method(self, info: ValidationInfo) -> "RegisterConfig":
        """``affine.stages`` must run something when the affine stage is on (an empty list ran the initialisation
        alone, as if a registration), and agree with a linear method: ``rigid`` runs no ``affine`` stage,
        ``affine`` runs one (the report names the method, the .mat would say otherwise). The method is named as
        the user chose it when :func:`build_config` passes ``method_origin`` in the validation context."""
        stages = self.affine.stages
        if not self.affine.enabled:
            return self
        named = (info.context or {}).get("method_origin") or f"method {self.method}"
        listed = f"[{', '.join(stages)}]"
        if not stages:
            raise ValueError(f"affine.stages is empty: the affine stage would run its initialisation "
                             f"({self.affine.init}) alone; list its stages (rigid, affine), or turn the stage off "
                             "(affine.enabled false, --no-affine)")
        if self.method == "rigid" and "affine" in stages:
            raise ValueError(f"affine.stages {listed} has an affine stage, which {named} does not run: use method "
                             "affine, or affine.stages [rigid]")
        if self.method == "affine" and "affine" not in stages:
            raise ValueError(f"affine.stages {listed} has no affine stage, which {named} runs: use method rigid, or "
                             "affine.stages [rigid, affine]")
        return self

    @model_validator(mode="after")
    def _fine_is_finer(self) -> "RegisterConfig":
        fine = self.instance.fine_spacing_mm
        if fine is not None and fine >= self.working_spacing_mm:
            raise ValueError(f"instance.fine_spacing_mm ({fine:g}) must be finer than working_spacing_mm "
                             f"({self.working_spacing_mm:g})")
        return self


def method_words(cfg: RegisterConfig) -> str:
    """The method, and a network method's ``io``, as the user chose them (:attr:`RegisterConfig.method_origin`,
    :attr:`RegisterConfig.io_origin`), e.g. ``--method foundation --io none``, ``--method foundation with
    foundation.io none`` (the key from a file), ``--method dio``."""
    if not cfg.io_origin:
        return cfg.method_origin
    both_flags = cfg.method_origin.startswith("--") and cfg.io_origin.startswith("--")
    return f"{cfg.method_origin}{' ' if both_flags else ' with '}{cfg.io_origin}"


class SolverStages(NamedTuple):
    """What :func:`solver_stages` finds: ``running``, the solver stages that run, in order (empty: none); ``setting``,
    the configuration in words (e.g. ``--method convexadam with instance.enabled false``, the method named by
    :attr:`RegisterConfig.method_origin`); ``stages``, the solver
    stages the method has, in words, ``--fine-spacing`` included (empty for a linear method)."""

    running: tuple[str, ...]
    setting: str
    stages: str


def solver_stages(cfg: RegisterConfig) -> SolverStages:
    """The solver stages of ``cfg``'s deformable stage that run: exactly the stages that read the masks and the
    prompts (each gives them to the shared instance-optimisation solver, :mod:`regcli.solvers.instance`, whose
    objective a stage of 0 iterations never evaluates). The other parts of a method read neither: ConvexAdam's
    discrete stage, SAMConvex's correlation pyramid, DIO's feature network, the networks of foundation and
    promptreg. One answer for the mask and the prompt checks (:func:`regcli.pipeline.check_masks`,
    :func:`regcli.pipeline.check_prompts`) and for the instance-optimisation flags
    (:func:`refuse_flags_without_effect`).

    The stages: ConvexAdam's instance optimisation and refinement (``instance.enabled`` and ``instance.iterations``
    / ``refine_iterations`` > 0); SAMConvex's instance optimisation in embedding space (``samconvex.io_iterations``)
    and refinement (``samconvex.refine_iterations``); each DIO solver level with > 0 ``dio.iterations``; a network
    method's ``io: field`` with ``io_iterations`` > 0 (its instance optimisation, then the refinement of
    ``instance.refine_iterations``); and, with every deformable method, the fine refinement (``--fine-spacing``).
    A linear method has none."""
    m, inst, named = cfg.method, cfg.instance, cfg.method_origin
    if not cfg.deformable:
        return SolverStages((), named, "")
    running: list[str] = []
    if m == "convexadam":
        running += [name for name, n in (("instance optimisation", inst.iterations),
                                         ("refinement", inst.refine_iterations)) if inst.enabled and n > 0]
        off = "instance.enabled false" if not inst.enabled else "instance.iterations and refine_iterations 0"
        setting, stages = f"{named} with {off}", "the instance optimisation, its refinement"
    elif m == "samconvex":
        sc = cfg.samconvex
        running += [name for name, n in (("instance optimisation", sc.io_iterations),
                                         ("refinement", sc.refine_iterations)) if n > 0]
        setting = f"{named} with samconvex.io_iterations and refine_iterations 0"
        stages = "the instance optimisation, the refinement"
    elif m == "dio":
        running += [f"DIO solver level {lv}" for lv, n in zip(cfg.dio.levels, cfg.dio.iterations) if n > 0]
        setting = f"{named} with dio.iterations {'x'.join(map(str, cfg.dio.iterations))}"
        stages = "the DIO solver"
    else:  # a network method (NETWORK_METHODS)
        section = getattr(cfg, m)
        if section.io == "field" and section.io_iterations > 0:
            running += ["instance optimisation"] + (["refinement"] if inst.refine_iterations > 0 else [])
        setting = method_words(cfg) + (" and 0 iterations" if section.io == "field" else "")
        stages = "the instance optimisation of --io field"
    if inst.fine_spacing_mm is not None:
        running.append("fine refinement")
    return SolverStages(tuple(running), setting, stages + " and --fine-spacing")


def _preset(stages: tuple[str, ...] = ("rigid", "affine"), inverse_grid: str = "fixed") -> dict[str, Any]:
    return {"affine": {"stages": stages}, "inverse_grid": inverse_grid}


#: The keys each method's preset sets, and their values. Every preset sets the same keys, so that a ``--method``
#: flag gives them its own method's values whatever method a ``--config`` file was written for
#: (:func:`build_config`).
METHOD_PRESETS: dict[str, dict[str, Any]] = {
    "convexadam": _preset(),
    "samconvex": _preset(),
    "dio": _preset(),
    "foundation": _preset(inverse_grid="moving"),
    "promptreg": _preset(inverse_grid="moving"),
    "affine": _preset(),
    "rigid": _preset(("rigid",)),
}


def _plain(value: Any) -> Any:
    """A configuration value as compared with a preset's: lists (YAML) as tuples."""
    return tuple(_plain(v) for v in value) if isinstance(value, (list, tuple)) else value


def _drop_preset_values(data: dict, old: dict, new: dict) -> dict:
    """``data`` (a ``--config`` file's mapping) without the keys of preset ``new`` whose values are those of the
    file's own method's preset ``old``: what the file holds because its method's preset put it there (``regcli
    config show`` writes every key), which the preset of a ``--method`` flag replaces. A value that differs from
    ``old`` is the file's own choice and stays (validation refuses it where it contradicts the flag's method)."""
    out = dict(data)
    for key, value in new.items():
        if key not in out or key not in old:
            continue
        if isinstance(value, dict):
            if isinstance(out[key], dict) and isinstance(old[key], dict):
                out[key] = _drop_preset_values(out[key], old[key], value)
        elif _plain(out[key]) == _plain(old[key]):
            del out[key]
    return out


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for k, v in override.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def yaml_safe_load(text: str) -> Any:
    """``yaml.safe_load`` that refuses a key given twice in one mapping (safe_load keeps the last silently, so
    ``method: affine`` then ``method: rigid`` ran rigid); keys brought in by a merge (``<<: *base``) may be
    overridden as YAML intends."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"found the key '{key}' twice in one mapping",
                                                            key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def load_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.exists() or path.is_dir():  # not is_file(): a pipe (--config <(echo ...)) is fine
        raise ConfigError(f"config file '{path}' does not exist" if not path.exists() else
                          f"config file '{path}' is a directory")
    try:
        data = yaml_safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"config file '{path}' is not valid YAML: {folded(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of options, got {type(data).__name__}")
    return data


def validation_details(err: ValidationError, under: str = "") -> str:
    """A pydantic error as one line: ``key.path: problem; ...`` (unknown keys read "unknown option"); ``under``: the
    dotted key of the validated mapping in its file (e.g. ``net``), which starts every key path."""
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in (*([under] if under else []), *e["loc"])) or "(root)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown option"
        elif e["type"] == "value_error":  # a validator's own message, which names its keys
            msg = msg.removeprefix("Value error, ")
            if not e["loc"] and not under:
                parts.append(msg)
                continue
        parts.append(f"{loc}: {msg}")
    return "; ".join(parts)


def _format_validation(err: ValidationError, source: str) -> str:
    return f"invalid configuration ({source}): " + validation_details(err)


def build_config(yaml_path: str | Path | None = None, overrides: dict | None = None,
                 model: type[BaseModel] = RegisterConfig, source: Optional[str] = None,
                 data: Optional[dict] = None) -> BaseModel:
    """YAML file (optional) merged with flag overrides (flags win), method preset applied first.

    The method preset (:data:`METHOD_PRESETS`): the method's values of the keys that presets set, under the file and
    the flags. A ``method`` flag (``overrides["method"]``) that differs from the file's own method (its ``method``
    key, else the default) wins over the file there too: the file's preset keys that hold its own method's preset
    values are replaced by the flag's method's (``regcli config show > c.yaml`` then ``--config c.yaml --method
    rigid`` runs rigid); those it set to other values stay, and are refused where they contradict the flag's
    method (``affine.stages: [affine]`` with ``--method rigid``). Other flags win over every preset.

    ``data`` instead of ``yaml_path``: the configuration mapping as a file holds it, e.g. a section of a training
    job (a DIO job's ``solver``). It is read as the YAML file would be: an explicit null is a value (what
    ``refine_reg_weight: null`` means in a ``--config`` file, or an error where the key takes none).

    A bad configuration is a one-line ConfigError naming the dotted keys and ``source`` (default: the YAML file,
    "configuration" for ``data``, else "flags"; e.g. the section of a training job that holds ``data``).

    Overrides use nested dicts, e.g. ``{"affine": {"metric": "mi"}, "seed": 3}``; ``None`` values
    are ignored so unset CLI flags do not clobber the file. Three top-level keys are flags whose config key
    depends on the method (taken from the merged file and flags): ``iterations`` (:func:`iteration_override`),
    ``modality`` and ``io`` (:func:`network_override`).
    """
    if yaml_path and data is not None:
        raise TypeError("build_config: give yaml_path or data, not both")
    source = source or (str(yaml_path) if yaml_path else "flags" if data is None else "configuration")
    from_data = data is not None
    data = load_yaml(yaml_path) if yaml_path else dict(data or {})
    overrides = _drop_none(overrides or {})
    iterations = overrides.pop("iterations", None)
    network_flags = {k: overrides.pop(k) for k in ("modality", "io") if k in overrides}
    flag_method = overrides.get("method")
    if model is RegisterConfig and isinstance(flag_method, str) and flag_method in METHOD_PRESETS:
        own = data.get("method", RegisterConfig.model_fields["method"].default)
        if isinstance(own, str) and own in METHOD_PRESETS and own != flag_method:
            data = _drop_preset_values(data, METHOD_PRESETS[own], METHOD_PRESETS[flag_method])
    merged = deep_merge(data, overrides)
    method = merged.get("method")
    if model is RegisterConfig and isinstance(method, str) and method in METHOD_PRESETS:
        merged = deep_merge(deep_merge({}, METHOD_PRESETS[method]), merged)
    method = merged.get("method", "convexadam")
    named = (f"`method: {method}` in '{yaml_path}'" if "method" not in overrides and yaml_path and "method" in data
             else f"method {method}" if "method" not in overrides and from_data
             else f"--method {method}")  # the flag, or its default
    if network_flags:
        merged = deep_merge(merged, network_override(method, **network_flags, named=named))
    if iterations is not None:
        merged = deep_merge(merged, iteration_override(method, iterations, merged.get("dio", {}).get("levels"),
                                                       named=named))
    try:
        cfg = model.model_validate(merged, context={"method_origin": named} if model is RegisterConfig else None)
    except ValidationError as e:
        raise ConfigError(_format_validation(e, source)) from None
    if isinstance(cfg, RegisterConfig):  # the cached properties' values (pydantic's way to set one on a frozen model)
        cfg.__dict__["method_origin"] = named
        if "io" in network_flags:
            cfg.__dict__["io_origin"] = f"--io {cfg.network_io}"
    return cfg


def refuse_flags_without_effect(cfg: RegisterConfig, overrides: Optional[dict]) -> None:
    """A ConfigError for instance-optimisation flags (``overrides["instance"]``: ``--transform``,
    ``--optimizer``, ``--intensity-weight``, ``--fine-spacing``) that nothing in ``cfg`` would read, rather than
    recording them in the report and ignoring them. The solver stages that run are :func:`solver_stages`' (the
    stages that read the masks and the prompts, :func:`regcli.pipeline.check_masks`): ``--transform`` and
    ``--optimizer`` need one
    (none in a linear method, a network method without ``io: field``, ConvexAdam with ``instance.enabled:
    false``, ...); ``--intensity-weight``, which only the MIND-SSC refinements read, needs a refinement (the
    working grid's or the fine one); ``--fine-spacing`` needs a deformable method (the fine refinement follows
    every one). Only these flags: a linear method with ``--no-affine`` (an identity registration) stays
    allowed."""
    inst = {k: v for k, v in ((overrides or {}).get("instance") or {}).items() if v is not None}
    stages = solver_stages(cfg)
    refinement = any(name in ("refinement", "fine refinement") for name in stages.running)
    unused = [flag for key, flag, used in (("transform", "--transform", bool(stages.running)),
                                           ("optimizer", "--optimizer", bool(stages.running)),
                                           ("refine_intensity_weight", "--intensity-weight", refinement),
                                           ("fine_spacing_mm", "--fine-spacing", cfg.deformable))
              if key in inst and not used]
    if not unused:
        return
    it = "it" if len(unused) == 1 else "them"
    if not cfg.deformable:
        why = f"{stages.setting} has only the affine stage"
    elif not stages.running:
        why = f"{stages.setting} runs none of {stages.stages}"
    else:  # only --intensity-weight: solver stages run, but no refinement
        how = method_words(cfg)
        why = (f"only a refinement reads it, and {how} runs none (only {', '.join(stages.running)}; --fine-spacing "
               "adds a fine refinement)")
    raise ConfigError(f"{', '.join(unused)}: nothing would use {it}; {why}")


def iteration_override(method: str, counts: tuple[int, ...], dio_levels=None,
                       named: Optional[str] = None) -> dict:
    """The config keys that ``--iterations`` sets for ``method``: the iteration count of its deformable stage's
    instance optimisation (convexadam: ``instance.iterations``; samconvex, foundation, promptreg:
    ``<method>.io_iterations``), or one count per solver level for dio (``dio.iterations``, ANTs-style
    ``80x40x20``). A count that does not fit the method is a ConfigError naming what it expects, and the method as
    ``named`` (:attr:`RegisterConfig.method_origin`; default ``method <method>``)."""
    named = named or f"method {method}"
    counts = tuple(int(c) for c in counts)
    given = "x".join(map(str, counts))
    if any(c < 0 for c in counts):
        raise ConfigError(f"--iterations {given}: counts must be >= 0")
    if method == "dio":
        levels = tuple(dio_levels or DioConfig().levels)
        if len(counts) != len(levels):
            example = "x".join(str(80 >> k) for k in range(len(levels)))
            raise ConfigError(f"--iterations {given}: {named} needs one count per solver level (dio.levels "
                              f"{','.join(map(str, levels))}), e.g. {example}")
        return {"dio": {"iterations": counts}}
    if method in ("affine", "rigid"):
        raise ConfigError(f"--iterations {given}: {named} has no deformable stage (the affine stage's "
                          "iterations are affine.iterations in a --config file)")
    if len(counts) != 1:
        raise ConfigError(f"--iterations {given}: {named} has one instance-optimisation stage; "
                          "give one count")
    key = {"samconvex": ("samconvex", "io_iterations"), "foundation": ("foundation", "io_iterations"),
           "promptreg": ("promptreg", "io_iterations")}.get(method, ("instance", "iterations"))
    return {key[0]: {key[1]: counts[0]}}


def network_override(method: str, modality: Optional[str] = None, io: Optional[str] = None,
                     named: Optional[str] = None) -> dict:
    """The config keys that ``--modality`` and ``--io`` set for ``method``: ``promptreg.*`` or ``foundation.*``.
    Only those two methods read them, so any other method is a ConfigError (the flags would be ignored), and so
    is ``--io network`` with promptreg, which has no network instance optimisation. ``named``: the method in
    messages (:attr:`RegisterConfig.method_origin`; default ``method <method>``)."""
    if method not in NETWORK_METHODS:
        given = " and ".join(f"--{k} {v}" for k, v in (("modality", modality), ("io", io)) if v is not None)
        raise ConfigError(f"{given}: only --method foundation or promptreg use it, not '{method}'")
    section = method
    if section == "promptreg" and io == "network":
        raise ConfigError(f"--io network: {named or 'method promptreg'} has no instance optimisation on the "
                          "network weights; use --io field (default) or --io none")
    return {section: {k: v for k, v in (("modality", modality), ("io", io)) if v is not None}}


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
