"""Peak memory of one DIO training step against the number of solver iterations (issue: memory must not grow).

Each setting runs in a fresh process: two synthseg subjects on a 2 mm grid (affine stage for the moving one), a
crop, then one :func:`regcli.training.dio.train_step` + backward with the solver's iterations per level set to
N. The process's peak RSS is reset (``/proc/self/clear_refs``) just before the step, so "step peak" is the
memory the step itself needs above what was resident before it.

  python benchmarks/dio_training_memory.py [10,100] [--crop 64]
"""

import json
import os
import subprocess
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
D = "/work/shared/data/synthseg_brain"


def _status(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return float(line.split()[1]) / 1024.0  # MB
    return float("nan")


def child(iters: int, crop: int) -> None:
    import time

    import torch

    torch.set_num_threads(2)
    from regcli.config import AffineConfig
    from regcli.io.images import read_image, read_labels
    from regcli.models.dio import DioFeatureNet, DioNetConfig
    from regcli.models.embedding import normalise_intensity
    from regcli.resample import resample_to_grid, warp
    from regcli.solvers.affine import run_affine_stage
    from regcli.spaces.image import Image
    from regcli.training.dio import DioJob, DioTrainConfig, crop_grid, register_config, train_step

    f, m = read_image(f"{D}/sub-01_T1w.nii.gz"), read_image(f"{D}/sub-02_T1w.nii.gz")
    fl, ml = read_labels(f"{D}/sub-01_labels.nii.gz"), read_labels(f"{D}/sub-02_labels.nii.gz")
    A = run_affine_stage(f, m, AffineConfig()).transform
    work = f.grid.with_spacing(2.0)
    fi, mi = resample_to_grid(f, work), warp(m, A, work)
    fL, mL = resample_to_grid(fl, work, "nearest"), warp(ml, A, work, "nearest")
    shape = fi.data.shape
    box = tuple(slice((n - min(n, crop)) // 2, (n - min(n, crop)) // 2 + min(n, crop)) for n in shape)
    g = crop_grid(work, box)
    norm = lambda im: Image(normalise_intensity(im.data, (1.0, 99.0))[box].contiguous(), g)  # noqa: E731
    lab = lambda im: Image(im.data[box].contiguous(), g)  # noqa: E731
    job = DioJob(data=[{"glob": "x"}], solver={"dio": {"iterations": [iters] * 3}})
    cfg = register_config(job)
    torch.manual_seed(0)
    net = DioFeatureNet(DioNetConfig(feature_channels=(12, 12, 12), mind_residual=True))  # the shipped recipe's
    tcfg = DioTrainConfig()
    before = _status("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    t = time.perf_counter()
    loss, parts = train_step(net, norm(fi), norm(mi), lab(fL), lab(mL), cfg, tcfg)
    loss.backward()
    secs = time.perf_counter() - t
    peak = _status("VmHWM")
    print(json.dumps({"iterations": iters, "rss_before_mb": before, "peak_mb": peak, "step_peak_mb": peak - before,
                      "seconds": secs, "loss": parts["loss"]}))


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    crop = int(sys.argv[sys.argv.index("--crop") + 1]) if "--crop" in sys.argv else 64
    if args and args[0] == "child":
        child(int(args[1]), crop)
        return
    settings = [int(x) for x in (args[0] if args else "10,100").split(",")]
    rows = []
    for n in settings:
        out = subprocess.run([sys.executable, __file__, "child", str(n), "--crop", str(crop)], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'solver its/level':>16} {'RSS before MB':>14} {'step peak MB':>13} {'seconds':>8} {'loss':>7}")
    for r in rows:
        print(f"{r['iterations']:>16} {r['rss_before_mb']:>14.0f} {r['step_peak_mb']:>13.0f} {r['seconds']:>8.1f} "
              f"{r['loss']:>7.3f}")
    if len(rows) >= 2:
        a, b = rows[0]["step_peak_mb"], rows[-1]["step_peak_mb"]
        print(f"step peak {rows[-1]['iterations']} vs {rows[0]['iterations']} iterations: {100 * (b - a) / a:+.1f} %")


if __name__ == "__main__":
    main()
