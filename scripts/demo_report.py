"""The demo's summary: results.json, the printed table and report.png, from what scripts/demo.sh wrote.

Reads $DEMO_OUT/ssl/log.txt (loss and online kNN per epoch), knn_{ssl,random}/knn_results.json and
linear_{ssl,random}/linear_results.json, and draws the SSL teacher's and a random twin's last-block CLS
attention on one held-out video (visualize_attention.py).

    python scripts/demo_report.py --demo_out outputs/demo --data_path data/synthetic_scene --seed 0 --seconds 250
"""
import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import visualize_attention as va  # noqa: E402  (the repository root is on the path now)
from utils import run_dir  # noqa: E402
from utils.collect_env import cpu_name  # noqa: E402

NETWORKS = (("ssl", "SVT (SSL)"), ("random", "random init"))


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("SVT demo report", add_help=False)
    parser.add_argument("--demo_out", required=True, help="The demo's output folder ($DEMO_OUT).")
    parser.add_argument("--data_path", required=True, help="The dataset root (classes.txt, splits/, videos/).")
    parser.add_argument("--seed", default=0, type=int, help="Seed of the run (also of the random twin shown).")
    parser.add_argument("--seconds", default=0, type=int, help="Wall time of the run so far, for results.json.")
    parser.add_argument("--num_frames", default=4, type=int, help="Frames of the attention clip (DATA.NUM_FRAMES).")
    parser.add_argument("--sampling_rate", default=16, type=int, help="Its frame stride (DATA.SAMPLING_RATE).")
    parser.add_argument("--image_size", default=64, type=int, help="Its crop size (DATA.TEST_CROP_SIZE).")
    parser.add_argument("--notes", default="{}", type=str, help="JSON object of run facts copied into results.json.")
    return parser


def collect(out: Path, data: Path, seed: int, seconds: int, notes: dict) -> dict:
    """Everything results.json holds: per network kNN top-1 per k and the linear probe's top-1, the
    per-epoch pretraining curve, chance level and the run's facts."""
    classes = (data / "classes.txt").read_text().split()
    rows = {}
    for name, _ in NETWORKS:
        knn = json.loads((out / f"knn_{name}" / "knn_results.json").read_text())["results"]
        linear = json.loads((out / f"linear_{name}" / "linear_results.json").read_text())
        rows[name] = {"knn_top1": {k: v["top1"] for k, v in knn.items()}, "linear_top1": linear["multiview_acc1"]}
    epochs = run_dir.read_epoch_log(out / "ssl")  # (a line that is not a record is skipped with a note)
    first_k = next(iter(rows["ssl"]["knn_top1"]))
    return {
        "seed": seed, "wall_seconds": seconds, "cpu": cpu_name(), "threads": torch.get_num_threads(),
        "precision": epochs[-1].get("precision") if epochs else None,
        "classes": classes, "chance": 100.0 / len(classes), **rows,
        "knn_gain": rows["ssl"]["knn_top1"][first_k] - rows["random"]["knn_top1"][first_k],
        "pretraining": {"epoch": [e["epoch"] for e in epochs], "loss": [e.get("train_loss") for e in epochs],
                        "knn_top1": [e.get("knn_top1") for e in epochs]},
        **notes,
    }


def table(results: dict) -> str:
    ks = list(results["ssl"]["knn_top1"])
    head = "model        " + "".join(f"kNN top-1 (k={k})  " for k in ks) + "linear top-1"
    lines = [head, "-" * len(head)]
    for name, label in NETWORKS:
        r = results[name]
        lines.append(f"{label:<13}" + "".join(f"{r['knn_top1'][k]:>16.1f}  " for k in ks)
                     + f"{r['linear_top1']:>12.1f}")
    lines.append(f"(chance {results['chance']:.1f} %; {len(results['classes'])} classes)")
    return "\n".join(lines)


def attention_rows(out: Path, data: Path, args) -> tuple[str, list, list]:
    """The first held-out video, its frames, and the head-mean CLS attention maps of the SSL teacher and of
    a random twin (same size, seeded), each as panels (T, S, S, 3)."""
    first = (data / "splits" / "ucf101_val_split_1_videos.txt").read_text().split()[0]
    video = str(data / "videos" / first)
    frames, clip = va.read_clip(video, args.num_frames, args.image_size, args.sampling_rate)
    ckpt = str(out / "ssl" / "checkpoint.pth")
    torch.manual_seed(args.seed)
    networks = [va.backbone_from_checkpoint(ckpt, "teacher", args.seed), va.sized_like(ckpt)]
    maps = [va.attention_panels(frames, va.cls_attention(m, clip))[-1] for m in networks]
    return first, frames, maps


def draw(results: dict, out: Path, data: Path, args, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 7.5))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 1.1], hspace=0.45)
    curve = results["pretraining"]
    ax = fig.add_subplot(grid[0, 0])
    ax.plot(curve["epoch"], curve["loss"], "o-", color="tab:blue")
    if "out_dim" in results:
        ax.axhline(math.log(results["out_dim"]), ls="--", color="grey", lw=1)
        ax.text(curve["epoch"][0], math.log(results["out_dim"]), " ln(K): collapse", va="bottom", fontsize=8)
    ax.set(title="SSL pretraining loss", xlabel="epoch", ylabel="DINO loss (epoch mean)")

    ax = fig.add_subplot(grid[0, 1])
    knn = [(e, v) for e, v in zip(curve["epoch"], curve["knn_top1"]) if v is not None]
    if knn:
        ax.plot(*zip(*knn), "o-", color="tab:orange", label="SSL teacher")
    k0 = next(iter(results["random"]["knn_top1"]))
    ax.axhline(results["random"]["knn_top1"][k0], color="tab:grey", label=f"random init (k={k0})")
    ax.axhline(results["chance"], ls=":", color="black", label="chance")
    ax.set(title=f"Online kNN top-1 on held-out videos (k={results.get('online_knn_k', k0)})",
           xlabel="epoch", ylabel="top-1 %", ylim=(0, 100))
    ax.legend(fontsize=8)

    ax = fig.add_subplot(grid[0, 2])
    labels = [f"kNN k={k}" for k in results["ssl"]["knn_top1"]] + ["linear"]
    width = 0.38
    for i, (name, label) in enumerate(NETWORKS):
        values = [*results[name]["knn_top1"].values(), results[name]["linear_top1"]]
        bars = ax.bar([j + (i - 0.5) * width for j in range(len(values))], values, width, label=label)
        ax.bar_label(bars, fmt="%.0f", fontsize=8)
    ax.axhline(results["chance"], ls=":", color="black", label="chance")
    ax.set_xticks(range(len(labels)), labels)
    ax.set(title="Frozen features, held-out top-1", ylabel="top-1 %", ylim=(0, 100))
    ax.legend(fontsize=8)

    video, frames, maps = attention_rows(out, data, args)
    cells = grid[1, :].subgridspec(3, len(frames), wspace=0.05, hspace=0.1)
    for r, (row, label) in enumerate(zip([frames, *maps], ["video", "SSL teacher", "random init"])):
        for t in range(len(frames)):
            ax = fig.add_subplot(cells[r, t])
            ax.imshow(row[t])
            ax.set_xticks([])
            ax.set_yticks([])
            if t == 0:
                ax.set_ylabel(label, fontsize=8)
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=8)
    fig.text(0.5, 0.47, f"Last-block CLS attention (mean of heads) on held-out {video}", ha="center", fontsize=9)
    fig.suptitle(f"SVT demo: {len(results['classes'])} motion classes, seed {results['seed']}, "
                 f"{results['wall_seconds']} s on {results['cpu']} ({results['precision']})", fontsize=10)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(args) -> dict:
    out, data = Path(args.demo_out), Path(args.data_path)
    results = collect(out, data, args.seed, args.seconds, json.loads(args.notes))
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    draw(results, out, data, args, out / "report.png")
    print("\n" + table(results))
    print(f"\nseed {args.seed}, {results['precision']}, {args.seconds} s before the report; results in "
          f"{out / 'results.json'}, pictures in {out / 'report.png'}")
    return results


if __name__ == "__main__":
    main(argparse.ArgumentParser("SVT demo report", parents=[get_args_parser()]).parse_args())
