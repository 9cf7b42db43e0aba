"""Stage `compare`: every variant's metrics -> the comparison report.

    python -m pipeline.compare --metrics reports/metrics --predictions reports/predictions \
        --curves reports/curves --quantize reports/quantize.json --adapters models/adapters \
        --csv reports/comparison.csv --md reports/comparison.md --md-zh reports/comparison.zh.md --plots reports/plots

Reads <metrics>/<name>.json and <predictions>/<name>.jsonl (every variant of params.yaml plus
the `base` baseline), <curves>/<variant>.csv and the quantize summary; writes (atomically) the
comparison CSV (validated by the ComparisonTable schema), the markdown report and its Chinese
twin, and PNG plots in the plots folder: loss curves overlaid, quality vs trainable parameters, quality vs peak
memory. Labels, use cases and the selection guide are derived from the numbers
(pipeline/report.py). A variant imported with `peft_adapter` (trained elsewhere) is compared on
quality; its training columns read "imported" / "导入", and it is left out of the memory labels,
the memory and speed guide, the 7B projection and the loss-curve plot. A variant trained over
several processes (`train.distributed`; <adapters>/<variant>/train_summary.json says so) gets a
row in a "distributed training" section: strategy, processes, base-weight bytes and peak memory
per rank; a run of one process adds nothing to the report.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import report as R
from pipeline.files import commit_outputs
from pipeline.params import Params
from pipeline.projection import FSDP_WAYS, project
from pipeline.schemas import COMPARISON_COLUMNS, METRIC_COLUMNS, validate_comparison
from pipeline.stage import start
from pipeline.tracking import git_commit

BASELINE = "base"  # the base model's row: the name dvc.yaml's evaluate_base stage gives it
TUTORIAL_7B = {"lora": "~15 GB", "qlora": "~6 GB"}


def imported_variants(params: Params) -> frozenset[str]:
    """The variants imported from a PEFT folder (`peft_adapter`): evaluated here, trained elsewhere."""
    return frozenset(name for name, v in params.variants.items() if v.peft_adapter is not None)


def load_inputs(params: Params, args):
    names = list(params.variants) + [BASELINE]
    imported = imported_variants(params)
    rows, preds, curves = {}, {}, {}
    for name in names:
        rows[name] = json.loads((Path(args.metrics) / f"{name}.json").read_text())
        with open(Path(args.predictions) / f"{name}.jsonl", encoding="utf-8") as handle:
            preds[name] = [json.loads(line) for line in handle if line.strip()]
        if name != BASELINE and name not in imported:  # an imported adapter's curve is empty
            curves[name] = pd.read_csv(Path(args.curves) / f"{name}.csv")
    quantize = Path(args.quantize)
    quant = json.loads(quantize.read_text()) if quantize.exists() else None
    return rows, preds, curves, quant


def distributed_runs(params: Params, adapters: str) -> dict[str, dict]:
    """The `distributed` record of every variant trained over several processes (train_summary.json)."""
    out = {}
    for name in params.variants:
        path = Path(adapters) / name / "train_summary.json"
        record = json.loads(path.read_text()).get("distributed") if path.is_file() else None
        if record:
            out[name] = record
    return out


def build_table(params: Params, rows, preds, g2p: bool) -> tuple[pd.DataFrame, dict]:
    imported = imported_variants(params)
    qualities = R.quality_labels(rows, preds, g2p)
    memories = R.memory_labels(rows, imported=imported)
    records = []
    for name, row in rows.items():
        diff = qualities[name][1]
        records.append({**{k: row[k] for k in METRIC_COLUMNS}, "memory_label": memories[name],
                        "quality_label": qualities[name][0],
                        "per_delta_vs_lora": diff.delta if (diff is not None and g2p) else None})
    table = validate_comparison(pd.DataFrame(records, columns=list(COMPARISON_COLUMNS)))
    derived = {"quality": qualities, "memory": memories, "use": R.use_cases(rows, qualities, memories, imported=imported),
               "imported": imported}
    return table, derived


def projections(params: Params):
    out = {}
    for name, v in params.variants.items():
        if v.peft_adapter is not None:
            continue  # trained elsewhere, perhaps differently: no training-memory projection
        bits = "4bit" if v.spec.base != "full" else "bf16"
        out[name] = project(name, v.spec, bits, params.quantize.blocksize, params.quantize.double_quant)
    if "lora" in params.variants and not any(v.spec.base != "full" for v in params.variants.values()):
        # No 4-bit variant in this run: still show what LoRA on QLoRA's storage would need.
        out["lora on nf4 (projection)"] = project("lora on nf4", params.variants["lora"].spec, "4bit",
                                                  params.quantize.blocksize, params.quantize.double_quant)
    return out


# ----- plots ------------------------------------------------------------------------------------------
def label_points(ax, points: list[tuple[str, float, float]], fontsize: int = 8) -> None:
    """Name every point without overprinting: each label goes right of its point, moved up (with a
    leader line) until its box clears the labels already placed (greedy, lowest point first).

    Methods with the same parameter count or similar memory sit on top of each other.
    """
    ax.figure.canvas.draw()  # fix the axes limits so data -> display positions are final
    to_pt = 72.0 / ax.figure.dpi
    height, char_width = fontsize * 1.25, fontsize * 0.62  # label box in points (DejaVu Sans)
    boxes: list[tuple[float, float, float, float]] = []
    located = [(*(c * to_pt for c in ax.transData.transform((x, y))), name, x, y) for name, x, y in points]
    for px, py, name, x, y in sorted(located, key=lambda item: (item[1], item[0])):
        left, right = px + 8, px + 8 + char_width * len(name)
        bottom = py + 2
        while any(left < r and l < right and bottom < t and b < bottom + height for l, b, r, t in boxes):
            bottom += 1.0
        boxes.append((left, bottom, right, bottom + height))
        dy = bottom - (py + 2)
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(8, 2 + dy), fontsize=fontsize,
                    arrowprops={"arrowstyle": "-", "lw": 0.5, "color": "gray"} if dy > 0 else None)


def make_plots(folder: Path, rows, curves, g2p: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quality_key = "phoneme_error_rate" if g2p else "exact_match"
    quality_name = "phoneme error rate (lower is better)" if g2p else "exact match (higher is better)"

    # one style per variant in every plot; the 10 colours repeat with another line style and marker
    names = list(dict.fromkeys([*curves, *(n for n in rows if n != BASELINE)]))
    palette = plt.get_cmap("tab10").colors
    style = {name: (palette[i % 10], ("-", "-.", ":")[i // 10 % 3], ("o", "s", "^")[i // 10 % 3])
             for i, name in enumerate(names)}

    fig, ax = plt.subplots(figsize=(8, 5))
    for name, curve in curves.items():
        color, linestyle, marker = style[name]
        ax.plot(curve["step"], curve["loss"], linestyle, color=color, label=name, alpha=0.85)
        val = curve.dropna(subset=["val_loss"])
        ax.plot(val["step"], val["val_loss"], "--", marker=marker, color=color, alpha=0.6, markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("response loss (solid: train, dashed dots: validation)")
    ax.set_title("Loss curves")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(folder / "loss_curves.png", dpi=110)
    plt.close(fig)

    for key, xlabel, fname, logx in (("trainable_params", "trainable parameters", "quality_vs_params.png", True),
                                     ("training_memory_bytes", "training memory (MiB)", "quality_vs_memory.png", False)):
        fig, ax = plt.subplots(figsize=(7, 5))
        points = []
        for name, row in rows.items():
            if name == BASELINE or row.get(quality_key) is None or row[key] is None:  # imported: no training memory
                continue
            x = row[key] / (2**20 if key.endswith("memory_bytes") else 1)
            color, _, marker = style[name]
            ax.scatter(x, row[quality_key], s=40, color=color, marker=marker)
            points.append((name, x, row[quality_key]))
        if logx:
            ax.set_xscale("log")
        label_points(ax, points)
        base = rows.get(BASELINE)
        if base and base.get(quality_key) is not None:
            ax.axhline(base[quality_key], color="gray", linestyle=":", label="base model (no adapter)")
            ax.legend(fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality_name)
        ax.set_title(f"Quality vs {xlabel}")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(folder / fname, dpi=110)
        plt.close(fig)


# ----- markdown ---------------------------------------------------------------------------------------
S = {
    "en": {
        "title": "# LoRA variants compared",
        "setup": ("Generated by `dvc repro` on {date} (commit `{commit}`). Base model: **{model}**; task: **{task}**; "
                  "every variant trained for **{steps} steps × {batch} examples** (lr schedule {schedule}, "
                  "warmup {warmup}), evaluated on **{n_test} held-out examples** with greedy decoding. Device: {device}."),
        "t1": "## 1. Comparison table",
        "t1_head": "| Variant | Core idea | Memory | Quality | Use case |",
        "t1_note": ("Labels are measured, relative to LoRA: *memory* from training memory — the base weights' exact "
                    "bytes plus what memory grew by during training (±5% = medium); "
                    "*quality* from a paired bootstrap ({n} resamples) of the {metric} difference to LoRA over the "
                    "test examples — *better*/*worse* only when the 95% interval excludes zero. Each of the {k} "
                    "comparisons is tested on its own (no multiple-comparison correction): if all {k} methods were "
                    "truly equal to LoRA, about {chance:.1f} would still get such a label by chance, so a label whose "
                    "interval barely excludes zero needs a larger test set to confirm."),
        "t2": "## 2. Measured numbers",
        "t2_head": ("| Variant | {metric} | Δ vs LoRA, pp [95% CI] | Exact match | Eval loss | Trainable params (% of base) "
                    "| Adapter file | Base weights | Training memory | Peak RSS | Train time | Tokens/s | LR |"),
        "t2_note": ("Training memory = base-weight bytes + the growth of memory during training (activations, "
                    "gradients, optimizer state); peak RSS = the process's whole resident memory at its peak ({method}), "
                    "libraries and allocator slack included. The base row: during its evaluation. Train time excludes "
                    "validation. Tokens/s counts every non-padding token processed."),
        "t3": "## 3. Memory for Llama-2-7B (projection)",
        "t3_intro": ("Adapters built for real on a Llama-2-7B-shaped model on the `meta` device (exact parameter "
                     "counts), times exact bytes per parameter:\n\n"
                     "`M = base + 4·P_adapter + 4·P_trainable (gradients) + 8·P_trainable (AdamW) + extra state`\n\n"
                     "base = 2 B/param (bf16), or for a 4-bit base the NF4 + double-quantization bytes of the linear "
                     "layers ({bits:.3f} bits/param) + 2 B/param for embeddings, norms and head. Activations are "
                     "not included (they depend on batch and sequence length, not on the method)."),
        "t3_head": "| Variant | Trainable params | Base | Adapter | Gradients | AdamW | Extra | **Total** | Tutorial's claim |",
        "t3_note": ("The tutorial's ~15 GB (LoRA) vs ~6 GB (QLoRA) include activations; the persistent state alone "
                    "is {lora} vs {qlora} here. Delta-LoRA's extra is the fp32 residual that keeps W's updates "
                    "exact over a bf16 base."),
        "t3_fsdp": ("Per GPU under N-way FSDP2 (`train.distributed.strategy: fsdp`; fully_shard per decoder layer "
                    "and the root), the same persistent state: the frozen base weights, 4-bit codes included (and "
                    "Delta-LoRA's residual), are split N ways; the 4-bit quantization state, the adapter, its gradients "
                    "and AdamW state stay whole on every GPU."),
        "t3_fsdp_head": "| Variant | " + " | ".join(f"{n} GPU{'s' if n > 1 else ''}" for n in FSDP_WAYS) + " |",
        "t_dist": "## 3c. Distributed training (measured)",
        "dist_intro": ("Variants trained over several processes (`train.distributed`), each rank on its share of the "
                       "same global batch. Base weights: the bytes each rank held, and their ratio to the whole base "
                       "(FSDP2 shards the base weights and 4-bit codes; the 4-bit quantization state, VeRA's pair and "
                       "the adapters stay whole on every rank; DDP replicates everything). Peak memory: each process's "
                       "own ({method})."),
        "dist_head": "| Variant | Strategy | Processes | Base weights per rank | Peak memory per rank |",
        "dist_procs": "{world} ({nnodes} node(s) × {nproc})",
        "quant": ("Quantize stage (measured on this base): {layers} linear layers, {fp32} fp32 → {q4} with NF4"
                  "{dq}, {bits:.3f} bits/param (formula {formula:.3f}); mean relative reconstruction error "
                  "‖W − deq(Q(W))‖/‖W‖ = {err:.4f} (worst {worst:.4f})."),
        "t4": "## 4. Selection guide (derived from the numbers above)",
        "g_memory": "- **Memory-constrained**: **{name}** — {gib:.2f} GiB projected for 7B (LoRA: {lora:.2f} GiB); measured training memory {peak}.",
        "g_quality": "- **Best quality at this budget**: **{name}** — {metric} {value:.3f}, {diff} pp vs LoRA (significant).",
        "g_quality_none": ("- **Best quality at this budget**: no variant separates from LoRA beyond noise: the 95% "
                           "intervals of every difference include zero (lowest {metric}: **{name}**, {value:.3f}). "
                           "A larger budget or test set is needed to rank them."),
        "g_speed": "- **Faster training**: **{name}** — {tps:.0f} tokens/s (LoRA: {lora:.0f}).",
        "g_speed_none": ("- **Faster training**: no variant trains measurably faster than LoRA here (fastest: {name}, "
                         "{tps:.0f} tokens/s vs LoRA's {lora:.0f} and the median method's {median:.0f}; only a gain of "
                         "{margin:.2f}x over both counts, because on this shared machine a whole stage can run slow)."),
        "g_params": "- **Many adapters / multi-task**: **{name}** — {params} trainable parameters ({ratio:.1%} of LoRA's), adapter file {size}.",
        "g_general": "- **General purpose**: **{name}** — {why}.",
        "g_general_lora": "LoRA: no variant was measurably better at this budget",
        "g_general_best": "measurably better than LoRA ({diff} pp)",
        "g_worse": "- **Measurably worse here**: {names} (at this budget; see §2).",
        "t5": "## 5. Plots",
        "t6": "## 6. Notes",
        "t_ranks": "## 3b. Where the adaptive methods put their rank",
        "ranks_intro": ("Mean rank kept per module kind after training (AdaLoRA: triplets left by the budget "
                        "schedule; SoRA: gates that are not exactly zero), from the adapters' own reports."),
        "ranks_variant": "Variant",
        "ranks_total": "Kept / initial",
        "ranks_depth": "- {name}: first third of the layers keeps {first:.1f} on average, last third {last:.1f}.",
        "note_4bit": ("4-bit base ({name}): the frozen weights take {q} in memory against {f} in fp32 "
                      "({ratio:.1f}x less), measured on the real tensors (codes + quantization state)."),
        "note_loftq": ("LoftQ divides its SVD factors by the scale s, so deq(Q) + s·BA is the intended "
                       "approximation for any alpha; PEFT's loftq_init does not divide and is exact only when "
                       "alpha = r (peft#1982)."),
        "note_adalora": ("AdaLoRA follows PEFT's RankAllocator exactly (budget floored, masking after tinit, forced "
                         "at T − tfinal, unsquared orthogonality norms); ranknum is the constant init_r, as in the paper "
                         "and in PEFT 0.21.2 (a frozen parameter there)."),
        "notes": [
            "Every method is this project's own implementation (`variants/`); LoRA, rsLoRA, DoRA, VeRA, LoRA-FA and "
            "LoRA+ match PEFT 0.21.2 numerically (tests/test_parity_peft.py, tests/test_methods.py).",
            "LoRA+ uses PEFT's group rule (B and every 1-D tensor get lr·ratio) with the paper's fixed ratio, not the "
            "tutorial's sqrt(r) rule. LoRA-FA's projection runs in the parameter dtype (PEFT runs it under bf16 "
            "autocast when available).",
            "DoRA's norm is detached (paper §4.3) and its magnitude starts at ‖W0‖_row; VeRA shares one frozen "
            "Kaiming pair and starts λ_b = 0 (the tutorial's sample code gets both wrong).",
        ],
        "note_imported": ("Imported, not trained here: {names} — PEFT adapters trained elsewhere (`peft_adapter` in "
                          "params.yaml), loaded with `variants.load_peft` and evaluated like the others. Their training "
                          "cost was not measured here, so they carry no memory or speed label and no loss curve."),
        "base_row": "base model",
    },
    "zh": {
        "title": "# LoRA 变体对比",
        "setup": ("由 `dvc repro` 于 {date} 生成（提交 `{commit}`）。基座模型：**{model}**；任务：**{task}**；"
                  "每个变体训练 **{steps} 步 × 每步 {batch} 个样本**（学习率调度 {schedule}，预热 {warmup} 步），"
                  "在 **{n_test} 个留出样本**上用贪心解码评估。设备：{device}。"),
        "t1": "## 1. 变体对比表",
        "t1_head": "| 变体 | 核心改进 | 显存 | 效果 | 适用场景 |",
        "t1_note": ("标签均为实测，相对 LoRA：*显存* 取训练内存——基座权重的精确字节数加上训练期间内存的增长（±5% 为“中”）；*效果* 取与 LoRA 的 {metric} 差值在测试样本上的"
                    "配对自助法（{n} 次重采样）——只有 95% 区间不含 0 时才标“更好/较差”。这 {k} 个比较各自独立检验（未做多重比较校正）："
                    "即使 {k} 个方法都与 LoRA 真正相当，也约有 {chance:.1f} 个会偶然得到这样的标签；区间刚好不含 0 的标签需要更大的测试集来确认。"),
        "t2": "## 2. 实测数据",
        "t2_head": ("| 变体 | {metric} | 相对 LoRA 差值（百分点，95% 区间） | 完全匹配率 | 评估损失 | 可训练参数（占基座 %） "
                    "| 适配器文件 | 基座权重 | 训练内存 | 峰值 RSS | 训练时间 | 词元/秒 | 学习率 |"),
        "t2_note": ("训练内存 = 基座权重字节数 + 训练期间内存的增长（激活值、梯度、优化器状态）；峰值 RSS 为进程常驻内存的峰值（{method}），"
                    "含库与分配器余量。基座行：评估期间。训练时间不含验证。词元/秒统计所有非填充词元。"),
        "t3": "## 3. Llama-2-7B 的显存需求（推算）",
        "t3_intro": ("在 `meta` 设备上按 Llama-2-7B 的形状真实构建适配器（参数量精确），再乘以每个参数的精确字节数：\n\n"
                     "`M = 基座 + 4·P_适配器 + 4·P_可训练（梯度） + 8·P_可训练（AdamW） + 额外状态`\n\n"
                     "基座 = 每参数 2 字节（bf16）；4-bit 基座则为线性层的 NF4 + 双重量化字节（{bits:.3f} 位/参数）"
                     "加上嵌入、归一化和输出头的每参数 2 字节。不含激活值（取决于批大小和序列长度，与方法无关）。"),
        "t3_head": "| 变体 | 可训练参数 | 基座 | 适配器 | 梯度 | AdamW | 额外 | **合计** | 教程的说法 |",
        "t3_note": ("教程中的 ~15 GB（LoRA）与 ~6 GB（QLoRA）包含激活值；这里仅持久状态分别为 {lora} 与 {qlora}。"
                    "Delta-LoRA 的额外状态是在 bf16 基座上保持 W 更新精确所需的 fp32 残差。"),
        "t3_fsdp": ("N 路 FSDP2（`train.distributed.strategy: fsdp`，每个解码层及根模块各做一次 fully_shard）下每张 GPU "
                    "的同一持久状态：冻结的基座权重（含 4-bit 编码，以及 Delta-LoRA 的残差）被切成 N 份；4-bit 量化状态、"
                    "适配器、其梯度和 AdamW 状态在每张 GPU 上都是完整的。"),
        "t3_fsdp_head": "| 变体 | " + " | ".join(f"{n} 张 GPU" for n in FSDP_WAYS) + " |",
        "t_dist": "## 3c. 分布式训练（实测）",
        "dist_intro": ("用多个进程训练的变体（`train.distributed`），每个 rank 处理同一全局批次中的一份。基座权重：每个 rank "
                       "实际持有的字节数及其占完整基座的比例（FSDP2 切分基座权重和 4-bit 编码；4-bit 量化状态、VeRA 的共享矩阵"
                       "和适配器在每个 rank 上都是完整的；DDP 全部复制）。峰值内存：各进程自己的（{method}）。"),
        "dist_head": "| 变体 | 策略 | 进程数 | 每个 rank 的基座权重 | 每个 rank 的峰值内存 |",
        "dist_procs": "{world}（{nnodes} 个节点 × {nproc}）",
        "quant": ("量化阶段（在本基座上实测）：{layers} 个线性层，{fp32} fp32 → NF4{dq} 后 {q4}，{bits:.3f} 位/参数"
                  "（公式 {formula:.3f}）；平均相对重建误差 ‖W − deq(Q(W))‖/‖W‖ = {err:.4f}（最大 {worst:.4f}）。"),
        "t4": "## 4. 选择指南（由以上数据推出）",
        "g_memory": "- **显存受限**：**{name}** —— 7B 推算 {gib:.2f} GiB（LoRA：{lora:.2f} GiB）；实测训练内存 {peak}。",
        "g_quality": "- **该预算下效果最好**：**{name}** —— {metric} {value:.3f}，相对 LoRA {diff} 个百分点（显著）。",
        "g_quality_none": ("- **该预算下效果最好**：没有变体在噪声之外与 LoRA 拉开差距：所有差值的 95% 区间都包含 0"
                           "（{metric} 最低的是 **{name}**，{value:.3f}）。需要更大的训练预算或测试集才能排序。"),
        "g_speed": "- **加速训练**：**{name}** —— {tps:.0f} 词元/秒（LoRA：{lora:.0f}）。",
        "g_speed_none": ("- **加速训练**：这里没有变体比 LoRA 可测量地更快（最快的是 {name}，{tps:.0f} 词元/秒，LoRA 为 {lora:.0f}，"
                         "所有方法的中位数为 {median:.0f}；只有同时超过两者 {margin:.2f} 倍才算更快，因为在这台共享机器上整个阶段都可能变慢）。"),
        "g_params": "- **多任务 / 多适配器**：**{name}** —— {params} 个可训练参数（LoRA 的 {ratio:.1%}），适配器文件 {size}。",
        "g_general": "- **通用场景**：**{name}** —— {why}。",
        "g_general_lora": "LoRA：该预算下没有变体可测量地更好",
        "g_general_best": "可测量地优于 LoRA（{diff} 个百分点）",
        "g_worse": "- **该预算下可测量地更差**：{names}（见第 2 节）。",
        "t5": "## 5. 图表",
        "t6": "## 6. 说明",
        "t_ranks": "## 3b. 自适应方法把秩分配到了哪里",
        "ranks_intro": "训练后每类模块平均保留的秩（AdaLoRA：预算调度后剩下的三元组；SoRA：不为零的门控），取自适配器自身的报告。",
        "ranks_variant": "变体",
        "ranks_total": "保留 / 初始",
        "ranks_depth": "- {name}：前三分之一的层平均保留 {first:.1f}，后三分之一为 {last:.1f}。",
        "note_4bit": "4-bit 基座（{name}）：冻结权重在内存中占 {q}，fp32 为 {f}（少 {ratio:.1f} 倍），按真实张量（编码 + 量化状态）测得。",
        "note_loftq": ("LoftQ 把 SVD 因子除以缩放系数 s，因此对任意 alpha，deq(Q) + s·BA 都是预期的近似；PEFT 的 loftq_init "
                       "不做除法，只有 alpha = r 时才精确（peft#1982）。"),
        "note_adalora": ("AdaLoRA 完全按照 PEFT 的 RankAllocator（预算取整、tinit 之后才剪枝、在 T − tfinal 强制剪枝、正交项范数不平方）；"
                         "ranknum 为常数 init_r，与论文及 PEFT 0.21.2（其中为冻结参数）一致。"),
        "notes": [
            "所有方法都是本项目自己的实现（`variants/`）；LoRA、rsLoRA、DoRA、VeRA、LoRA-FA、LoRA+ 与 PEFT 0.21.2 数值一致"
            "（tests/test_parity_peft.py、tests/test_methods.py）。",
            "LoRA+ 采用 PEFT 的分组规则（B 及所有一维张量使用 lr·比率）和论文的固定比率，而不是教程的 √r 规则。"
            "LoRA-FA 的投影在参数精度下计算（PEFT 在可用时用 bf16 autocast）。",
            "DoRA 的范数按论文 §4.3 分离梯度，幅度初始化为 ‖W0‖ 的行范数；VeRA 全模型共享一对冻结的 Kaiming 矩阵，"
            "λ_b 初始化为 0（教程示例代码这两处都有误）。",
        ],
        "note_imported": ("导入而非在此训练：{names} —— 在别处训练的 PEFT 适配器（params.yaml 中的 `peft_adapter`），"
                          "用 `variants.load_peft` 加载后与其他变体同样评估。其训练成本不在此测量，因此没有显存或速度标签，也没有损失曲线。"),
        "base_row": "基座模型",
    },
}


def render(lang: str, params: Params, rows, derived, projs, quant, g2p: bool, device: str,
           distributed: dict[str, dict] | None = None) -> str:
    s = S[lang]
    labels = R.TEXT[lang]["labels"]
    uses = R.TEXT[lang]["use"]
    metric = ("PER" if lang == "en" else "音素错误率") if g2p else ("exact-match error" if lang == "en" else "完全匹配错误率")
    n_test = next(iter(rows.values())).get("n_test", params.data.n_test)
    lines = [s["title"], "", s["setup"].format(
        date=dt.date.today().isoformat(), commit=git_commit()[:10],
        model=params.model.source if params.model.source != "smollm2" else "SmolLM2-135M-Instruct",
        task=("G2P (CMU Pronouncing Dictionary)" if lang == "en" else "字音转换 G2P（CMU 发音词典）") if g2p else params.data.source,
        steps=params.train.steps, batch=params.train.batch_size, schedule=params.train.schedule,
        warmup=params.train.warmup_steps, n_test=n_test,
        device=device), ""]

    lines += [s["t1"], "", s["t1_head"], "|---|---|---|---|---|"]
    for name, v in params.variants.items():
        q, _ = derived["quality"][name]
        lines.append(f"| {name} | {R.core_idea(v.spec, lang)} | {labels[derived['memory'][name]]} | {labels[q]} | "
                     f"{R.TEXT[lang]['sep'].join(uses[u] for u in derived['use'][name])} |")
    compared = sum(1 for name in params.variants if derived["quality"][name][1] is not None)
    lines += ["", s["t1_note"].format(n=R.BOOTSTRAP_SAMPLES, metric=metric, k=compared, chance=0.05 * compared), ""]

    lines += [s["t2"], "", s["t2_head"].format(metric=metric), "|" + "---|" * 13]
    imported = derived.get("imported", frozenset())
    for name, row in rows.items():
        diff = derived["quality"][name][1]
        shown = s["base_row"] if name == "base" else name
        per = row["phoneme_error_rate"] if g2p else 1 - row["exact_match"]
        lr = f"{row['lr']:.0e}" if R.is_finite(row.get("lr")) else "—"
        training = ([labels["imported"]] * 5 if name in imported else  # memory, RSS, time, tokens/s, LR
                    [R.fmt_bytes(row["training_memory_bytes"]), R.fmt_bytes(row["peak_memory_bytes"]),
                     f"{row['train_seconds']:.0f} s", f"{row['tokens_per_second']:.0f}", lr])
        lines.append(
            f"| {shown} | {per:.3f} | {R.fmt_diff(diff)} | {row['exact_match']:.3f} | {row['eval_loss']:.3f} | "
            f"{R.fmt_params(row['trainable_params'])} ({row['trainable_percent']:.3f}%) | "
            f"{R.fmt_bytes(row['adapter_bytes']) if row['adapter_bytes'] else '—'} | {R.fmt_bytes(row['base_weight_bytes'])} | "
            + " | ".join(training) + " |")
    method = next((r.get("peak_memory_method") for n, r in rows.items() if n != "base" and n not in imported), "")
    lines += ["", s["t2_note"].format(method=method), ""]

    bits = quant["bits_per_param_formula"] if quant else 4.127
    lines += [s["t3"], "", s["t3_intro"].format(bits=bits), "", s["t3_head"], "|---|---|---|---|---|---|---|---|---|"]
    for name, p in projs.items():
        claim = TUTORIAL_7B.get("qlora" if ("nf4" in name or "qlora" in name) else name, "")
        lines.append(f"| {name} | {R.fmt_params(p.trainable_params)} | {R.fmt_bytes(p.base_bytes)} | "
                     f"{R.fmt_bytes(p.adapter_bytes)} | {R.fmt_bytes(p.gradient_bytes)} | {R.fmt_bytes(p.optimizer_bytes)} | "
                     f"{R.fmt_bytes(p.extra_bytes) if p.extra_bytes else '—'} | **{p.total_gib:.2f} GiB** | {claim} |")
    lora_p = projs.get("lora")
    q_p = next((p for n, p in projs.items() if "nf4" in n or params.variants.get(n) and params.variants[n].spec.base != "full"), None)
    lines += ["", s["t3_note"].format(lora=f"{lora_p.total_gib:.1f} GiB" if lora_p else "—",
                                      qlora=f"{q_p.total_gib:.1f} GiB" if q_p else "—")]
    lines += ["", s["t3_fsdp"], "", s["t3_fsdp_head"], "|---|" + "---|" * len(FSDP_WAYS)]
    lines += [f"| {name} | " + " | ".join(f"{p.per_gpu_bytes(n) / 2**30:.2f} GiB" for n in FSDP_WAYS) + " |"
              for name, p in projs.items()]
    if quant:
        lines += ["", s["quant"].format(layers=quant["quantized_layers"], fp32=R.fmt_bytes(quant["base_fp32_bytes"]),
                                        q4=R.fmt_bytes(quant["base_4bit_bytes"]),
                                        dq=" + double quantization" if (quant["double_quant"] and lang == "en") else
                                        ("（双重量化）" if quant["double_quant"] else ""),
                                        bits=quant["bits_per_param_measured"], formula=quant["bits_per_param_formula"],
                                        err=quant["relative_error_mean"], worst=quant["relative_error_max"])]
    lines += [""]

    lines += ranks_section(lang, params, rows)
    lines += distributed_section(lang, rows, distributed or {})
    lines += [s["t4"], ""] + guide(lang, params, rows, derived, projs, g2p, metric) + [""]
    lines += [s["t5"], "", "![loss curves](plots/loss_curves.png)", "",
              "![quality vs trainable parameters](plots/quality_vs_params.png)", "",
              "![quality vs peak memory](plots/quality_vs_memory.png)", ""]
    notes = list(s["notes"])
    specs = {n: v.spec for n, v in params.variants.items()}
    four_bit = [n for n, sp in specs.items() if sp.base != "full"]
    full = [n for n, sp in specs.items() if sp.base == "full"]
    if four_bit and full:
        q, f = rows[four_bit[0]], rows[full[0]]
        notes.append(s["note_4bit"].format(name=four_bit[0], q=R.fmt_bytes(q["base_weight_bytes"]),
                                           f=R.fmt_bytes(f["base_weight_bytes"]),
                                           ratio=f["base_weight_bytes"] / q["base_weight_bytes"]))
    if any(sp.init == "loftq" for sp in specs.values()):
        notes.append(s["note_loftq"])
    if any(sp.layer == "adalora" for sp in specs.values()):
        notes.append(s["note_adalora"])
    if imported:
        notes.append(s["note_imported"].format(names=", ".join(n for n in params.variants if n in imported)))
    lines += [s["t6"], ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


def _per_rank(values: list, fmt) -> str:
    """Every rank's value (up to 4 ranks), else the range over ranks."""
    if any(v is None for v in values):
        return "—"
    if len(values) <= 4:
        return " / ".join(fmt(v) for v in values)
    return f"{fmt(min(values))} – {fmt(max(values))}"


def distributed_section(lang: str, rows, distributed: dict[str, dict]) -> list[str]:
    """World size, strategy and per-rank memory of the variants trained over several processes."""
    if not distributed:
        return []
    s = S[lang]
    method = next((rows[n].get("peak_memory_method") for n in distributed if n in rows), "") or ""
    out = [s["t_dist"], "", s["dist_intro"].format(method=method), "", s["dist_head"], "|---|---|---|---|---|"]
    for name, d in distributed.items():
        ranks = sorted(d["per_rank"], key=lambda r: r["rank"])
        held = [r["base_weight_bytes"] for r in ranks]
        whole = rows.get(name, {}).get("base_weight_bytes")
        ratio = f" ({max(held) / whole:.2f}×)" if whole and None not in held else ""
        out.append(f"| {name} | {d['strategy']} ({d['backend']}) | "
                   + s["dist_procs"].format(world=d["world_size"], nnodes=d["nnodes"], nproc=d["nproc_per_node"])
                   + f" | {_per_rank(held, R.fmt_bytes)}{ratio} | "
                   + f"{_per_rank([r['peak_memory_bytes'] for r in ranks], R.fmt_bytes)} |")
    return out + [""]


def _module_kind(layer_name: str) -> str:
    return layer_name.rsplit(".", 1)[-1]


def ranks_section(lang: str, params: Params, rows) -> list[str]:
    """AdaLoRA's final rank pattern and SoRA's kept ranks, averaged per module kind."""
    s = S[lang]
    found = []
    for name, v in params.variants.items():
        layer_part = rows[name].get("parts", {}).get("layer", {})
        ranks = layer_part.get("rank_pattern") or layer_part.get("kept_ranks")
        if ranks:
            found.append((name, v.spec.r, ranks))
    if not found:
        return []
    kinds = sorted({_module_kind(layer) for _, _, ranks in found for layer in ranks})
    out = [s["t_ranks"], "", s["ranks_intro"], "",
           "| " + s["ranks_variant"] + " | " + " | ".join(kinds) + " | " + s["ranks_total"] + " |",
           "|---|" + "---|" * (len(kinds) + 1)]
    for name, r, ranks in found:
        cells = []
        for kind in kinds:
            values = [k for layer, k in ranks.items() if _module_kind(layer) == kind]
            cells.append(f"{sum(values) / len(values):.1f}" if values else "—")
        total = sum(ranks.values())
        out.append(f"| {name} (r={r}) | " + " | ".join(cells) + f" | {total}/{r * len(ranks)} ({total / (r * len(ranks)):.0%}) |")
    by_depth = []
    for name, _r, ranks in found:
        layers = {}
        for layer, k in ranks.items():
            parts = layer.split(".")
            idx = next((int(p) for p in parts if p.isdigit()), None)
            if idx is not None:
                layers.setdefault(idx, []).append(k)
        if layers:
            depth = sorted(layers)
            first, last = depth[: max(1, len(depth) // 3)], depth[-max(1, len(depth) // 3):]
            by_depth.append(s["ranks_depth"].format(name=name, first=_mean_rank(layers, first),
                                                    last=_mean_rank(layers, last)))
    return out + [""] + by_depth + [""]


def _mean_rank(layers: dict[int, list[int]], ids: list[int]) -> float:
    """Mean kept rank over the adapted layers of the transformer blocks `ids`."""
    return sum(sum(layers[i]) for i in ids) / sum(len(layers[i]) for i in ids)


def guide(lang, params, rows, derived, projs, g2p: bool, metric: str) -> list[str]:
    s = S[lang]
    names = list(params.variants)
    trained = [n for n in names if n not in derived.get("imported", ())]  # the memory and speed guide's candidates
    out = []
    key = (lambda n: rows[n]["phoneme_error_rate"]) if g2p else (lambda n: 1 - rows[n]["exact_match"])
    lora = rows.get("lora")
    if trained:  # imported adapters have no training cost to guide by
        mem_name = min((n for n in trained if n in projs), key=lambda n: projs[n].total_bytes)
        out.append(s["g_memory"].format(name=mem_name, gib=projs[mem_name].total_gib,
                                        lora=projs["lora"].total_gib if "lora" in projs else float("nan"),
                                        peak=R.fmt_bytes(rows[mem_name]["training_memory_bytes"])))
    best = min(names, key=key)
    diff = derived["quality"][best][1]
    if diff is not None and diff.significant and diff.delta < 0:
        out.append(s["g_quality"].format(name=best, metric=metric, value=key(best), diff=R.fmt_diff(diff)))
    else:
        out.append(s["g_quality_none"].format(name=best, metric=metric, value=key(best)))
    if trained:
        # the fastest *other* method (LoRA is the reference it is measured against)
        fast = max([n for n in trained if n != "lora"] or trained, key=lambda n: rows[n]["tokens_per_second"])
        if R.is_faster(rows, fast, imported=derived.get("imported", frozenset())):
            out.append(s["g_speed"].format(name=fast, tps=rows[fast]["tokens_per_second"], lora=lora["tokens_per_second"]))
        else:
            out.append(s["g_speed_none"].format(margin=R.SPEED_MARGIN, name=fast, tps=rows[fast]["tokens_per_second"],
                                                median=float(np.median([r["tokens_per_second"] for r in rows.values()
                                                                        if r["tokens_per_second"] > 0])),
                                                lora=lora["tokens_per_second"] if lora else float("nan")))
    few = min(names, key=lambda n: rows[n]["trainable_params"])
    out.append(s["g_params"].format(name=few, params=R.fmt_params(rows[few]["trainable_params"]),
                                    ratio=rows[few]["trainable_params"] / lora["trainable_params"] if lora else float("nan"),
                                    size=R.fmt_bytes(rows[few]["adapter_bytes"])))
    if diff is not None and diff.significant and diff.delta < 0:
        out.append(s["g_general"].format(name=best, why=s["g_general_best"].format(diff=R.fmt_diff(diff))))
    else:
        out.append(s["g_general"].format(name="lora", why=s["g_general_lora"]))
    worse = [n for n in names if derived["quality"][n][0] == "worse"]
    if worse:
        out.append(s["g_worse"].format(names=", ".join(worse)))
    return out


def main(argv: list[str] | None = None) -> int:
    args, params = start("compare", __doc__, argv,
                         inputs={"--metrics": "the folder of metrics rows", "--predictions": "the folder of predictions",
                                 "--curves": "the folder of training curves", "--quantize": "the quantize summary",
                                 "--adapters": "the folder of trained adapters (their train_summary.json)"},
                         outputs={"--csv": "the comparison table", "--md": "the report", "--md-zh": "the Chinese report",
                                  "--plots": "the plots folder"})
    if params is None:
        return 1
    rows, preds, curves, quant = load_inputs(params, args)
    g2p = params.data.source == "cmudict"
    table, derived = build_table(params, rows, preds, g2p)
    projs = projections(params)
    device = "cuda" if params.train.device == "cuda" else (
        "CPU" if params.train.device == "cpu" or not __import__("torch").cuda.is_available() else "cuda")
    buf = io.StringIO()
    table.to_csv(buf, index=False)
    # everything is rendered before anything is replaced: a failure keeps the previous report
    md = {"en": args.md, "zh": args.md_zh}
    distributed = distributed_runs(params, args.adapters)
    files = {args.csv: buf.getvalue(), **{path: render(lang, params, rows, derived, projs, quant, g2p, device,
                                                       distributed) for lang, path in md.items()}}
    commit_outputs(files, {args.plots: lambda tmp: make_plots(tmp, rows, curves, g2p)})
    print(f"compare: wrote {args.csv}, {args.md}, {args.md_zh} and {args.plots}/ for {len(params.variants)} variants", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
